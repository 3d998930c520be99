"""The Bradley–Terry judge's optional real-VLM backend (``verifier.bradley_terry.backend=
transformers``): a scalar reward head on a Hugging Face ``transformers`` vision-language model
loaded from a local directory, trained with the same margin loss on the same preference pairs.

This is RoboMonkey's judge shape: the prompt carries the instruction, the state and the action
chunk as text, the chunk discretised per dimension into ``action_bins`` bins between the data's
1st and 99th percentiles (OpenVLA's action tokens; RoboMonkey appends them to a LLaVA prompt);
the render goes in as the image when the policy reads images; the reward is a linear head on
the final hidden state of the last prompt token.

Nothing is downloaded: ``vlm.model_dir`` is a ``save_pretrained`` directory holding an
image-text-to-text model (``AutoModelForImageTextToText``) and its processor. torch and
transformers come with the ``vlm`` extra (``pip install -e '.[vlm]'``) and are imported only
when this backend is used. Inside the compiled evaluation the judge runs on the host through
``jax.pure_callback``; vmapped over episodes, one callback scores the whole batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from algos.clip import action_range
from core.io import atomic_dir, write_json
from envs.language import decode_instruction

FINETUNE = ("head", "all")
DEFAULT_PROMPT = ("{image}In: What action should the robot take to {instruction}?\n"
                  "State: {state}\nAction: {action}\nOut:")


@dataclass(frozen=True)
class VLMJudgeConfig:
    model_dir: str = ""
    """a local directory with an image-text-to-text model and its processor
    (``save_pretrained`` layout); required by backend=transformers"""
    prompt: str = DEFAULT_PROMPT
    """the judge's prompt; {image} becomes the processor's image token when the policy reads
    images (else nothing), {instruction}, {state} and {action} the observation and chunk"""
    action_bins: int = 256
    """bins per action dimension between the data's 1st and 99th percentiles (OpenVLA's)"""
    state_decimals: int = 2
    finetune: str = "head"
    """train the reward head only on the frozen model, or the whole model with it"""
    score_batch: int = 64
    """prompts per forward pass when scoring"""

    def __post_init__(self):
        for name, least in (("action_bins", 2), ("score_batch", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"verifier bradley_terry: vlm.{name} must be an int >= {least}, "
                                 f"got {v!r}")
        d = self.state_decimals
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 6:
            raise ValueError(f"verifier bradley_terry: vlm.state_decimals must be an int in "
                             f"[0, 6], got {d!r}")
        if self.finetune not in FINETUNE:
            raise ValueError(f"verifier bradley_terry: vlm.finetune must be one of {FINETUNE}, "
                             f"got {self.finetune!r}")
        for slot in ("{instruction}", "{action}"):
            if slot not in self.prompt:
                raise ValueError(f"verifier bradley_terry: vlm.prompt must contain {slot}, got "
                                 f"{self.prompt!r}")


# ---------------------------------------------------------------------------------------------
# prompts (numpy only)


def action_bounds(actions: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension 1st and 99th percentiles of the valid steps of [N, H, A] chunks."""
    return action_range(np.asarray(actions)[np.asarray(valid, bool)], 0.01)


def discretise(chunk: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """[..., A] actions -> int bins in [0, bins): uniform between low and high, clipped."""
    u = (np.asarray(chunk, np.float64) - low) / np.maximum(high - low, 1e-8)
    return np.clip(np.floor(u * bins), 0, bins - 1).astype(np.int64)


def prompt_text(cfg: VLMJudgeConfig, image_token: str, instruction: np.ndarray,
                state: np.ndarray, bins: np.ndarray) -> str:
    """One prompt: instruction ids [L], state [S], the chunk's bins [H, A]."""
    return cfg.prompt.format(
        image=image_token, instruction=decode_instruction(instruction),
        state=" ".join(f"{x:.{cfg.state_decimals}f}" for x in np.asarray(state)),
        action=" ".join(str(int(b)) for b in np.asarray(bins).reshape(-1)))


# ---------------------------------------------------------------------------------------------
# the judge (torch)


def _require():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"verifier bradley_terry: backend=transformers needs the vlm extra "
                          f"(pip install -e '.[vlm]'): {e}") from None
    return torch, transformers


def torch_pair_losses(r_w, r_l, e_w, e_l, alpha: float):
    """``algos.bradley_terry.pair_losses`` in torch (the same logit, the same gradient)."""
    torch, _ = _require()
    gap = r_w - r_l
    return -torch.nn.functional.logsigmoid(gap - alpha * (torch.abs(e_w - e_l) - torch.abs(gap))
                                           ** 2)


class VLMJudge:
    """A reward head on a transformers VLM: ``scores(obs [n], chunks [n, H, A]) -> r [n]``."""

    def __init__(self, cfg: VLMJudgeConfig, model_dir: str, image: bool, low, high,
                 head: dict | None = None, seed: int = 0):
        torch, transformers = _require()
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"verifier bradley_terry: vlm.model_dir {model_dir!r} is not "
                                    "a directory (a save_pretrained model and processor)")
        self.cfg, self.image = cfg, image
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
        self.model.eval()
        self.model.requires_grad_(cfg.finetune == "all")
        torch.manual_seed(seed)
        hidden = self.model.config.get_text_config().hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.head.bias)
        if head is not None:
            self.head.load_state_dict(head)
        token = getattr(self.processor, "image_token", None)
        if image and token is None:
            raise ValueError(f"verifier bradley_terry: the processor in {model_dir!r} has no "
                             "image token; the policy reads images")
        self.image_token = token if image else ""
        self.fields = ("state", "instruction") + (("image",) if image else ())
        """the observation fields the prompts read"""

    def parameters(self):
        if self.cfg.finetune == "all":
            return [*self.model.parameters(), *self.head.parameters()]
        return list(self.head.parameters())

    def prompts(self, obs: dict, chunks: np.ndarray) -> list[str]:
        bins = discretise(chunks, self.low, self.high, self.cfg.action_bins)
        return [prompt_text(self.cfg, self.image_token, obs["instruction"][i], obs["state"][i],
                            bins[i]) for i in range(len(bins))]

    def forward(self, obs: dict, chunks: np.ndarray):
        """Rewards [n] as a torch tensor (differentiable)."""
        torch, _ = _require()
        text = self.prompts(obs, chunks)
        images = list(np.asarray(obs["image"])) if self.image else None
        inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True)
        out = self.model(**inputs, output_hidden_states=True)
        last = out.hidden_states[-1]  # [n, T, hidden]
        mask = inputs["attention_mask"]
        idx = (mask * torch.arange(mask.shape[1])).argmax(1)  # the last real token, either pad side
        return self.head(last[torch.arange(len(idx)), idx].float())[:, 0]

    def scores(self, obs: dict, chunks: np.ndarray) -> np.ndarray:
        torch, _ = _require()
        n, step = len(chunks), self.cfg.score_batch
        with torch.no_grad():
            parts = [self.forward({k: v[i:i + step] for k, v in obs.items()}, chunks[i:i + step])
                     for i in range(0, n, step)]
        return torch.cat(parts).numpy().astype(np.float32)

    def save(self, path: str) -> None:
        """The head, the discretisation and (finetune=all) the model, into ``path`` at once."""
        torch, _ = _require()
        with atomic_dir(path) as tmp:
            torch.save(self.head.state_dict(), os.path.join(tmp, "head.pt"))
            write_json(os.path.join(tmp, "judge.json"), {
                "image": self.image, "low": self.low.tolist(), "high": self.high.tolist()})
            if self.cfg.finetune == "all":
                self.model.save_pretrained(os.path.join(tmp, "model"))
                self.processor.save_pretrained(os.path.join(tmp, "model"))


def load_judge(cfg: VLMJudgeConfig, path: str) -> VLMJudge:
    """The judge ``VLMJudge.save`` wrote to ``path``."""
    torch, _ = _require()
    with open(os.path.join(path, "judge.json"), encoding="utf-8") as f:
        meta = json.load(f)
    own = os.path.join(path, "model")
    head = torch.load(os.path.join(path, "head.pt"), weights_only=True)
    return VLMJudge(cfg, own if os.path.isdir(own) else cfg.model_dir, meta["image"],
                    meta["low"], meta["high"], head)


def train_judge(judge: VLMJudge, pairs: dict, obs: dict, learner: Any, log=None) -> list[dict]:
    """AdamW on the margin loss (``learner``: ``algos.bradley_terry.BTConfig``), batches of
    pairs drawn uniformly with replacement as the JAX learner does. ``pairs``: state (row into
    ``obs``), win, lose, e_w, e_l, valid, over the training pairs. -> one row per
    ``updates_per_call`` updates."""
    torch, _ = _require()
    gen = np.random.default_rng(learner.seed)
    params = judge.parameters()
    opt = torch.optim.AdamW(params, lr=learner.lr, weight_decay=learner.weight_decay)
    warm = lambda s: min(1.0, (s + 1) / learner.warmup) if learner.warmup else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    judge.model.train(judge.cfg.finetune == "all")
    history, acc = [], []
    for step in range(1, learner.steps + 1):
        b = gen.integers(0, len(pairs["e_w"]), learner.batch_size)
        o = {k: np.asarray(v)[pairs["state"][b]] for k, v in obs.items()}
        both = {k: np.concatenate([v, v]) for k, v in o.items()}
        r = judge.forward(both, np.concatenate([pairs["win"][b], pairs["lose"][b]]))
        r_w, r_l = r[:len(b)], r[len(b):]
        w, e_w, e_l = (torch.as_tensor(np.asarray(pairs[k][b], np.float32))
                       for k in ("valid", "e_w", "e_l"))
        losses = torch_pair_losses(r_w, r_l, e_w, e_l, learner.alpha)
        loss = (w * losses).sum() / w.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        right = ((r_w > r_l).float() * w).sum() / w.sum().clamp(min=1.0)
        acc.append((loss.item(), right.item()))
        if step % learner.updates_per_call == 0 or step == learner.steps:
            row = {"step": step, "loss": float(np.mean([a[0] for a in acc])),
                   "accuracy": float(np.mean([a[1] for a in acc]))}
            history.append(row)
            acc = []
            if log is not None:
                log(row)
    judge.model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# the verifier


class VLMJudgeVerifier:
    """score = the VLM judge's reward for every candidate, computed on the host."""

    name = "bradley_terry"
    requires: tuple[str, ...] = ()
    state = None

    def __init__(self, judge: VLMJudge):
        self.judge = judge

    def _host(self, obs: dict, chunks: np.ndarray) -> np.ndarray:
        lead, (M, H, A) = chunks.shape[:-3], chunks.shape[-3:]
        n = int(np.prod(lead, dtype=np.int64))
        per = {k: np.repeat(np.asarray(v).reshape(n, *v.shape[len(lead):]), M, axis=0)
               for k, v in obs.items()}
        return self.judge.scores(per, chunks.reshape(n * M, H, A)).reshape(*lead, M)

    def score(self, vstate: Any, obs: dict, candidates, key: jax.Array) -> jax.Array:
        fields = self.judge.fields
        missing = [f for f in fields if f not in obs]
        if missing:
            raise ValueError(f"verifier bradley_terry (backend=transformers): obs lacks {missing}")
        chunks = candidates.actions
        out = jax.ShapeDtypeStruct(chunks.shape[:1], jnp.float32)
        return jax.pure_callback(self._host, out, {f: obs[f] for f in fields}, chunks,
                                 vmap_method="broadcast_all")

"""RoboMonkey's verifier: a reward model r(obs, chunk) trained with the margin Bradley–Terry loss
(``algos.bradley_terry``) on synthetic preferences between the base policy's own samples
(``verifiers.preferences``), used to rank candidate chunks (argmax).

The judge is a small vision-language-action transformer in the shape of RoboMonkey's: the
observation prefix as the policy encodes it (image patches when the policy sees images, the
instruction's tokens, the state's entity tokens; ``policies.layers.PrefixEmbed`` at the judge's
own width), then one token per step of the chunk and a final readout token whose last hidden
state a linear head maps to the scalar reward. The prefix attends only to itself, so at a
decision it is encoded once and its keys and values are shared by all M candidates.

Preferences: at up to ``states`` decision states of the demonstrations, N policy samples are
clustered to K representatives, whose K (K - 1) / 2 pairs are ranked by normalised RMSE to a
reference chunk (``reference``: the dataset's chunk, RoboMonkey's, or pi*'s), per-dimension
scale = the dataset's action std. The pairs are written to ``OUT/preferences.npz`` with a
manifest; pairs of a held-out share of the episodes measure the judge (``fit_info.json``:
accuracy overall and by RMSE-gap quartile, the correlation of score gaps with RMSE gaps, and
for the dataset reference the labels' own ceiling: a dataset chunk is one draw from the data's
mixture at that state, so even a perfect judge cannot call every pair).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from algos.base import fitted_config
from algos.bradley_terry import BTConfig, gap_correlation, pair_scores, train_bt
from core.checkpoint import restore_pytree, save_pytree
from core.config import to_dict
from core.io import write_json, write_npz
from envs.demos import pi_star_chunks
from policies.base import Candidates, reads_images, sample_at_states
from policies.layers import (
    PREFIX_FIELDS,
    Block,
    PrefixEmbed,
    batch_obs,
    jit_init,
    prefix_obs_fields,
)
from verifiers.base import BuildContext, VerifierPlugin
from verifiers.preferences import dataset_scale, label_predictability, synthetic_preferences
from verifiers.registry import register
from verifiers.vlm_judge import VLMJudgeConfig

REFERENCES = ("dataset", "pi_star")
BACKENDS = ("native", "transformers")


@dataclass(frozen=True)
class JudgeConfig:
    width: int = 64
    depth: int = 2
    heads: int = 4


@dataclass(frozen=True)
class BradleyTerryConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    learner: BTConfig = field(default_factory=lambda: BTConfig(steps=3000, batch_size=128))
    """the margin Bradley–Terry loss and its optimisation (``algos.bradley_terry.BTConfig``)"""
    samples: int = 16
    """N policy samples per state"""
    representatives: int = 4
    """K k-means representatives per state; K (K - 1) / 2 pairs each"""
    states: int = 20000
    """decision states of the demonstrations that get preferences (at most; the default
    pick_place dataset has 12.8k, all used: the judge overfits a few thousand)"""
    reference: str = "dataset"
    """what a pair's winner is closer to: the dataset's chunk at the state (RoboMonkey's
    choice; it rewards whatever mode the data holds there) or pi_star, the successful expert's
    chunk from that state (``envs.demos.pi_star_chunks``; the built-in suite only)"""
    heldout: float = 0.1
    """share of episodes whose pairs are held out of training to measure the judge"""
    predictability_samples: int = 32
    """R more policy samples per state that stand in for the data's chunk distribution there:
    the share of them closer to the winner says how predictable each label is, and caps the
    judge's reachable accuracy (``verifiers.preferences.label_predictability``; 0 = skip)"""
    backend: str = "native"
    """native: the judge below, in JAX; transformers: a reward head on a local Hugging Face
    VLM (``verifiers.vlm_judge``, options under ``vlm``; the ``vlm`` extra)"""
    vlm: VLMJudgeConfig = field(default_factory=VLMJudgeConfig)

    def __post_init__(self):
        for name in ("samples", "representatives", "states"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"verifier bradley_terry: {name} must be a positive int, got "
                                 f"{v!r}")
        if not 2 <= self.representatives <= self.samples:
            raise ValueError(f"verifier bradley_terry: representatives must be in [2, samples="
                             f"{self.samples}], got {self.representatives}")
        if not 0.0 <= self.heldout < 1.0:
            raise ValueError(f"verifier bradley_terry: heldout must be in [0, 1), got "
                             f"{self.heldout!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"verifier bradley_terry: reference must be one of {REFERENCES}, "
                             f"got {self.reference!r}")
        r = self.predictability_samples
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"verifier bradley_terry: predictability_samples must be an int "
                             f">= 0, got {r!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"verifier bradley_terry: backend must be one of {BACKENDS}, got "
                             f"{self.backend!r}")
        if self.backend == "transformers" and not self.vlm.model_dir:
            raise ValueError("verifier bradley_terry: backend=transformers needs vlm.model_dir, "
                             "a local directory with a save_pretrained model and processor")


class JudgeNet(nn.Module):
    """(observation prefix, chunk) -> reward; the prefix is cached across candidates."""

    prefix: PrefixEmbed
    width: int
    depth: int
    heads: int
    horizon: int

    def setup(self):
        self.blocks = [Block(self.width, self.heads) for _ in range(self.depth)]
        self.action_in = nn.Dense(self.width)
        self.action_pos = self.param("action_pos", nn.initializers.normal(0.02),
                                     (self.horizon + 1, self.width))  # + the readout token
        self.readout = self.param("readout", nn.initializers.normal(0.02), (self.width,))
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(1, bias_init=nn.initializers.zeros)

    def encode(self, obs):
        """obs [B, ...] -> per block (k, v) [B, N, h, d], and the prefix mask [B, N]."""
        x, mask = self.prefix(obs)
        kvs = []
        for block in self.blocks:
            x, kv = block(x, mask)
            kvs.append(kv)
        return kvs, mask

    def score(self, kvs, mask, chunks):
        """chunks [B, H, A] against a cache of batch B (or unbatched, shared) -> r [B]."""
        b = chunks.shape[0]
        x = jnp.concatenate([self.action_in(chunks),
                             jnp.broadcast_to(self.readout, (b, 1, self.width))], 1)
        x = x + self.action_pos
        own = jnp.ones((b, x.shape[1]), bool)
        for block, kv in zip(self.blocks, kvs, strict=True):
            x, _ = block(x, own, extra_kv=(kv,), extra_masks=(mask,))
        return self.head(self.norm(x[:, -1]))[:, 0]

    def __call__(self, obs, chunks):
        kvs, mask = self.encode(obs)
        return self.score(kvs, mask, chunks)


@functools.cache
def make_judge(cfg: JudgeConfig, policy_cfg: Any, horizon: int) -> JudgeNet:
    """One module object per configuration, so ``apply`` below is the same callable for every
    fit of it (it is static under jit) and training compiles once."""
    fields = {f: getattr(policy_cfg, f) for f in PREFIX_FIELDS if f != "width"}
    return JudgeNet(PrefixEmbed(width=cfg.width, **fields), cfg.width, cfg.depth, cfg.heads,
                    horizon)


@functools.cache
def judge_apply(net: JudgeNet):
    """``apply(params, {"obs", "chunk"}) -> r [B]``, the learner's model interface."""
    return lambda params, x: net.apply({"params": params}, x["obs"], x["chunk"])


class BradleyTerryVerifier:
    """score = r(obs, chunk) for every candidate; higher = better."""

    name = "bradley_terry"
    requires: tuple[str, ...] = ()

    def __init__(self, state: Any, net: JudgeNet):
        self.state, self.net = state, net

    def score(self, vstate: Any, obs: dict, candidates: Candidates,
              key: jax.Array) -> jax.Array:
        one = batch_obs(obs, self.net.prefix.image)
        kvs, mask = self.net.apply({"params": vstate}, one, method=JudgeNet.encode)
        shared = jax.tree.map(lambda x: x[0], kvs)  # one prefix for all M candidates
        return self.net.apply({"params": vstate}, shared, mask[0], candidates.actions,
                              method=JudgeNet.score)


def _init(cfg: BradleyTerryConfig, ctx: BuildContext, key: jax.Array):
    """An unfitted judge of the fitted one's size, from the env spec's example observation
    (backend transformers: the model with a fresh head, actions binned over [-1, 1])."""
    if cfg.backend == "transformers":
        from verifiers.vlm_judge import VLMJudge, VLMJudgeVerifier

        A = ctx.env.spec.action_dim
        return VLMJudgeVerifier(VLMJudge(cfg.vlm, cfg.vlm.model_dir, reads_images(ctx.policy),
                                         -np.ones(A), np.ones(A)))
    net = make_judge(cfg.judge, ctx.policy.cfg, ctx.policy.horizon)
    one = batch_obs(ctx.env.spec.example_obs(), net.prefix.image)
    chunk = jnp.zeros((1, ctx.policy.horizon, ctx.env.spec.action_dim))
    params = jit_init(net)(key, one, chunk)["params"]
    return BradleyTerryVerifier(params, net)


def make_preferences(cfg: BradleyTerryConfig, policy: Any, params: Any, ch: dict,
                     key: jax.Array, pi_star: np.ndarray | None = None) -> dict:
    """Synthetic preference pairs at the decision states of the demonstrations' chunked view
    ``ch`` (``demos.chunks(policy.horizon)``) -> dict of [S·P, ...]: state (row into ch's obs),
    episode, win and lose chunks [H, A], e_w, e_l, valid (False for ties), and (dataset
    reference) p_win. ``pi_star`` [N, H, A], row-aligned with ch: rank against it instead of
    the dataset's chunk."""
    H = policy.horizon
    rows = np.flatnonzero(ch["decision"])
    k_rows, k_samp, k_km = jax.random.split(key, 3)
    if len(rows) > cfg.states:
        rows = np.sort(np.asarray(jax.random.choice(k_rows, rows, (cfg.states,), replace=False)))
    obs = jax.tree.map(lambda x: np.asarray(x)[rows], ch["obs"])
    drawn = sample_at_states(policy, params, obs, k_samp,
                             cfg.samples + cfg.predictability_samples)  # [S, N + R, H, A]
    samples, more = drawn[:, :cfg.samples], jnp.asarray(drawn[:, cfg.samples:])
    if pi_star is None:
        ref, valid = jnp.asarray(ch["actions"][rows]), jnp.asarray(ch["valid"][rows])
    else:  # the expert's hypothetical chunk: all H steps are real
        ref, valid = jnp.asarray(pi_star[rows]), jnp.ones((len(rows), H), bool)
    scale = dataset_scale(jnp.asarray(ch["actions"]), jnp.asarray(ch["valid"]))
    one_state = lambda s, r, k, v: synthetic_preferences(s, r, scale, k, K=cfg.representatives,
                                                         valid=v)
    prefs = jax.jit(jax.vmap(one_state))(jnp.asarray(samples), ref,
                                         jax.random.split(k_km, len(rows)), valid)
    P = prefs["win"].shape[1]
    take = lambda idx: np.take_along_axis(samples, np.asarray(idx)[..., None, None], 1)
    win, lose = take(prefs["win"]), take(prefs["lose"])  # [S, P, H, A]
    out = {"state": np.repeat(rows, P).astype(np.int64),
           "episode": np.repeat(ch["episode"][rows], P),
           "win": win.reshape(-1, H, samples.shape[-1]),
           "lose": lose.reshape(-1, H, samples.shape[-1]),
           "e_w": np.asarray(prefs["e_w"]).reshape(-1),
           "e_l": np.asarray(prefs["e_l"]).reshape(-1),
           "valid": np.asarray(prefs["valid"]).reshape(-1),
           "scale": np.asarray(scale)}
    if cfg.predictability_samples and pi_star is None:  # pi*'s chunk is not a random draw
        per_pair = jax.vmap(label_predictability, in_axes=(0, 0, None, None, None))
        p = jax.jit(jax.vmap(per_pair, in_axes=(0, 0, 0, None, 0)))(
            jnp.asarray(win), jnp.asarray(lose), more, scale, valid)
        out["p_win"] = np.asarray(p).reshape(-1)
    return out


def _pair_inputs(prefs: dict, obs: dict, fields: tuple[str, ...], sel: np.ndarray) -> dict:
    o = {k: jnp.asarray(np.asarray(obs[k])[prefs["state"][sel]]) for k in fields}
    return {"win": {"obs": o, "chunk": jnp.asarray(prefs["win"][sel])},
            "lose": {"obs": o, "chunk": jnp.asarray(prefs["lose"][sel])},
            "e_w": jnp.asarray(prefs["e_w"][sel]), "e_l": jnp.asarray(prefs["e_l"][sel]),
            "valid": jnp.asarray(prefs["valid"][sel])}


def heldout_metrics(r_w: np.ndarray, r_l: np.ndarray, pairs: dict, bins: int = 4,
                    p_win: np.ndarray | None = None) -> dict:
    """Accuracy over the valid held-out pairs, overall and by RMSE-gap quantile bin (RoboMonkey
    reports accuracy rising with the gap), and the score-gap / RMSE-gap correlation. With each
    pair's ``p_win`` (``label_predictability``), also the ceiling: the accuracy a judge that
    knew the reference's distribution would expect, mean max(p, 1 - p), overall and per bin.
    r_w, r_l [P]: the judge's scores of the pairs' winners and losers; pairs: e_w, e_l, valid."""
    r_w, r_l = np.asarray(r_w), np.asarray(r_l)
    v = np.asarray(pairs["valid"])
    gap = np.asarray(pairs["e_l"] - pairs["e_w"])[v]
    right = (r_w > r_l)[v]
    cap = None if p_win is None else np.maximum(p_win, 1 - p_win)[v]
    edges = np.quantile(gap, np.linspace(0, 1, bins + 1)) if len(gap) else np.zeros(bins + 1)
    which = np.clip(np.searchsorted(edges, gap, side="right") - 1, 0, bins - 1)
    mean = lambda x, m=slice(None): float(x[m].mean()) if x[m].size else float("nan")
    out = {"pairs": int(v.sum()), "accuracy": mean(right),
           "gap_corr": float(gap_correlation(r_w, r_l, jnp.asarray(pairs["e_w"]),
                                             jnp.asarray(pairs["e_l"]),
                                             jnp.asarray(pairs["valid"]))),
           "by_gap": [{"gap_lo": float(edges[b]), "gap_hi": float(edges[b + 1]),
                       "pairs": int((which == b).sum()), "accuracy": mean(right, which == b)}
                      for b in range(bins)]}
    if cap is not None:
        out["ceiling"] = mean(cap)
        for b, row in enumerate(out["by_gap"]):
            row["ceiling"] = mean(cap, which == b)
    return out


def _train_native(cfg: BradleyTerryConfig, ctx: BuildContext, prefs: dict, ch: dict,
                  train_sel: np.ndarray, keys: tuple, log):
    """The JAX judge on the pairs ``train_sel`` -> (history, held-out scorer, saver); keys:
    (init, training)."""
    k_init, k_train = keys
    shell = _init(cfg, ctx, k_init)
    apply, fields = judge_apply(shell.net), prefix_obs_fields(shell.net.prefix.image)
    pairs = lambda sel: _pair_inputs(prefs, ch["obs"], fields, sel)
    state, history = train_bt(apply, shell.state, pairs(train_sel), cfg.learner, k_train, log)
    judge = state.train.params
    return (history, lambda sel: pair_scores(apply, judge, pairs(sel)),
            lambda out: save_pytree(os.path.join(out, "judge"), judge))


def _train_vlm(cfg: BradleyTerryConfig, ctx: BuildContext, prefs: dict, ch: dict,
               train_sel: np.ndarray, keys: tuple, log):
    """The transformers backend (``verifiers.vlm_judge``); torch draws from ``learner.seed``
    instead of ``keys``."""
    from verifiers.vlm_judge import VLMJudge, action_bounds, train_judge

    judge = VLMJudge(cfg.vlm, cfg.vlm.model_dir, reads_images(ctx.policy),
                     *action_bounds(ch["actions"], ch["valid"]), seed=cfg.learner.seed)
    obs = {f: np.asarray(ch["obs"][f]) for f in judge.fields}
    pick = lambda sel: {k: prefs[k][sel] for k in ("state", "win", "lose", "e_w", "e_l", "valid")}
    history = train_judge(judge, pick(train_sel), obs, cfg.learner, log)

    def held_scores(sel):
        o = {k: v[prefs["state"][sel]] for k, v in obs.items()}
        return judge.scores(o, prefs["win"][sel]), judge.scores(o, prefs["lose"][sel])

    return history, held_scores, lambda out: judge.save(os.path.join(out, "vlm_judge"))


def _fit(cfg: BradleyTerryConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    k_pref, k_split, k_init, k_train = jax.random.split(key, 4)
    ch = demos.chunks(ctx.policy.horizon)
    pi_star = pi_star_chunks(demos, ctx.policy.horizon) if cfg.reference == "pi_star" else None
    prefs = make_preferences(cfg, ctx.policy, params, ch, k_pref, pi_star)
    write_npz(os.path.join(out, "preferences.npz"), prefs)
    episodes = np.unique(prefs["episode"])
    n_held = int(round(cfg.heldout * len(episodes)))
    held = np.asarray(jax.random.permutation(k_split, episodes))[:n_held]
    is_held = np.isin(prefs["episode"], held)
    write_json(os.path.join(out, "preferences.json"), {
        "pairs": int(len(prefs["e_w"])), "ties": int((~prefs["valid"]).sum()),
        "states": int(len(np.unique(prefs["state"]))), "samples": cfg.samples,
        "representatives": cfg.representatives, "reference": cfg.reference,
        "scale": prefs["scale"].tolist(), "heldout_episodes": int(n_held),
        "heldout_pairs": int(is_held.sum())})

    train_sel, held_sel = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    every = max(1, cfg.learner.steps // (10 * cfg.learner.updates_per_call))

    def log(row):
        if (row["step"] // cfg.learner.updates_per_call) % every == 0 \
                or row["step"] == cfg.learner.steps:
            print(f"bradley_terry {row['step']}/{cfg.learner.steps}: loss {row['loss']:.4f} "
                  f"accuracy {row['accuracy']:.3f}"
                  + (f" gap_corr {row['gap_corr']:.3f}" if "gap_corr" in row else ""), flush=True)

    train = _train_vlm if cfg.backend == "transformers" else _train_native
    history, held_scores, save = train(cfg, ctx, prefs, ch, train_sel, (k_init, k_train), log)
    info = {"history": history}
    if len(held_sel):
        info["heldout"] = h = heldout_metrics(
            *held_scores(held_sel), {k: prefs[k][held_sel] for k in ("e_w", "e_l", "valid")},
            p_win=prefs["p_win"][held_sel] if "p_win" in prefs else None)
        print(f"bradley_terry: held-out accuracy {h['accuracy']:.3f} on {h['pairs']} pairs "
              f"(by RMSE-gap quartile: {[round(b['accuracy'], 3) for b in h['by_gap']]}), "
              f"gap correlation {h['gap_corr']:.3f}"
              + (f", label ceiling {h['ceiling']:.3f} (by quartile: "
                 f"{[round(b['ceiling'], 3) for b in h['by_gap']]})" if "ceiling" in h else ""))
    save(out)
    write_json(os.path.join(out, "fit_info.json"), info)
    write_json(os.path.join(out, "config.json"), to_dict(cfg))


def _build(cfg: BradleyTerryConfig, ctx: BuildContext):
    fitted = fitted_config(ctx, BradleyTerryConfig, "verifier bradley_terry",
                           "steerlab fit-verifier bradley_terry")
    if fitted.backend == "transformers":
        from verifiers.vlm_judge import VLMJudgeVerifier, load_judge

        return VLMJudgeVerifier(load_judge(fitted.vlm, os.path.join(ctx.fitted_dir,
                                                                    "vlm_judge")))
    shell = _init(fitted, ctx, jax.random.PRNGKey(0))
    return BradleyTerryVerifier(
        restore_pytree(os.path.join(ctx.fitted_dir, "judge"), shell.state), shell.net)


register(VerifierPlugin(BradleyTerryVerifier, build=_build, config=BradleyTerryConfig,
                        fit=_fit, init=_init))

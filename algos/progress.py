"""A learned task-progress estimator p(obs) in [0, 1], regressed on demonstrations.

TT-VLA's reward is the progress increment r_t = p_{t+1} - p_t (``algos.ttvla``). The tabletop
suite reports ``info["progress"]``; a simulator that does not needs an estimate of it. This
module fits one from a demonstration dataset (``envs.dataset``): a small MLP on the observation's
``state``, the mean embedding of the instruction's tokens and a task embedding, with a sigmoid
output, trained with MSE.

Labels. A dataset row holds the observation an action was taken at and ``progress`` *after* that
action (``envs.experts.rollout``). The progress of the observed state is the previous row's
label in the same episode, so ``state_progress`` shifts the labels by one step and drops each
episode's first row, whose state's progress is not stored. Training on the unshifted labels
would predict the progress the data's mixture of experts is expected to reach next, not the
progress of the state, and shift the reward by one step.

Splits are by episode (``split_episodes``, seeded), so held-out rows come from unseen episodes.
Updates run as a ``lax.scan`` of ``updates_per_call`` Adam steps per jitted call, as
``algos.bradley_terry``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from core.checkpoint import restore_pytree, save_pytree
from core.config import from_dict, to_dict
from core.io import BadFileError, missing, read_json_object, write_json
from core.stats import spearman
from envs.experts import ALL_MODES

KIND = "progress_estimator"  # written into estimator.json; load_progress checks it
_EVAL_CHUNK = 8192  # rows per compiled prediction call in evaluate_progress (one shape)


@dataclass(frozen=True)
class ProgressConfig:
    width: int = 256
    """hidden width of the MLP"""
    depth: int = 3
    """hidden layers of the MLP"""
    embed_dim: int = 16
    """width of the instruction-token and task embeddings"""
    steps: int = 4000
    """Adam updates"""
    batch_size: int = 256
    """rows per update, drawn uniformly with replacement from the training episodes"""
    lr: float = 1e-3
    """peak Adam learning rate (cosine decay to 0 over ``steps``)"""
    updates_per_call: int = 200
    """updates per jitted call (one lax.scan); one loss-curve row per call"""
    seed: int = 0
    """seed of the episode split, the initialisation and the batches"""
    holdout: float = 0.1
    """fraction of episodes held out for evaluation (0 = train on all)"""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in ("width", "depth", "embed_dim", "steps", "batch_size", "updates_per_call"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ProgressConfig.{f} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ProgressConfig.seed must be an int >= 0, got {self.seed!r}")
        if not self.lr > 0:  # also rejects NaN
            raise ValueError(f"ProgressConfig.lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"ProgressConfig.holdout must be in [0, 1) (a fraction of "
                             f"episodes), got {self.holdout!r}")


class ProgressNet(nn.Module):
    """obs dict with any leading axes [...] -> progress [...] in [0, 1].

    Reads ``state``, ``instruction`` and ``task_id`` only. The clock (``obs["time"]``, t / T) is
    left out on purpose: in demonstrations progress grows with elapsed time, so a model that sees
    the clock would pay a progress reward for waiting. The tabletop ``state`` holds no clock
    entry (``TabletopEnv.state_vector``)."""

    width: int
    depth: int
    embed_dim: int
    vocab_size: int
    num_tasks: int

    @nn.compact
    def __call__(self, obs: dict) -> jax.Array:
        tokens = obs["instruction"].astype(jnp.int32)  # [..., L], 0 = padding
        mask = (tokens > 0).astype(jnp.float32)[..., None]
        words = nn.Embed(self.vocab_size, self.embed_dim, name="word")(tokens)
        instr = jnp.sum(words * mask, -2) / jnp.maximum(jnp.sum(mask, -2), 1.0)  # [..., E]
        task = nn.Embed(self.num_tasks, self.embed_dim, name="task")(
            obs["task_id"].astype(jnp.int32))
        x = jnp.concatenate([obs["state"].astype(jnp.float32), instr, task], -1)
        for _ in range(self.depth):
            x = nn.gelu(nn.Dense(self.width)(x))
        return jax.nn.sigmoid(nn.Dense(1)(x)[..., 0])


@struct.dataclass
class ProgressEstimator:
    params: Any
    net: ProgressNet = struct.field(pytree_node=False)
    config: ProgressConfig = struct.field(pytree_node=False)
    state_dim: int = struct.field(pytree_node=False)


def predict_progress(estimator: ProgressEstimator, obs: dict) -> jax.Array:
    """Progress of one observation (state [S], instruction [L], task_id []) -> f32 [], or of a
    batch with leading axes [...] -> f32 [...]. Pure and jittable; other obs keys are ignored."""
    for k in ("state", "instruction", "task_id"):
        if k not in obs:
            raise ValueError(f"obs is missing field {k!r}; the progress estimator reads state, "
                             "instruction and task_id")
    lead = jnp.shape(obs["task_id"])
    if jnp.shape(obs["state"])[:-1] != lead or jnp.shape(obs["instruction"])[:-1] != lead:
        raise ValueError(f"obs: leading axes differ (state {jnp.shape(obs['state'])}, "
                         f"instruction {jnp.shape(obs['instruction'])}, task_id {lead})")
    if jnp.shape(obs["state"])[-1] != estimator.state_dim:
        raise ValueError(f"obs: state has {jnp.shape(obs['state'])[-1]} entries, the estimator "
                         f"was fitted on {estimator.state_dim}")
    return estimator.net.apply(estimator.params, obs)


# ---------------------------------------------------------------------------------------------
# data


def state_progress(dataset) -> tuple[np.ndarray, np.ndarray]:
    """The progress of each row's observed state -> (labels f32 [N], valid bool [N]): the
    previous row's ``progress`` (recorded after its step) in the same episode; False on each
    episode's first row, whose state's progress is not stored."""
    progress = np.asarray(dataset.steps["progress"], np.float32)
    ep, t = dataset.steps["episode"], dataset.steps["t"]
    valid = np.zeros(len(progress), bool)
    valid[1:] = (ep[1:] == ep[:-1]) & (t[1:] == t[:-1] + 1)
    labels = np.zeros_like(progress)
    labels[1:] = progress[:-1]
    return np.where(valid, labels, 0.0).astype(np.float32), valid


def split_episodes(num_episodes: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of episode indices -> (train, held out), each sorted i64."""
    n_held = int(round(holdout * num_episodes))
    if holdout > 0:
        n_held = max(n_held, 1)
    if n_held >= num_episodes:
        raise ValueError(f"ProgressConfig.holdout={holdout} leaves no training episode out of "
                         f"{num_episodes}; lower it or give more episodes")
    perm = np.random.default_rng(seed).permutation(num_episodes)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def _rows(dataset, episodes) -> tuple[dict, np.ndarray, np.ndarray]:
    """(obs {state, instruction, task_id} [n, ...], labels [n], row indices [n]) of the
    labelled rows of ``episodes`` (None = all)."""
    labels, valid = state_progress(dataset)
    if episodes is not None:
        valid = valid & np.isin(dataset.steps["episode"], np.asarray(episodes))
    idx = np.flatnonzero(valid)
    obs = {k: dataset.steps[k][idx] for k in ("state", "instruction", "task_id")}
    return obs, labels[idx], idx


# ---------------------------------------------------------------------------------------------
# training


@functools.cache
def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """One object per (lr, steps): it is static in the jitted state, so a new one would
    recompile (another seed does not)."""
    return optax.adam(optax.cosine_decay_schedule(lr, steps))


def _loss(params, apply: Callable, batch: dict) -> jax.Array:
    return jnp.mean((apply(params, batch["obs"]) - batch["label"]) ** 2)


@functools.partial(jax.jit, static_argnames=("num_updates", "batch_size"))
def _train_steps(train: TrainState, data: dict, key: jax.Array, num_updates: int,
                 batch_size: int) -> tuple[TrainState, jax.Array]:
    """``num_updates`` Adam steps on uniformly drawn batches, as one scan -> (state, mean MSE)."""
    size = data["label"].shape[0]

    def body(st, k):
        idx = jax.random.randint(k, (batch_size,), 0, size)
        batch = jax.tree.map(lambda x: x[idx], data)
        loss, grads = jax.value_and_grad(_loss)(st.params, st.apply_fn, batch)
        return st.apply_gradients(grads=grads), loss

    train, losses = jax.lax.scan(body, train, jax.random.split(key, num_updates))
    return train, jnp.mean(losses)


def make_net(cfg: ProgressConfig, vocab_size: int, num_tasks: int) -> ProgressNet:
    return _net(cfg.width, cfg.depth, cfg.embed_dim, vocab_size, num_tasks)


@functools.cache
def _net(width: int, depth: int, embed_dim: int, vocab_size: int, num_tasks: int) -> ProgressNet:
    """One module object per size: its ``apply`` is static in the jitted train state, and an
    equal but new module would compile the training steps again (another seed must not)."""
    return ProgressNet(width=width, depth=depth, embed_dim=embed_dim, vocab_size=vocab_size,
                       num_tasks=num_tasks)


def fit_progress(dataset, cfg: ProgressConfig = ProgressConfig(),
                 log: Callable[[dict], Any] | None = None) -> ProgressEstimator:
    """Fits an estimator on the training episodes of ``split_episodes(E, cfg.holdout,
    cfg.seed)`` (the held-out ones are for ``evaluate_progress``). ``log(row)`` receives one
    loss-curve row {"step", "loss"} (mean training MSE over the call) per jitted call."""
    from envs.language import VOCAB
    from envs.tabletop import TASKS

    cfg.validate()
    train_eps, _ = split_episodes(dataset.num_episodes, cfg.holdout, cfg.seed)
    obs, labels, _ = _rows(dataset, train_eps)
    if len(labels) == 0:
        raise ValueError("dataset: no labelled steps in the training episodes (every episode "
                         "has a single step?)")
    # The suite's vocabulary and task count, so unseen words (paraphrases) still embed.
    net = make_net(cfg, max(len(VOCAB), int(obs["instruction"].max()) + 1),
                   max(len(TASKS), int(obs["task_id"].max()) + 1))
    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_train = jax.random.split(key)
    state_dim = int(obs["state"].shape[-1])
    params = net.init(k_init, _example_obs(state_dim))
    train = TrainState.create(apply_fn=net.apply, params=params, tx=_optimizer(cfg.lr, cfg.steps))
    train = train.replace(step=jnp.zeros((), jnp.int32))  # strongly typed: no second compile
    data = {"obs": jax.tree.map(jnp.asarray, obs), "label": jnp.asarray(labels)}
    done = 0
    while done < cfg.steps:
        n = min(cfg.updates_per_call, cfg.steps - done)
        train, loss = _train_steps(train, data, jax.random.fold_in(k_train, done), n,
                                   cfg.batch_size)
        done += n
        if log is not None:
            log({"step": done, "loss": float(loss)})
    return ProgressEstimator(params=train.params, net=net, config=cfg, state_dim=state_dim)


# ---------------------------------------------------------------------------------------------
# evaluation


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute error; NaN when empty."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    return float(np.mean(np.abs(pred - true))) if len(true) else float("nan")


@jax.jit
def _predict_jit(estimator: ProgressEstimator, obs: dict) -> jax.Array:
    return predict_progress(estimator, obs)


def predict_rows(estimator: ProgressEstimator, obs: dict) -> np.ndarray:
    """predict_progress over many rows [n, ...] in fixed-size chunks (one compilation) -> [n]."""
    n = len(obs["task_id"])
    out = []
    for i in range(0, n, _EVAL_CHUNK):
        part = {k: v[i:i + _EVAL_CHUNK] for k, v in obs.items()}
        pad = _EVAL_CHUNK - len(part["task_id"])
        part = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in part.items()}
        out.append(np.asarray(_predict_jit(estimator, part))[:_EVAL_CHUNK - pad])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _nan_to_none(x: float) -> float | None:
    return None if np.isnan(x) else x


def _group(pred, true, episode, select, pairs) -> dict:
    """Metrics of the rows ``select`` [n]: steps, episodes, MAE, Spearman, and the Spearman of
    the one-step increments p(s_{t+1}) - p(s_t) (the TT-VLA reward) from the selected rows;
    ``pairs`` [n - 1] marks rows whose next row is the next step of the same episode."""
    p, y = pred[select], true[select]
    inc = pairs & select[:-1]
    return {"steps": int(len(y)), "episodes": int(len(np.unique(episode[select]))),
            "mae": _nan_to_none(mae(p, y)), "spearman": _nan_to_none(spearman(p, y)),
            "increment_spearman": _nan_to_none(spearman(np.diff(pred)[inc],
                                                        np.diff(true)[inc]))}


def evaluate_progress(estimator: ProgressEstimator, dataset, episodes=None) -> dict:
    """Accuracy against the true progress of the observed states (``state_progress``) on
    ``episodes`` (indices; None = all) -> {"overall", "modes": {mode name: ...}, "outcome":
    {"success", "failed"}}, each {"steps", "episodes", "mae", "spearman",
    "increment_spearman"} (None where undefined); "overall" adds ``constant_mae``, the MAE of
    the best constant (the labels' median) for reference. A step's mode is the expert mode
    acting at that state (``envs.experts.ALL_MODES``); outcome is its episode's."""
    obs, true, idx = _rows(dataset, episodes)
    pred = predict_rows(estimator, obs)
    episode = dataset.steps["episode"][idx]
    mode = dataset.steps["mode"][idx]
    ok = np.asarray(dataset.episodes["success"], bool)[episode]
    pairs = np.diff(idx) == 1  # labelled rows are the episode's steps from t = 1 on, in order
    group = lambda select: _group(pred, true, episode, select, pairs)
    overall = group(np.ones(len(idx), bool))
    overall["constant_mae"] = _nan_to_none(mae(np.full(len(true), np.median(true)), true)
                                           if len(true) else float("nan"))
    return {
        "overall": overall,
        "modes": {ALL_MODES[m]: group(mode == m)
                  for m in np.unique(mode) if 0 <= m < len(ALL_MODES)},
        "outcome": {name: group(sel)
                    for name, sel in (("success", ok), ("failed", ~ok)) if sel.any()},
    }


# ---------------------------------------------------------------------------------------------
# save / load


def save_progress(estimator: ProgressEstimator, out_dir: str) -> str:
    """Writes out_dir/{params/ (orbax), estimator.json}; estimator.json last, so a directory
    that has it holds a finished estimator."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    net = estimator.net
    save_pytree(os.path.join(out_dir, "params"), estimator.params)
    write_json(os.path.join(out_dir, "estimator.json"), {
        "kind": KIND, "config": to_dict(estimator.config),
        "vocab_size": net.vocab_size, "num_tasks": net.num_tasks,
        "state_dim": estimator.state_dim})
    return out_dir


def load_progress(run_dir: str) -> ProgressEstimator:
    """The estimator ``save_progress`` wrote into ``run_dir``; errors name the directory."""
    remedy = "fit one with `steerlab fit-progress --demos DIR --out DIR`"
    if not os.path.isdir(run_dir):
        raise missing(run_dir, "progress estimator directory", remedy)
    path = os.path.join(run_dir, "estimator.json")
    if not os.path.isfile(path):
        raise missing(run_dir, "progress estimator (estimator.json)", remedy)
    meta = read_json_object(path, remedy)
    if meta.get("kind") != KIND:
        raise BadFileError(f"{path}: not a progress estimator (kind {meta.get('kind')!r}, "
                           f"expected {KIND!r}); {remedy}")
    try:
        cfg = from_dict(ProgressConfig, meta["config"])
        net = make_net(cfg, int(meta["vocab_size"]), int(meta["num_tasks"]))
        state_dim = int(meta["state_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadFileError(f"{path}: unreadable progress estimator ({e!r}); {remedy}") from None
    # restored into the network's own structure, so a checkpoint of another shape is an error
    template = jax.eval_shape(net.init, jax.random.PRNGKey(0), _example_obs(state_dim))
    params = restore_pytree(os.path.join(run_dir, "params"), template, remedy)
    return ProgressEstimator(params=params, net=net, config=cfg, state_dim=state_dim)


def _example_obs(state_dim: int) -> dict:
    # the instruction is mean-pooled, so its length does not shape the parameters
    return {"state": jnp.zeros((1, state_dim), jnp.float32),
            "instruction": jnp.zeros((1, 1), jnp.int32), "task_id": jnp.zeros((1,), jnp.int32)}

"""Bradley–Terry reward learning on preference pairs, with RoboMonkey's preference-level margin
(Kwok et al. 2025; METHODS.md 3.2, monkey-verifier ``RewardModelTrainer.compute_loss``).

For a pair with winner W and loser L, model scores r_W, r_L and normalised RMSEs e_W <= e_L to a
reference chunk (``verifiers.preferences``):

    loss = -log σ( (r_W - r_L) - α (|e_W - e_L| - |r_W - r_L|)² )

α = 0.1 as released; α = 0 is plain Bradley–Terry. The penalty lowers the logit whenever the
predicted gap misses the RMSE gap, so the judge learns calibrated margins, not only an order. As
released, the gradient flows through both occurrences of r_W - r_L (no stop-gradient).

The learner is generic in the model: ``apply(params, inputs) -> r [B]`` with params any pytree
and inputs a pytree with leading axis B. Pair data is a dict: ``win`` and ``lose`` (input pytrees
[P, ...]), ``e_w`` and ``e_l`` f32 [P], and optionally ``valid`` bool [P] (pairs with False weigh
zero, e.g. the ties of ``preference_pairs``). Updates run as a ``lax.scan`` of
``updates_per_call`` AdamW steps per jitted call on uniformly drawn batches, as algos/calql.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState


@dataclass(frozen=True)
class BTConfig:
    alpha: float = 0.1
    """weight of the preference-level margin penalty (RoboMonkey 0.1; 0 = plain Bradley–Terry)"""
    lr: float = 3e-4
    """AdamW learning rate (RoboMonkey's LoRA on a 7B backbone used 2e-5; a small judge is not
    a 7B model)"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (RoboMonkey: 0)"""
    warmup: int = 0
    """linear learning-rate warm-up steps (RoboMonkey: 3% of training, then constant)"""
    batch_size: int = 256
    """pairs per update, drawn uniformly with replacement"""
    steps: int = 5000
    updates_per_call: int = 100
    """updates per jitted call (one lax.scan); one metrics row per call"""
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in ("batch_size", "steps", "updates_per_call"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BTConfig.{f} must be an int >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"BTConfig.warmup must be an int >= 0, got {self.warmup!r}")
        if not self.alpha >= 0:  # also rejects NaN
            raise ValueError(f"BTConfig.alpha must be >= 0 (0 = plain Bradley–Terry), got "
                             f"{self.alpha!r}")
        if not self.lr > 0:
            raise ValueError(f"BTConfig.lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"BTConfig.weight_decay must be >= 0, got {self.weight_decay!r}")


# ---------------------------------------------------------------------------------------------
# the loss and the metrics evaluation reuses (all [P] -> scalar; valid [P] weighs pairs)


def pair_losses(r_w, r_l, e_w, e_l, alpha: float = 0.1) -> jax.Array:
    """Per-pair loss [P]; log_sigmoid keeps it finite for large negative logits."""
    gap = r_w - r_l
    logit = gap - alpha * (jnp.abs(e_w - e_l) - jnp.abs(gap)) ** 2
    return -jax.nn.log_sigmoid(logit)


def _weights(x, valid):
    w = jnp.ones_like(x) if valid is None else valid.astype(x.dtype)
    return w / jnp.maximum(w.sum(), 1.0)


def preference_loss(r_w, r_l, e_w, e_l, alpha: float = 0.1, valid=None) -> jax.Array:
    """Mean of ``pair_losses`` over the valid pairs."""
    losses = pair_losses(r_w, r_l, e_w, e_l, alpha)
    return jnp.sum(_weights(losses, valid) * losses)


def pairwise_accuracy(r_w, r_l, valid=None) -> jax.Array:
    """Share of valid pairs ranked right, r_W > r_L (a tie of scores counts as wrong)."""
    right = (r_w > r_l).astype(jnp.float32)
    return jnp.sum(_weights(right, valid) * right)


def gap_correlation(r_w, r_l, e_w, e_l, valid=None) -> jax.Array:
    """Pearson correlation of predicted gaps r_W - r_L with RMSE gaps e_L - e_W over the valid
    pairs; 0 when either has no spread (as the released metrics do)."""
    x, y = (r_w - r_l).astype(jnp.float32), (e_l - e_w).astype(jnp.float32)
    w = _weights(x, valid)
    xc, yc = x - jnp.sum(w * x), y - jnp.sum(w * y)
    vxy = jnp.sum(w * xc**2) * jnp.sum(w * yc**2)
    return jnp.where(vxy > 1e-20, jnp.sum(w * xc * yc) / jnp.sqrt(jnp.maximum(vxy, 1e-20)), 0.0)


# ---------------------------------------------------------------------------------------------
# the learner


@struct.dataclass
class BTState:
    train: TrainState  # params, AdamW state, step; apply_fn is the reward model
    config: BTConfig = struct.field(pytree_node=False)


@functools.cache
def optimizer(cfg: BTConfig) -> optax.GradientTransformation:
    """AdamW for ``cfg``, one object per config: the optimizer is a static field of the jitted
    state, so a fresh one per learner would recompile ``train_steps`` for every fit."""
    sched = optax.linear_schedule(0.0, cfg.lr, cfg.warmup) if cfg.warmup else cfg.lr
    return optax.adamw(sched, weight_decay=cfg.weight_decay)


def init_bt(apply: Callable, params: Any, cfg: BTConfig) -> BTState:
    """A fresh learner for the model ``apply(params, inputs) -> r [B]`` (pass the same
    ``apply`` object each time: it is static under jit, so a new lambda recompiles)."""
    train = TrainState.create(apply_fn=apply, params=params, tx=optimizer(cfg))
    # a strongly typed step, as after an update: a weak-typed 0 would recompile the second call
    return BTState(train.replace(step=jnp.zeros((), jnp.int32)), cfg)


def pair_scores(apply: Callable, params: Any, pairs: dict) -> tuple[jax.Array, jax.Array]:
    """(r_W [P], r_L [P]) from one forward pass over winners and losers stacked."""
    both = jax.tree.map(lambda w, l: jnp.concatenate([w, l]), pairs["win"], pairs["lose"])
    r = apply(params, both)
    n = r.shape[0] // 2
    return r[:n], r[n:]


def bt_loss(params, apply: Callable, pairs: dict, alpha: float) -> tuple[jax.Array, dict]:
    r_w, r_l = pair_scores(apply, params, pairs)
    valid = pairs.get("valid")
    loss = preference_loss(r_w, r_l, pairs["e_w"], pairs["e_l"], alpha, valid)
    return loss, {"loss": loss, "accuracy": pairwise_accuracy(r_w, r_l, valid),
                  "gap_corr": gap_correlation(r_w, r_l, pairs["e_w"], pairs["e_l"], valid),
                  "gap": jnp.sum(_weights(r_w, valid) * (r_w - r_l))}


def update(state: BTState, batch: dict) -> tuple[BTState, dict]:
    """One AdamW step on a batch of pairs -> (state, metrics before the step)."""
    grads, info = jax.grad(bt_loss, has_aux=True)(
        state.train.params, state.train.apply_fn, batch, state.config.alpha)
    return state.replace(train=state.train.apply_gradients(grads=grads)), info


@functools.partial(jax.jit, static_argnames=("num_updates",))
def train_steps(state: BTState, data: dict, key: jax.Array, num_updates: int):
    """``num_updates`` updates on uniformly drawn batches, as one scan -> (state, mean metrics)."""
    size = data["e_w"].shape[0]

    def body(st, k):
        idx = jax.random.randint(k, (st.config.batch_size,), 0, size)
        return update(st, jax.tree.map(lambda x: x[idx], data))

    state, metrics = jax.lax.scan(body, state, jax.random.split(key, num_updates))
    return state, jax.tree.map(jnp.mean, metrics)


@jax.jit
def evaluate(state: BTState, data: dict) -> dict:
    """loss, accuracy, gap_corr and mean gap over all pairs of ``data`` (e.g. held out)."""
    return bt_loss(state.train.params, state.train.apply_fn, data, state.config.alpha)[1]


def train_bt(apply: Callable, params: Any, data: dict, cfg: BTConfig,
             key: jax.Array | None = None, log: Any = None) -> tuple[BTState, list[dict]]:
    """Trains ``params`` on pair data for ``cfg.steps`` updates -> (state, one metrics row per
    jitted call); ``log(row)`` after each."""
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    state, history, done = init_bt(apply, params, cfg), [], 0
    while done < cfg.steps:
        n = min(cfg.updates_per_call, cfg.steps - done)
        state, m = train_steps(state, data, jax.random.fold_in(key, done), n)
        done += n
        history.append({"step": done, **{k: float(v) for k, v in m.items()}})
        if log is not None:
            log(history[-1])
    return state, history

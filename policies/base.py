"""The base-policy interface: the generators that verifiers re-rank and adapters change.

    encode(params, obs) -> Context                  # expensive, once per observation
    sample(params, context, key, M) -> Candidates   # M chains in one batch against the context

Shapes: M candidates, H chunk length, A action dim, F feature dim. ``obs`` is one unbatched
observation dict (see ``envs.base``); callers ``vmap`` over environments.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Context = Any  # policy-specific pytree (prefix keys/values, ...)


@struct.dataclass
class Candidates:
    actions: jax.Array  # f32 [M, H, A], in the env's action space [-1, 1]
    features: jax.Array  # f32 [M, F], the policy's own internal feature per candidate
    log_prob: jax.Array | None = None  # f32 [M], where the policy defines a likelihood
    extras: dict = struct.field(default_factory=dict)  # e.g. "noise" [M, H, A], "token_probs"


class BasePolicy(Protocol):
    horizon: int  # H
    action_dim: int  # A
    feature_dim: int  # F
    has_log_prob: bool

    def init(self, key: jax.Array, obs: dict) -> Any: ...

    def encode(self, params: Any, obs: dict) -> Context: ...

    def sample(self, params: Any, context: Context, key: jax.Array, M: int) -> Candidates: ...


class ConfiguredPolicy:
    """What every built-in policy derives from its frozen ``cfg``: validation at construction,
    the chunk length H and the action dim A."""

    cfg: Any

    def __post_init__(self):
        self.cfg.validate()

    @property
    def horizon(self) -> int:
        return self.cfg.horizon

    @property
    def action_dim(self) -> int:
        return self.cfg.action_dim


def reads_images(policy: Any) -> bool:
    """Whether the policy reads the render (``cfg.image``); a policy that does not say is
    given images, so that it lacks nothing it might read."""
    return bool(getattr(policy.cfg, "image", True))


def map_state_batches(fn, data: Any, key: jax.Array, batch: int,
                      rows: np.ndarray | None = None) -> Any:
    """``fn(data_batch, keys)`` over the rows of a pytree of [N, ...] arrays (all rows, or
    ``rows``), ``batch`` rows at a time, the last batch padded so that every batch shares one
    compilation; row i always gets the key ``fold_in(key, i)``. Returns fn's output pytree as
    numpy arrays concatenated over the rows."""
    if rows is None:
        rows = np.arange(len(jax.tree.leaves(data)[0]))
    out = []
    for start in range(0, len(rows), batch):
        sel = rows[start:start + batch]
        pad = np.concatenate([sel, np.full(batch - len(sel), sel[-1])])
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(pad))
        part = fn(jax.tree.map(lambda x, p=pad: jnp.asarray(np.asarray(x)[p]), data), keys)
        n = len(sel)
        out.append(jax.tree.map(lambda y, n=n: np.asarray(y)[:n], part))
    return jax.tree.map(lambda *ys: np.concatenate(ys), *out)


def sample_at_states(policy: BasePolicy, params: Any, obs: dict, key: jax.Array, M: int,
                     batch: int = 256) -> np.ndarray:
    """M candidate chunks from the policy at each of N dataset observations (a dict of [N, ...]
    arrays) -> f32 [N, M, H, A]; state i uses the key ``fold_in(key, i)``."""
    fn = jax.jit(jax.vmap(lambda o, k: policy.sample(params, policy.encode(params, o), k,
                                                     M).actions))
    return map_state_batches(fn, obs, key, batch).astype(np.float32)

"""k-nearest-neighbour density: the non-parametric anti-exploration baseline that CFN
approximates. A candidate scores minus its mean distance to the k nearest features of the SFT
dataset (the policy's own features, collected as TACO collects them for the CFN), so the
candidate deepest inside the data's support is executed.

The bank is standardised per dimension with its own mean and spread, so no feature dimension
dominates the distance by scale alone. Exact, and with N bank features scoring costs an
[M, N] distance matrix per decision (N = collect.max_states, 3000 by default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from algos.base import fitted_config
from core.checkpoint import restore_pytree, save_pytree
from core.config import to_dict
from core.io import write_json
from policies.base import Candidates
from verifiers.base import BuildContext, VerifierPlugin
from verifiers.features import CollectConfig, collect_features
from verifiers.registry import register


@dataclass(frozen=True)
class KNNConfig:
    k: int = 10
    """neighbours averaged per candidate"""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """which dataset states and which feature per state make the bank (as for CFN)"""

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"KNNConfig.k must be a positive int, got {self.k!r}")


@struct.dataclass
class KNNState:
    bank: jax.Array  # f32 [N, F], standardised
    mean: jax.Array  # f32 [F]
    scale: jax.Array  # f32 [F]
    k: int = struct.field(pytree_node=False)


def make_state(features: jax.Array, k: int) -> KNNState:
    features = jnp.asarray(features, jnp.float32)
    mean, scale = features.mean(0), features.std(0) + 1e-6
    return KNNState((features - mean) / scale, mean, scale, min(k, features.shape[0]))


def knn_distance(state: KNNState, features: jax.Array) -> jax.Array:
    """Mean L2 distance of each row of ``features`` [M, F] to its k nearest bank rows -> [M]."""
    x = (features - state.mean) / state.scale
    sq = (jnp.sum(x**2, 1)[:, None] + jnp.sum(state.bank**2, 1)[None]
          - 2.0 * x @ state.bank.T)  # [M, N]
    nearest = -jax.lax.top_k(-sq, state.k)[0]
    return jnp.mean(jnp.sqrt(jnp.maximum(nearest, 0.0)), axis=1)


class KNNVerifier:
    """score = -mean distance to the k nearest dataset features; higher = better supported."""

    name = "knn"
    requires: tuple[str, ...] = ("features",)

    def __init__(self, state: KNNState):
        self.state = state

    def score(self, vstate: KNNState, obs: dict, candidates: Candidates,
              key: jax.Array) -> jax.Array:
        if candidates.features.shape[-1] != vstate.bank.shape[-1]:
            raise ValueError(f"verifier 'knn': candidate features have F="
                             f"{candidates.features.shape[-1]} but the bank has F="
                             f"{vstate.bank.shape[-1]}")
        return -knn_distance(vstate, candidates.features)


def _fit(cfg: KNNConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    policy = ctx.policy
    features, info = collect_features(policy, params, demos.chunks(policy.horizon), cfg.collect,
                                      key)
    state = make_state(features, cfg.k)
    save_pytree(os.path.join(out, "bank"), {"bank": state.bank, "mean": state.mean,
                                            "scale": state.scale})
    write_json(os.path.join(out, "fit_info.json"), {"collect": info})
    write_json(os.path.join(out, "config.json"), to_dict(cfg))  # last: marks a finished fit
    print(f"knn: a bank of {features.shape[0]} features (F={features.shape[1]}), k={state.k}")


def _build(cfg: KNNConfig, ctx: BuildContext) -> KNNVerifier:
    fitted = fitted_config(ctx, KNNConfig, "verifier knn", "steerlab fit-verifier knn")
    arrays = restore_pytree(os.path.join(ctx.fitted_dir, "bank"), None)
    return KNNVerifier(KNNState(arrays["bank"], arrays["mean"], arrays["scale"],
                                min(fitted.k, arrays["bank"].shape[0])))


def _init(cfg: KNNConfig, ctx: BuildContext, key: jax.Array) -> KNNVerifier:
    n = cfg.collect.max_states or 3000
    return KNNVerifier(make_state(jax.random.normal(key, (n, ctx.policy.feature_dim)), cfg.k))


register(VerifierPlugin(KNNVerifier, build=_build, config=KNNConfig, fit=_fit, init=_init))

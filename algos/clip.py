"""``clip_to_data``: execute the chosen chunk clipped to the action range of the demonstrations.

The smallest learned adapter: its fit reads the SFT dataset once and keeps, per chunk step and
action dimension, the ``[quantile, 1 - quantile]`` range of the demonstrated actions; ``act``
clips the chosen candidate into it. A deployment guard that keeps a sampled chunk inside the
support the policy was trained on (it cannot help a candidate that is in range but wrong), and
the worked example of an adapter plugin: one file plus its registration line in ``algos``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from algos.base import AdapterPlugin, BuildContext, fitted_config
from algos.registry import register_adapter
from core.config import to_dict
from core.io import read_json, write_json


@dataclass(frozen=True)
class ClipConfig:
    quantile: float = 0.0
    """the range kept is [q, 1 - q] of the demonstrated actions per step and dimension
    (0 = min and max)"""

    def validate(self) -> None:
        if not 0.0 <= self.quantile < 0.5:
            raise ValueError(f"adapter.clip_to_data.quantile must be in [0, 0.5), got "
                             f"{self.quantile}")


@struct.dataclass
class ClipState:
    low: jax.Array  # f32 [H, A]
    high: jax.Array  # f32 [H, A]


def action_range(chunks: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """Per (step, dim) range of demonstrated chunks [N, H, A] -> (low [H, A], high [H, A])."""
    return (np.quantile(chunks, quantile, axis=0).astype(np.float32),
            np.quantile(chunks, 1.0 - quantile, axis=0).astype(np.float32))


@dataclass(frozen=True, eq=False)  # hashed by identity: its state holds arrays
class ClipToData:
    name = "clip_to_data"
    state: ClipState

    def act(self, astate: ClipState, obs, context, candidates, index, key) -> jax.Array:
        return jnp.clip(candidates.actions[index], astate.low, astate.high)


def _fit(cfg: ClipConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    cfg.validate()
    chunks = np.asarray(demos.chunks(ctx.policy.horizon)["actions"])
    low, high = action_range(chunks, cfg.quantile)
    write_json(os.path.join(out, "range.json"), {"low": low.tolist(), "high": high.tolist(),
                                                 "chunks": int(len(chunks))})
    write_json(os.path.join(out, "config.json"), to_dict(cfg))  # last: marks a finished fit
    print(f"clip_to_data: the action range of {len(chunks)} demonstrated chunks "
          f"(quantile {cfg.quantile})")


def _build(cfg: ClipConfig, ctx: BuildContext) -> ClipToData:
    fitted = fitted_config(ctx, ClipConfig, "adapter clip_to_data",
                           "steerlab adapt clip_to_data")
    if fitted != cfg:
        raise ValueError(f"adapter clip_to_data: {ctx.fitted_dir} was fitted with {fitted}, the "
                         f"run asks for {cfg}")
    r = read_json(os.path.join(ctx.fitted_dir, "range.json"))
    return ClipToData(ClipState(jnp.asarray(r["low"], jnp.float32),
                                jnp.asarray(r["high"], jnp.float32)))


register_adapter(AdapterPlugin(ClipToData, build=_build, config=ClipConfig, fit=_fit))

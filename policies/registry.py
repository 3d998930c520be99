"""Policies by name: ``make_policy("flow", FlowConfig(...))``."""

from __future__ import annotations

import numpy as np

from policies.autoregressive import ARConfig, ARPolicy
from policies.flow import FlowConfig, FlowPolicy

POLICIES = {"flow": (FlowPolicy, FlowConfig), "autoregressive": (ARPolicy, ARConfig)}


def make_policy(name: str, cfg=None):
    """A policy object (hashable, static under jit). ``cfg`` defaults to the name's config."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {sorted(POLICIES)}")
    cls, cfg_cls = POLICIES[name]
    cfg = cfg_cls() if cfg is None else cfg
    if not isinstance(cfg, cfg_cls):
        raise ValueError(f"policy {name!r} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return cls(cfg)


def example_obs(cfg) -> dict:
    """A zero observation with the shapes a policy config expects (for init / eval_shape)."""
    obs = {
        "state": np.zeros((cfg.state_dim,), np.float32),
        "instruction": np.ones((cfg.instruction_len,), np.int32),
        "task_id": np.zeros((), np.int32),
    }
    if cfg.image:
        obs["image"] = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    return obs

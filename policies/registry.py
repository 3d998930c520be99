"""Policies by name, and their artifacts on disk.

    policy = make_policy("flow", FlowConfig(...))
    save_policy(path, policy, params)          # path/policy.json + path/params (Orbax)
    policy, params = load_policy(path)         # a policy directory or a run that exported one

A policy artifact holds the policy's name, its resolved config and its parameters, nothing of
how it was trained: SFT exports one, and every reader (evaluation, verifiers, benchmarks) loads
it here.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from core.checkpoint import restore_pytree, save_pytree
from core.config import from_dict, to_dict
from core.io import BadFileError, MissingFileError, read_json_object, write_json
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


POLICY_FILE = "policy.json"


def policy_name(policy) -> str:
    for name, (cls, _) in POLICIES.items():
        if isinstance(policy, cls):
            return name
    raise ValueError(f"unregistered policy type {type(policy).__name__}")


def save_policy(path: str, policy, params) -> None:
    """Exports ``policy`` and ``params``; ``policy.json`` is written last, so a directory that
    has it is complete."""
    os.makedirs(path, exist_ok=True)
    save_pytree(os.path.join(path, "params"), params)
    write_json(os.path.join(path, POLICY_FILE),
               {"name": policy_name(policy), "config": to_dict(policy.cfg)})


def policy_dir(path: str) -> str:
    """The artifact directory of ``path``: itself, or ``path/policy`` for a training run."""
    for d in (path, os.path.join(path, "policy")):
        if os.path.isfile(os.path.join(d, POLICY_FILE)):
            return d
    raise MissingFileError(f"no policy at {path!r}: expected {POLICY_FILE} there or in "
                           f"{os.path.join(path, 'policy')} (train one with "
                           "`steerlab train-policy`)")


def _remedy(artifact: str) -> str:
    """How to make a broken artifact again: SFT exports ``RUN/policy`` from its last checkpoint
    when the artifact is absent."""
    if os.path.basename(os.path.normpath(artifact)) == "policy":
        run = os.path.dirname(os.path.normpath(artifact)) or "."
        return (f"delete {artifact} and re-run the `steerlab train-policy --out {run}` that made "
                "it (it exports the policy again from its last checkpoint)")
    return "export it again (`steerlab train-policy --out RUN` writes RUN/policy)"


def load_policy(path: str):
    """(policy, params) of an exported policy (or a training run directory that has one).
    Errors name the file at fault and say how to make it again."""
    d = policy_dir(path)
    meta_path = os.path.join(d, POLICY_FILE)
    meta = read_json_object(meta_path, _remedy(d))
    if meta.get("name") not in POLICIES:
        raise BadFileError(f"{meta_path}: name must be one of {sorted(POLICIES)}, got "
                           f"{meta.get('name')!r}; {_remedy(d)}")
    if not isinstance(meta.get("config"), dict):
        raise BadFileError(f"{meta_path}: 'config' must be a mapping of the policy's config "
                           f"fields; {_remedy(d)}")
    try:
        cfg = from_dict(POLICIES[meta["name"]][1], meta["config"])
        policy = make_policy(meta["name"], cfg)
    except ValueError as e:
        raise BadFileError(f"{meta_path}: {e}; {_remedy(d)}") from None
    target = jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0), example_obs(cfg)))
    return policy, restore_pytree(os.path.join(d, "params"), target, _remedy(d))

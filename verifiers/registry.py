"""Verifiers by name, and the selection rule that turns scores into one executed candidate.

    v = make_verifier("consensus")                 # or "cfn", state=... / path=...
    scores = v.score(v.state, obs, candidates, key)   # f32 [M], higher is better
    i = select(scores, key, mode="argmax")            # int32 [], ties broken at random

Every verifier carries its default state in ``v.state`` (``None`` for stateless ones), so the
harness can call ``v.score(v.state, ...)`` for all of them alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from verifiers.base import Verifier

# name -> factory(**options) -> Verifier
VERIFIERS: dict[str, Callable[..., Verifier]] = {}
# name -> fit_cli(policy_run_dir, dataset_path, out, overrides) -> out dir
FITTERS: dict[str, Callable[..., str]] = {}

# Modules that register verifiers when imported; later modules join by being listed here.
_MODULES = ("verifiers.baselines", "verifiers.cfn")
_loaded = False

SELECT_MODES = ("argmax", "softmax")
REQUIREMENTS = ("features", "log_prob", "env_state", "expert_chunk")


def register(name: str, fit_cli: Callable[..., str] | None = None):
    """Class/function decorator: ``@register("consensus")`` makes it buildable by name."""

    def deco(factory):
        if name in VERIFIERS and VERIFIERS[name] is not factory:
            raise ValueError(f"verifier {name!r} is registered twice")
        VERIFIERS[name] = factory
        if fit_cli is not None:
            FITTERS[name] = fit_cli
        return factory

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _MODULES:
        importlib.import_module(mod)
    _loaded = True


def known_verifiers() -> list[str]:
    _load_builtin()
    return sorted(VERIFIERS)


def make_verifier(name: str, **options: Any) -> Verifier:
    """Builds the verifier registered as ``name``; unknown names raise with the known ones."""
    _load_builtin()
    if name not in VERIFIERS:
        raise ValueError(f"verifier: unknown name {name!r}; known: {sorted(VERIFIERS)}")
    v = VERIFIERS[name](**options)
    bad = [r for r in v.requires if r not in REQUIREMENTS]
    if bad:
        raise ValueError(f"verifier {name!r}: requires {bad} not in {list(REQUIREMENTS)}")
    return v


def fit_verifier_cli(
    name: str, policy_run_dir: str, dataset_path: str, out: str, overrides: list[str] = ()
) -> str:
    """``steerlab fit-verifier NAME --policy RUN_DIR --data PATH --out DIR [k=v ...]``."""
    _load_builtin()
    if name not in FITTERS:
        raise ValueError(f"fit-verifier: unknown or untrainable name {name!r}; "
                         f"trainable: {sorted(FITTERS)}")
    return FITTERS[name](policy_run_dir, dataset_path, out, list(overrides))


def select(
    scores: jax.Array, key: jax.Array, mode: str = "argmax", temperature: float = 1.0
) -> jax.Array:
    """Index of the candidate to execute. scores: f32 [M] -> int32 [].

    argmax: the best score; equal maxima are broken uniformly at random (a key-dependent
    permutation before the argmax), so a verifier that cannot tell candidates apart does not
    silently always pick candidate 0. NaN scores never win.
    softmax: a sample from softmax(scores / temperature) (V-GPS uses temperature 1).
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"select: mode {mode!r} is not one of {list(SELECT_MODES)}")
    if not temperature > 0:
        raise ValueError(f"select: temperature must be > 0, got {temperature}")
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
    if mode == "softmax":
        return jax.random.categorical(key, scores / temperature).astype(jnp.int32)
    perm = jax.random.permutation(key, scores.shape[0])
    return perm[jnp.argmax(scores[perm])].astype(jnp.int32)

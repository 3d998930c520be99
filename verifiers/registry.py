"""Verifiers by name, and the selection rule that turns scores into one executed candidate.

    v = make_verifier("consensus")                    # or make_verifier(name, context, config)
    scores = v.score(v.state, obs, candidates, key)   # f32 [M], higher is better
    i = select(scores, key, mode="argmax")            # int32 [], ties broken at random

Plugins register themselves with ``register`` when their module is imported; the package's
``__init__`` imports each plugin module once (one line per module).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from core.registry import Registry
from verifiers.base import BuildContext, Verifier

PLUGINS = Registry("verifier", "verifier")
register = PLUGINS.register
known_verifiers = PLUGINS.known
get_plugin = PLUGINS.lookup

SELECT_MODES = ("argmax", "softmax")


def make_verifier(name: str, context: BuildContext | None = None, config: Any = None) -> Verifier:
    """Builds the verifier registered as ``name`` (its default config unless one is given)."""
    plugin = get_plugin(name)
    return plugin.build(plugin.config() if config is None else config,
                        context or BuildContext())


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

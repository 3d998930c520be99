"""Proposal samplers beyond plain repeated sampling: RoboMonkey's Gaussian perturbation
(METHODS.md 3.4). Fit a Gaussian to N̂ policy samples over the continuous dims, set the binary
grip by majority vote over the N̂ samples, and draw the candidates from the fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRIP = 2  # index of the binary grip dimension in the built-in suite's (dx, dy, grip)


def majority_vote(binary: jax.Array) -> jax.Array:
    """Per entry, whether at least half of the N samples are on (> 0): [N, ...] -> bool [...].
    A tie is on. Works for bool, {0, 1} and {-1, +1} samples."""
    return jnp.mean(binary > 0, axis=0) >= 0.5


def gaussian_proposals(samples: jax.Array, key: jax.Array, N: int) -> jax.Array:
    """N chunks from a per-dimension Gaussian fitted to policy samples [N̂, H, A] (a full
    covariance over H·A dims from N̂ ≪ H·A samples is singular); grip by majority vote."""
    mean, std = samples.mean(0), samples.std(0) + 1e-6  # [H, A]
    draws = mean + std * jax.random.normal(key, (N, *samples.shape[1:]))
    grip = jnp.where(majority_vote(samples[..., GRIP]), 1.0, -1.0)  # [H]
    draws = draws.at[..., GRIP].set(jnp.broadcast_to(grip, draws.shape[:-1]))
    return jnp.clip(draws, -1.0, 1.0)

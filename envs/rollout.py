"""The one rollout primitive: execute a chunk in a functional env, unroll decisions into an
episode (in the spirit of brax's ``generate_unroll``). The harness, SFT's in-training
evaluation, the oracle verifier and PLD's collection all run episodes through these functions
(a test-time learner's episodes run in the harness), so every "M = 1 success" in steerlab is
measured on the same initial states.

Key convention (one place, so every caller draws the same episodes):
    episode i of an evaluation seeded ``seed``   fold_in(PRNGKey(seed), i)
    an episode key                               split into (reset, episode-level, decisions)
    a decision key                               split into (sample, score, select)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def episode_keys(seed: int, episodes: int) -> jax.Array:
    """Indexed initial conditions: episode i always gets the same key, whatever the batch."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(episodes))


def split_episode_key(key: jax.Array, num_decisions: int):
    """(reset key, episode-level key (e.g. the expert's latents), decision keys [D])."""
    k_reset, k_episode, k_loop = jax.random.split(key, 3)
    return k_reset, k_episode, jax.random.split(k_loop, num_decisions)


def decision_keys(key: jax.Array):
    """(sample, score, select) keys of one decision."""
    return jax.random.split(key, 3)


def num_decisions(max_steps: int, replan: int) -> int:
    return -(-max_steps // replan)


def execute_chunk(env, state, obs, actions, probe: Callable | None = None):
    """Steps one env through ``actions`` [h, A]; returns final (state, obs) and per-step
    (reward, done, success, progress), plus ``probe(state)`` after each step when given.
    ``obs`` None: observations are not carried (a caller that needs only outcomes)."""

    def one(carry, action):
        state, obs = carry
        state, new_obs, reward, done, info = env.step(state, action)
        out = (reward, done, info["success"], info["progress"])
        if probe is not None:
            out += (probe(state),)
        return (state, None if obs is None else new_obs), out

    return jax.lax.scan(one, (state, obs), actions)


def unroll(env, key: jax.Array, decide: Callable, decisions: int, replan: int,
           probe: Callable | None = None, carry=None):
    """One episode from ``env.reset``: ``decisions`` times, ``decide`` picks a chunk and the
    first ``replan`` actions run. The env freezes after done, so a fixed-length scan is exact.

    decide(state, obs, k_episode, k_decision) -> (chunk [H, A], record dict)
    -> (final state, success, progress, per-decision records [D, ...] with "alive" and, when
    ``probe`` is given, "probe" [D, replan] = probe(state) after each executed step).

    ``carry`` (a test-time learner's state, ``algos.base``) is threaded through the decisions:
    decide(state, obs, k_episode, k_decision, carry) -> (chunk, record, carry), and the final
    carry is returned as a fifth value.
    """
    k_reset, k_episode, k_decisions = split_episode_key(key, decisions)
    state, obs = env.reset(k_reset)
    learns = carry is not None

    def decision(c, k):
        state, obs, done, _, _, learner = c
        if learns:
            chunk, rec, learner = decide(state, obs, k_episode, k, learner)
        else:
            chunk, rec = decide(state, obs, k_episode, k)
        rec = {**rec, "alive": ~done}
        (state, obs), steps = execute_chunk(env, state, obs, chunk[:replan], probe)
        _, dones, success, progress = steps[:4]
        if probe is not None:
            rec["probe"] = steps[4]
        return (state, obs, done | dones[-1], success[-1], progress[-1], learner), rec

    init = (state, obs, jnp.zeros((), bool), jnp.zeros((), bool), jnp.zeros((), jnp.float32),
            carry)
    (state, _, _, success, progress, carry), recs = jax.lax.scan(decision, init, k_decisions)
    if learns:
        return state, success, progress, recs, carry
    return state, success, progress, recs

"""Evaluation with the environments on the host: B episodes at a time through a ``HostDriver``.

For simulators that cannot be compiled into the evaluation (torch-based ones). Each decision
is one jitted, vmapped call of the harness's ``decide`` for the whole batch; only env stepping
is Python. Episode i uses the same keys as ``evaluate_compiled``, so with an env that takes
``options={"key": ...}`` at reset (the built-in suite's wrapper) the two agree seed for seed.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from algos.base import learns
from envs.host import HostDriver
from envs.rollout import episode_keys, split_episode_key
from experiments.harness import PRIVILEGED, Setup, decide


@functools.lru_cache(maxsize=16)
def batched_decide(setup: Setup):
    """(pparams, vstate, astate, obs [B], env_state [B] or None, k_expert [B], k [B]) -> chunks
    [B]. Cached per Setup, so repeated evaluations (or drivers) do not recompile."""
    one = lambda p, v, a, o, s, ke, k: decide(setup, p, v, o, s, ke, k, a)[0]
    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0, 0, 0)))


def batch_keys(setup: Setup, episodes: np.ndarray):
    """Per-episode (reset [n], episode-level [n], decision [n, D]) keys, as numpy."""
    keys = episode_keys(setup.cfg.seed, setup.cfg.episodes)[episodes]
    split = jax.vmap(lambda k: split_episode_key(k, setup.num_decisions))
    return tuple(np.asarray(k) for k in split(keys))


def stack_states(infos: list[dict]):
    """The envs' ``info["env_state"]`` stacked leaf by leaf along a new batch axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *[info["env_state"] for info in infos])


def run_batch(setup: Setup, driver, decide_fn, states: tuple, episodes: np.ndarray) -> dict:
    """Episodes ``episodes`` (at most B; padded slots repeat the last and stay inactive);
    ``states`` = (policy params, verifier state, adapter state)."""
    cfg, B, n = setup.cfg, driver.num_envs, len(episodes)
    padded = np.concatenate([episodes, np.full(B - n, episodes[-1])])
    k_reset, k_expert, k_decisions = batch_keys(setup, padded)
    obs, infos = driver.reset([cfg.seed + int(i) for i in padded],
                              [{"key": k} for k in k_reset])
    needs_state = any(r in PRIVILEGED for r in setup.verifier.requires)
    active = np.arange(B) < n
    success, progress = np.zeros(B, bool), np.zeros(B, np.float32)
    steps, nonfinite = np.zeros(B, np.int64), np.zeros(B, np.int64)
    for d in range(setup.num_decisions):
        if not active.any():
            break
        state = stack_states(infos) if needs_state else None
        chunks = np.asarray(decide_fn(*states, obs, state, k_expert, k_decisions[:, d]))
        for action in chunks[:, : cfg.replan].swapaxes(0, 1):
            obs, _, terminated, truncated, infos = driver.step(action, active)
            steps += active
            success = np.where(active, [bool(i["success"]) for i in infos], success)
            progress = np.where(active, [float(i["progress"]) for i in infos], progress)
            nonfinite = np.where(active, [int(i.get("nonfinite_actions", 0)) for i in infos],
                                 nonfinite)
            active &= ~(terminated | truncated | (steps >= setup.max_steps))
            if not active.any():
                break
    return {"success": success[:n], "progress": progress[:n], "length": steps[:n],
            "nonfinite_actions": nonfinite[:n], "nonfinite_obs": driver.nonfinite_obs[:n].copy()}


def evaluate_host(setup: Setup, driver, pparams, vstate, astate=None) -> dict[str, np.ndarray]:
    """``evaluate_compiled``'s per-episode success / progress / length / nonfinite_actions,
    with envs stepped by ``driver`` (B = ``driver.num_envs`` episodes at a time; the last batch
    may be smaller), and ``nonfinite_obs``: observations with a NaN/inf entry the driver saw."""
    if learns(setup.adapter):
        raise ValueError(f"adapter {setup.adapter.name!r} learns during the episode, inside the "
                         "compiled harness of a functional env; it does not run on a host-loop "
                         "(gymnasium) env")
    decide_fn = batched_decide(setup)
    order = np.arange(setup.cfg.episodes)
    states = (pparams, vstate, astate)
    parts = [run_batch(setup, driver, decide_fn, states, order[i: i + driver.num_envs])
             for i in range(0, len(order), driver.num_envs)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate_gym(setup: Setup, gym_env, pparams, vstate, astate=None) -> dict[str, np.ndarray]:
    """One gymnasium env stepped in this process, episode after episode: ``evaluate_host`` with
    B = 1. An env that takes ``options={"key": ...}`` at reset (the built-in suite's wrapper)
    agrees with the compiled path seed for seed."""
    with HostDriver(lambda: gym_env, num_envs=1) as driver:
        return evaluate_host(setup, driver, pparams, vstate, astate)

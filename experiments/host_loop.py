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
from flax import struct

from algos.base import learns
from envs.host import HostDriver
from envs.rollout import decision_keys, episode_keys, split_episode_key
from experiments.harness import PRIVILEGED, Setup, candidates, decide


@struct.dataclass
class HostProgress:
    """What a test-time learner reads of a host-stepped env's state (``decide``'s
    ``env_state``): the progress of the last step (or the reset) and whether the episode ended."""

    progress: jax.Array  # f32
    done: jax.Array  # bool


@functools.lru_cache(maxsize=16)
def batched_decide(setup: Setup):
    """(pparams, vstate, astate, obs [B], env_state [B] or None, k_expert [B], k [B]) -> chunks
    [B]; for a test-time learner also the learners' carries [B] in and out. Cached per Setup, so
    repeated evaluations (or drivers) do not recompile."""
    if learns(setup.adapter):
        def one_learning(p, v, a, o, s, ke, k, c):
            out = decide(setup, p, v, o, s, ke, k, a, c)
            return out[0], out[4]

        return jax.jit(jax.vmap(one_learning, in_axes=(None, None, None, 0, 0, 0, 0, 0)))
    one = lambda p, v, a, o, s, ke, k: decide(setup, p, v, o, s, ke, k, a)[0]
    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0, 0, 0)))


@functools.lru_cache(maxsize=16)
def batched_candidates(setup: Setup):
    """(pparams, obs [B], k [B]) -> the candidate chunks [B, M, H, A] that ``decide`` samples
    with the same decision keys, for a simulator oracle that rolls them out on the host."""
    def one(p, o, k):
        return candidates(setup, p, setup.policy.encode(p, o), decision_keys(k)[0]).actions

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def sim_scores(setup: Setup, driver, pparams, obs: dict, keys, active) -> np.ndarray:
    """A simulator oracle's scores [B, M] on host-stepped envs: each env executes the
    decision's candidates (their first ``verifier.horizon`` steps) from its current state and
    restores it (``HostDriver.rollout_chunks``)."""
    chunks = np.asarray(batched_candidates(setup)(pparams, obs, keys))
    return driver.rollout_chunks(chunks[:, :, : setup.verifier.horizon], active,
                                 setup.verifier.success_bonus)


def batch_keys(setup: Setup, episodes: np.ndarray):
    """Per-episode (reset [n], episode-level [n], decision [n, D]) keys, as numpy."""
    keys = episode_keys(setup.cfg.seed, setup.cfg.episodes)[episodes]
    split = jax.vmap(lambda k: split_episode_key(k, setup.num_decisions))
    return tuple(np.asarray(k) for k in split(keys))


def stack_states(infos: list[dict]):
    """The envs' ``info["env_state"]`` stacked leaf by leaf along a new batch axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *[info["env_state"] for info in infos])


def run_batch(setup: Setup, driver, decide_fn, states: tuple, episodes: np.ndarray,
              carries=None) -> dict:
    """Episodes ``episodes`` (at most B; padded slots repeat the last and stay inactive);
    ``states`` = (policy params, verifier state, adapter state). A test-time learner's
    ``carries`` [B] are threaded through the decisions; the records then include its
    per-episode ones and the final carries (``"carries"``), as ``run_episode`` does. The
    progress at each decision (``decisions/progress``, frozen after the end) is recorded for
    every run: a decision loop that stops early leaves the rest at the final progress."""
    cfg, B, n = setup.cfg, driver.num_envs, len(episodes)
    padded = np.concatenate([episodes, np.full(B - n, episodes[-1])])
    k_reset, k_expert, k_decisions = batch_keys(setup, padded)
    obs, infos = driver.reset([cfg.seed + int(i) for i in padded],
                              [{"key": k} for k in k_reset])
    needs_state = any(r in PRIVILEGED for r in setup.verifier.requires)
    learner = carries is not None
    # a simulator that keeps its state to itself rolls the candidates out on the host instead
    rolled = needs_state and "env_state" not in infos[0]
    if rolled and not getattr(setup.verifier, "sim_rollout", False):
        raise ValueError(f"verifier {setup.verifier.name!r} needs the simulator's state, which "
                         "this host-stepped suite does not expose")
    if rolled and learner:
        raise ValueError("a simulator oracle on a host-stepped suite scores the base policy's "
                         "candidates; it does not run with a test-time learner")
    if learner:
        carries = jax.vmap(setup.adapter.start_episode)(carries)
    active = np.arange(B) < n
    success = np.zeros(B, bool)
    progress = np.array([float(i.get("progress", 0.0)) for i in infos], np.float32)
    steps, nonfinite = np.zeros(B, np.int64), np.zeros(B, np.int64)
    at_decision = np.zeros((B, setup.num_decisions), np.float32)  # the adaptation curve
    for d in range(setup.num_decisions):
        # a learner goes on deciding after the end, as in the compiled scan: its last update
        # may still be due (``before`` sees alive = False)
        if not active.any() and not learner:
            at_decision[:, d:] = progress[:, None]
            break
        state = stack_states(infos) if needs_state and not rolled else (
            HostProgress(progress.copy(), ~active) if learner else None)
        seen = obs
        if rolled:
            seen = {**obs, "oracle_scores": sim_scores(setup, driver, states[0], obs,
                                                       k_decisions[:, d], active)}
        args = (*states, seen, state, k_expert, k_decisions[:, d])
        at_decision[:, d] = progress
        if learner:
            chunks, carries = decide_fn(*args, carries)
        else:
            chunks = decide_fn(*args)
        for action in np.asarray(chunks)[:, : cfg.replan].swapaxes(0, 1):
            if not active.any():
                break
            obs, _, terminated, truncated, infos = driver.step(action, active)
            steps += active
            success = np.where(active, [bool(i["success"]) for i in infos], success)
            progress = np.where(active, [float(i["progress"]) for i in infos], progress)
            nonfinite = np.where(active, [int(i.get("nonfinite_actions", 0)) for i in infos],
                                 nonfinite)
            active &= ~(terminated | truncated | (steps >= setup.max_steps))
    out = {"success": success[:n], "progress": progress[:n], "length": steps[:n],
           "nonfinite_actions": nonfinite[:n], "nonfinite_obs": driver.nonfinite_obs[:n].copy(),
           "decisions/progress": at_decision[:n]}
    if learner:
        records = jax.vmap(setup.adapter.episode_records)(carries)
        out.update({k: np.asarray(v)[:n] for k, v in records.items()})
        out["carries"] = carries
    return out


def start_carries(setup: Setup, astate, num_envs: int):
    """A test-time learner's carry for each of the driver's B envs. A continual learner's
    slot j is its stream j (episodes j, j + B, ..., as ``evaluate_compiled`` runs stream s with
    S = B streams), so it needs ``streams`` = B."""
    adapter = setup.adapter
    if adapter.continual:
        if adapter.streams != num_envs:
            raise ValueError(f"a continual learner on a host-stepped suite runs one stream per "
                             f"environment: set eval.host_envs to its streams "
                             f"({adapter.streams}), got {num_envs}")
        if setup.cfg.episodes % num_envs:
            raise ValueError(f"eval.episodes ({setup.cfg.episodes}) must be a multiple of the "
                             f"continual learner's streams ({num_envs})")
    if getattr(adapter, "stream_states", False):  # one state per stream, stacked
        return jax.vmap(adapter.begin)(astate)
    carry = adapter.begin(astate)
    return jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], num_envs, 0), carry)


def evaluate_host(setup: Setup, driver, pparams, vstate, astate=None) -> dict[str, np.ndarray]:
    """``evaluate_compiled``'s per-episode success / progress / length / nonfinite_actions,
    with envs stepped by ``driver`` (B = ``driver.num_envs`` episodes at a time; the last batch
    may be smaller), and ``nonfinite_obs``: observations with a NaN/inf entry the driver saw.
    A test-time learner starts each episode fresh, or (continual) learns along one stream per
    environment."""
    decide_fn = batched_decide(setup)
    learner = learns(setup.adapter)
    B = driver.num_envs
    carries = start_carries(setup, astate, B) if learner else None
    order = np.arange(setup.cfg.episodes)
    states = (pparams, vstate, astate)
    parts = []
    for i in range(0, len(order), B):
        if learner and not setup.adapter.continual:
            carries = start_carries(setup, astate, B)
        part = run_batch(setup, driver, decide_fn, states, order[i: i + B], carries)
        carries = part.pop("carries", None)
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate_gym(setup: Setup, gym_env, pparams, vstate, astate=None) -> dict[str, np.ndarray]:
    """One gymnasium env stepped in this process, episode after episode: ``evaluate_host`` with
    B = 1. An env that takes ``options={"key": ...}`` at reset (the built-in suite's wrapper)
    agrees with the compiled path seed for seed."""
    with HostDriver(lambda: gym_env, num_envs=1) as driver:
        return evaluate_host(setup, driver, pparams, vstate, astate)

"""Per-decision sampling latency: shared prefix cache vs the tiled baseline.

    steerlab bench sampling [--policy RUN_DIR] [--Ms 1,4,8,16,32,64] [--repeats 20] [--json F]

Per M: ``encode + sample`` (cached: prefix once at batch 1, broadcast to M chains) and
``sample_naive`` (observation tiled M times, prefix at batch M, as released pi0.5 / TACO code),
each jitted, timed after compilation with ``block_until_ready``, median over repeats. The two
paths alternate inside every repeat so that load on a shared machine hits both alike.
FLOP counts are analytic matmul FLOPs (``FlowPolicy.flop_counts``).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from core.io import MissingFileError
from policies.flow import PI0_PROPORTIONS, FlowConfig
from policies.registry import example_obs, load_policy, make_policy


def _env_obs(task: str, variant: str = "nominal", image: bool = True):
    import envs  # the built-in suite supplies a realistic observation

    env = envs.make(task, variant, image=image)
    return env, jax.device_get(env.reset(jax.random.PRNGKey(0))[1])


def _default_policy(task: str = "pick_place"):
    env, obs = _env_obs(task)
    policy = make_policy("flow", FlowConfig(**PI0_PROPORTIONS).with_spec(env.spec))
    return policy, policy.init(jax.random.PRNGKey(0), obs), obs


def load_bench_policy(policy_run_dir_or_default):
    """(policy, params, obs): the default policy on a real observation, a given tuple, or an
    exported policy on a zero observation of its shapes (the cost does not depend on values)."""
    if policy_run_dir_or_default in (None, "default"):
        return _default_policy()
    if isinstance(policy_run_dir_or_default, tuple):  # (policy, params[, obs])
        policy, params, *rest = policy_run_dir_or_default
        return policy, params, rest[0] if rest else example_obs(policy.cfg)
    if not os.path.isdir(policy_run_dir_or_default):
        raise MissingFileError(f"--policy {policy_run_dir_or_default}: no such directory (give a "
                               "trained policy run, or leave --policy out for a fresh-init "
                               "default policy)")
    policy, params = load_policy(policy_run_dir_or_default)
    return policy, params, example_obs(policy.cfg)


def _median_ms(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts) * 1e3) for name, ts in times.items()}


def bench_sampling(policy_run_dir_or_default="default", Ms=(1, 4, 8, 16, 32, 64),
                   repeats: int = 20, score_fn=None, seed: int = 0) -> dict:
    """Latency per decision (ms) of the cached and naive paths for each M.

    ``policy_run_dir_or_default``: a run directory, ``"default"`` (randomly initialised default
    flow policy on pick_place sizes) or a ``(policy, params[, obs])`` tuple.
    ``score_fn(obs, candidates, key) -> [M]``: optional verifier scoring at M = 32:
    ``score_ms_at_M32`` (the scoring call on its own), ``sample_ms_at_M32``,
    ``score_overhead_at_M32`` (their ratio), ``fused_ms_at_M32`` (sampling and scoring in one
    compiled call) and ``fused_minus_sample_ms_at_M32``.
    """
    policy, params, obs = load_bench_policy(policy_run_dir_or_default)
    key = jax.random.PRNGKey(seed)
    has_naive = hasattr(policy, "sample_naive")
    out = {"policy": policy.name, "Ms": list(Ms), "repeats": repeats,
           "device": jax.devices()[0].device_kind, "cached_ms": {}, "naive_ms": {},
           "reduction": {}}
    for m in Ms:
        fns = {"cached": jax.jit(lambda p, o, k, m=m: policy.sample(p, policy.encode(p, o), k, m))}
        if has_naive:
            fns["naive"] = jax.jit(lambda p, o, k, m=m: policy.sample_naive(p, o, k, m))
        res = _median_ms({n: (lambda f=f: f(params, obs, key)) for n, f in fns.items()}, repeats)
        out["cached_ms"][m] = res["cached"]
        if has_naive:
            out["naive_ms"][m] = res["naive"]
            out["reduction"][m] = 1.0 - res["cached"] / res["naive"]
    if hasattr(policy, "flop_counts"):
        f = policy.flop_counts()
        p, s = f["prefix"], f["expert_per_candidate"]
        out.update(prefix_flops=p, expert_flops_per_candidate=s,
                   bound_at_M32=1.0 - (p + 32 * s) / (32 * (p + s)))
    if 32 in out["cached_ms"]:
        out["flow_ms_at_M32"] = out["cached_ms"][32]
        if has_naive:
            out["reduction_at_M32"] = out["reduction"][32]
    if score_fn is not None:
        out.update(_time_scoring(policy, params, obs, key, score_fn, repeats))
    return out


def _time_scoring(policy, params, obs, key, score_fn, repeats: int, m: int = 32) -> dict:
    """Scoring M candidates timed on its own (jitted, after compilation, median of repeats), next
    to sampling alone and the fused sample-and-score call. The fused figure minus sampling is
    kept as measured (unclamped: noise can make it negative); it is not the scoring cost."""

    def sample(p, o, k):
        return policy.sample(p, policy.encode(p, o), k, m)

    def sample_and_score(p, o, k):
        cand = sample(p, o, k)
        return cand.actions, score_fn(o, cand, k)

    sample_j, fused_j, score_j = jax.jit(sample), jax.jit(sample_and_score), jax.jit(score_fn)
    cand = jax.block_until_ready(sample_j(params, obs, key))
    res = _median_ms({"sample": lambda: sample_j(params, obs, key),
                      "fused": lambda: fused_j(params, obs, key),
                      "score": lambda: score_j(obs, cand, key)}, repeats)
    return {f"sample_ms_at_M{m}": res["sample"],
            f"score_ms_at_M{m}": res["score"],
            f"score_call_ms_at_M{m}": res["score"],  # the same figure, under its earlier name
            f"fused_ms_at_M{m}": res["fused"],
            f"fused_minus_sample_ms_at_M{m}": res["fused"] - res["sample"],
            f"score_overhead_at_M{m}": res["score"] / res["sample"]}

"""Throughput of the tabletop step: vmapped envs under lax.scan, measured after compilation.

Actions are drawn up front ([T, B, A] uniform in [-1, 1]) so the timing covers the env alone.
With images on, each step's images are reduced to a checksum inside the scan, which keeps the
renderer from being optimised away without storing T x B images.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from envs.tabletop import make


def _runner(env, num_steps: int):
    def run(state, actions):  # actions [T, B, A]
        def body(carry, a):
            s, acc = carry
            s, obs, reward, done, _ = jax.vmap(env.step)(s, a)
            acc = acc + jnp.sum(reward) + jnp.sum(done)
            if "image" in obs:
                acc = acc + jnp.sum(obs["image"][..., 0], dtype=jnp.float32)
            return (s, acc), None

        (state, acc), _ = jax.lax.scan(body, (state, jnp.float32(0.0)), actions)
        return state, acc

    return jax.jit(run)


def _measure(env, num_envs: int, num_steps: int, repeats: int, key) -> float:
    k_reset, k_act = jax.random.split(key)
    state, _ = jax.vmap(env.reset)(jax.random.split(k_reset, num_envs))
    actions = jax.random.uniform(k_act, (num_steps, num_envs, 3), minval=-1.0, maxval=1.0)
    run = _runner(env, num_steps)
    jax.block_until_ready(run(state, actions))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state, actions))
        best = min(best, time.perf_counter() - t0)
    return num_envs * num_steps / best


def bench_env(
    num_envs: int = 1024,
    num_steps: int = 200,
    task: str = "pick_place",
    image_steps: int | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """-> {"state_steps_per_s", "image_steps_per_s", ...}: best of `repeats` timed runs."""
    key = jax.random.PRNGKey(seed)
    image_steps = image_steps or max(num_steps // 10, 1)
    state_sps = _measure(make(task, image=False), num_envs, num_steps, repeats, key)
    image_sps = _measure(make(task, image=True), num_envs, image_steps, repeats, key)
    return {
        "task": task,
        "num_envs": num_envs,
        "num_steps": num_steps,
        "image_steps": image_steps,
        "state_steps_per_s": state_sps,
        "image_steps_per_s": image_sps,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


if __name__ == "__main__":
    import json
    import sys

    task = sys.argv[1] if len(sys.argv) > 1 else "pick_place"
    print(json.dumps(bench_env(task=task), indent=2))

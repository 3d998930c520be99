"""Throughput of ``algos.sac.train_steps`` on observations shaped like a suite task's: RLPD
updates per second (each = ``utd`` critic steps + one actor step) for the released RLPD sizes
and for compact ones, measured after compilation in one process so the ratios compare.

An RLPD update is paid per environment step collected, so updates/s bounds how many online
environment steps per second the learner can keep up with at that UTD.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import jax
import jax.numpy as jnp

from algos.sac import SACConfig, buffer_add, buffer_init, init_sac, train_steps
from envs.language import VOCAB
from envs.tabletop import make

SIZES = {
    "rlpd": SACConfig(),
    "compact": SACConfig(hidden=(128, 128), actor_hidden=(128, 128), batch_size=128),
}


def _buffer(obs: dict, action_dim: int, rows: int, key) -> object:
    def row(k):
        ks = jax.random.split(k, 4)
        state = jax.random.normal(ks[0], obs["state"].shape)
        o = {**obs, "state": state}
        a = jax.random.uniform(ks[1], (action_dim,), minval=-1, maxval=1)
        return {"obs": o, "next_obs": o, "base": a, "next_base": a, "action": a,
                "reward": jax.random.bernoulli(ks[2]).astype(jnp.float32),
                "discount": jnp.float32(0.9), "done": jnp.float32(0.0),
                "mc": jnp.float32(0.0)}

    batch = jax.vmap(row)(jax.random.split(key, rows))
    buf = buffer_init(jax.tree.map(lambda x: x[0], batch), rows)
    return buffer_add(buf, batch, jnp.ones(rows, bool))


def bench_sac(task: str = "pick_place", action_dim: int = 12, num_updates: int = 10,
              repeats: int = 3, sizes: tuple[str, ...] = ("rlpd", "compact"),
              seed: int = 0) -> dict:
    """-> {size: {"updates_per_s", "critic_steps_per_s", ...}}: best of ``repeats`` timed calls
    of ``num_updates`` updates each, offline and online buffers of 4096 rows."""
    env = make(task, image=False)
    _, obs = env.reset(jax.random.key(seed))
    obs = {k: obs[k] for k in ("state", "instruction", "time")}
    key = jax.random.key(seed)
    offline, online = _buffer(obs, action_dim, 4096, key), _buffer(obs, action_dim, 4096, key)
    out = {"task": task, "action_dim": action_dim, "num_updates": num_updates}
    for name in sizes:
        cfg = replace(SIZES[name], vocab_size=len(VOCAB))
        state = init_sac(cfg, obs, action_dim, key)
        run = lambda s: train_steps(s, offline, online, key, num_updates, 0.5)  # noqa: E731
        jax.block_until_ready(run(state))  # compile + warm up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(state))
            best = min(best, time.perf_counter() - t0)
        out[name] = {"hidden": list(cfg.hidden), "num_critics": cfg.num_critics,
                     "batch_size": cfg.batch_size, "utd": cfg.utd,
                     "updates_per_s": num_updates / best,
                     "critic_steps_per_s": num_updates * cfg.utd / best}
    out.update(backend=jax.default_backend(), cpu_count=os.cpu_count(),
               load_avg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return out

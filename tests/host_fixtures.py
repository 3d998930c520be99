"""Env factories for the host-driver tests, in a module that spawned workers can import."""

from __future__ import annotations

import os

import numpy as np


class CountingEnv:
    """A JAX-free env: obs counts steps; it terminates after ``length`` steps. ``fail_at``
    raises in that step and ``die_at`` kills the process there, to test error reporting."""

    def __init__(self, length: int = 3, fail_at: int = 0, die_at: int = 0):
        self.length, self.fail_at, self.die_at = length, fail_at, die_at
        self.t, self.offset = 0, 0

    def reset(self, *, seed=None, options=None):
        self.t, self.offset = 0, int(seed or 0)
        return self._obs(), {"success": False, "progress": 0.0}

    def step(self, action):
        self.t += 1
        if self.t == self.fail_at:
            raise ValueError(f"boom at step {self.t}")
        if self.t == self.die_at:
            os._exit(3)
        done = self.t >= self.length
        info = {"success": done, "progress": self.t / self.length}
        return self._obs(), float(np.sum(action)), done, False, info

    def _obs(self):
        return {"count": np.int32(self.t), "seed": np.int32(self.offset)}

    def close(self):
        pass


class EarlyEndReach:
    """The tabletop reach env, truncated after a seed-dependent number of steps (4 + seed % 5),
    so episodes in one batch end at different steps, mid-chunk."""

    def __init__(self, **kwargs):
        from envs.gym_env import TabletopGymEnv

        self.env, self.limit, self.t = TabletopGymEnv(task="reach", **kwargs), 0, 0

    def reset(self, *, seed=None, options=None):
        self.limit, self.t = 4 + int(seed) % 5, 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self.t += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated or self.t >= self.limit, info

    def close(self):
        self.env.close()


class RolloutReach:
    """The tabletop reach env without its functional state in ``info``; the simulator oracle
    rolls candidates out through ``rollout_chunks``, as a host-stepped simulator does."""

    def __init__(self, **kwargs):
        from envs.gym_env import TabletopGymEnv

        self.env = TabletopGymEnv(task="reach", **kwargs)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, {k: v for k, v in info.items() if k != "env_state"}

    def step(self, action):
        *out, info = self.env.step(action)
        return *out, {k: v for k, v in info.items() if k != "env_state"}

    def rollout_chunks(self, chunks, success_bonus):
        from envs.rollout import execute_chunk

        def score(chunk):
            _, (_, _, success, progress) = execute_chunk(self.env.env, self.env._state, None,
                                                         chunk)
            return float(progress[-1]) + success_bonus * bool(success[-1])

        return np.array([score(c) for c in chunks], np.float32)

    def close(self):
        self.env.close()

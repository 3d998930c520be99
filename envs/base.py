"""The environment interface every part of steerlab talks to.

Built-in suite: pure-JAX and functional (gymnax/brax style), so ``jax.vmap`` over environments
and ``jax.lax.scan`` over time need no Python in the loop, and a state is copied for free.

    reset(key) -> (state, obs)
    step(state, action) -> (state, obs, reward, done, info)   # info: {"success", "progress"}

Observation dict (one environment, unbatched):
    state        float32 [S]            gripper pose and grip, object and zone positions
    image        uint8   [64, 64, 3]    top-down render (only when the env renders images)
    instruction  int32   [L]            token ids over a fixed vocabulary, right-padded with 0
    task_id      int32   []
    time         float32 []             elapsed fraction t/T of the time limit; for critics and
                                        value functions, never read by the base policies
Actions are float32 [A] = (dx, dy, grip) in [-1, 1]; grip > 0 closes. ``step`` runs inside
compiled evaluations and cannot raise, so a NaN or inf entry is replaced by a safe value (no
motion on that axis, grip unchanged) and the step is counted in the state (the built-in suite's
``state.nonfinite_actions``, per episode). Host-side wrappers reject actions of the wrong shape
or type with TypeError / ValueError instead.
After ``done`` an episode is frozen: ``step`` returns the same state with done/success kept,
so a fixed-horizon scan needs no autoreset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

Obs = dict[str, jax.Array]
EnvState = Any  # a pytree for JAX envs, an opaque handle for simulator adapters

IMAGE_SIZE = 64
ACTION_DIM = 3


@dataclass(frozen=True)
class EnvSpec:
    """Static facts about an environment that policies and verifiers size themselves from."""

    task: str
    variant: str
    state_dim: int
    action_dim: int
    instruction_len: int
    vocab_size: int
    num_tasks: int
    max_steps: int
    image: bool
    state_groups: tuple[tuple[str, int, int], ...] = ()
    """how ``state`` splits into entities: (name, count, size) in order, sizes summing to
    state_dim; policies may embed one token per entity so attention can bind words to them"""
    image_size: int = IMAGE_SIZE
    """side of the square RGB ``image`` (when ``image``)"""

    def example_obs(self) -> dict:
        """A zero observation with the shapes and dtypes of this env's (``reset``'s), to size
        networks without stepping the env (a host-stepped simulator has no functional reset)."""
        obs = {"state": np.zeros(self.state_dim, np.float32),
               "instruction": np.zeros(self.instruction_len, np.int32),
               "task_id": np.int32(0), "time": np.float32(0.0)}
        if self.image:
            obs["image"] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return obs


class FunctionalEnv(Protocol):
    spec: EnvSpec

    def reset(self, key: jax.Array) -> tuple[EnvState, Obs]: ...

    def step(
        self, state: EnvState, action: jax.Array
    ) -> tuple[EnvState, Obs, jax.Array, jax.Array, dict[str, jax.Array]]: ...

"""gymnasium wrapper over a functional tabletop env (jitted reset/step, numpy at the boundary)."""

from __future__ import annotations

import gymnasium
import jax
import numpy as np
from gymnasium import spaces

from envs.base import ACTION_DIM, IMAGE_SIZE
from envs.language import INSTRUCTION_LEN, VOCAB
from envs.tabletop import STATE_DIM, TASKS, make

GYM_IDS = {
    "steerlab/Reach-v0": "reach",
    "steerlab/Push-v0": "push",
    "steerlab/PickPlace-v0": "pick_place",
    "steerlab/Sort-v0": "sort",
}


class TabletopGymEnv(gymnasium.Env):
    """One episode at a time. ``terminated`` = success; ``truncated`` = out of steps.

    ``info`` carries ``success``, ``progress`` and ``env_state`` (the functional state, for
    oracle verifiers that copy it and simulate candidate chunks with ``self.env``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str = "pick_place",
        variant: str = "nominal",
        image: bool = True,
        max_steps: int | None = None,
        reward: str = "sparse",
        render_mode: str | None = None,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: unknown {render_mode!r}; allowed: None, 'rgb_array'")
        self.env = make(task, variant, image=image, max_steps=max_steps, reward=reward)
        self.render_mode = render_mode
        obs_spaces = {
            "state": spaces.Box(-1.0, 1.0, (STATE_DIM,), np.float32),
            "instruction": spaces.Box(0, len(VOCAB) - 1, (INSTRUCTION_LEN,), np.int32),
            "task_id": spaces.Box(0, len(TASKS) - 1, (), np.int32),
            "time": spaces.Box(0.0, 1.0, (), np.float32),
        }
        if image:
            obs_spaces["image"] = spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._reset = jax.jit(self.env.reset)
        self._step = jax.jit(self.env.step)
        self._render = jax.jit(self.env.render)
        self._state = None

    def _info(self, success, progress) -> dict:
        return {"success": bool(success), "progress": float(progress), "env_state": self._state}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # options={"key": k} starts from exactly the state the functional reset(k) gives, so a
        # Python-loop evaluation can reproduce a compiled one episode for episode.
        if options and "key" in options:
            key = options["key"]
        else:
            key = jax.random.PRNGKey(int(self.np_random.integers(0, 2**31 - 1)))
        self._state, obs = self._reset(key)
        return _to_numpy(obs), self._info(self._state.success, self._state.progress)

    def step(self, action):
        if self._state is None:
            raise RuntimeError("step: call reset() first")
        action = np.asarray(action, np.float32).reshape(ACTION_DIM)
        self._state, obs, reward, done, info = self._step(self._state, action)
        success = bool(info["success"])
        truncated = bool(done) and not success
        return (
            _to_numpy(obs),
            float(reward),
            success,
            truncated,
            self._info(success, info["progress"]),
        )

    def render(self):
        if self._state is None:
            return None
        return np.asarray(self._render(self._state))


def _to_numpy(obs: dict) -> dict:
    return {k: np.asarray(v) for k, v in obs.items()}


def register() -> None:
    """Register every id once (safe to call repeatedly)."""
    for env_id, task in GYM_IDS.items():
        if env_id in gymnasium.registry:
            continue
        gymnasium.register(
            id=env_id, entry_point="envs.gym_env:TabletopGymEnv", kwargs={"task": task}
        )

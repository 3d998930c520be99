"""gymnasium wrapper over a functional tabletop env (jitted reset/step, numpy at the boundary)."""

from __future__ import annotations

import gymnasium
import jax
import numpy as np
from gymnasium import spaces

from envs.base import ACTION_DIM, IMAGE_SIZE
from envs.language import INSTRUCTION_LEN, VOCAB
from envs.tabletop import TASKS, make
from envs.tabletop_world import STATE_DIM

GYM_IDS = {
    "steerlab/Reach-v0": "reach",
    "steerlab/Push-v0": "push",
    "steerlab/PickPlace-v0": "pick_place",
    "steerlab/Sort-v0": "sort",
}


class TabletopGymEnv(gymnasium.Env):
    """One episode at a time. ``terminated`` = success; ``truncated`` = out of steps.

    ``info`` carries ``success``, ``progress``, ``nonfinite_actions`` (steps this episode whose
    action had a NaN or inf entry; the env replaced those entries by safe values, see
    ``TabletopEnv.step``) and ``env_state`` (the functional state, for oracle verifiers that
    copy it and simulate candidate chunks with ``self.env``).

    ``step`` takes a real (int or float) array or list of shape ``(ACTION_DIM,)``; anything else
    raises TypeError or ValueError before the episode is touched. ``reset`` takes
    ``options={"key": k}`` with ``k`` a jax PRNG key (see ``check_key``); other option names are
    rejected.
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
        return {
            "success": bool(success),
            "progress": float(progress),
            "nonfinite_actions": int(self._state.nonfinite_actions),
            "env_state": self._state,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        key = _reset_key(options)  # validated before anything changes
        super().reset(seed=seed)
        # options={"key": k} starts from exactly the state the functional reset(k) gives, so a
        # Python-loop evaluation can reproduce a compiled one episode for episode.
        if key is None:
            key = jax.random.PRNGKey(int(self.np_random.integers(0, 2**31 - 1)))
        self._state, obs = self._reset(key)
        return _to_numpy(obs), self._info(self._state.success, self._state.progress)

    def step(self, action):
        if self._state is None:
            raise RuntimeError("step: call reset() first")
        action = check_action(action)
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


RESET_OPTIONS = ("key",)
_ACTION_EXPECTED = f"a real (int or float) array of shape ({ACTION_DIM},) = (dx, dy, grip)"
_KEY_EXPECTED = (
    "a jax PRNG key: a uint32 array of shape (2,) (jax.random.PRNGKey) or a typed key of "
    "shape () (jax.random.key)"
)


def check_action(action) -> np.ndarray:
    """-> the action as float32 [ACTION_DIM]; TypeError / ValueError naming what is expected.

    NaN and inf pass (the env replaces and counts them); wrong shapes and types do not, since
    reshaping or casting them would step with an action nobody meant."""
    if action is None or isinstance(action, (str, bytes)):
        raise TypeError(f"action must be {_ACTION_EXPECTED}, got {type(action).__name__}")
    try:
        arr = np.asarray(action)
    except (TypeError, ValueError):  # ragged nested lists
        raise ValueError(f"action must be {_ACTION_EXPECTED}, got a {type(action).__name__} "
                         "that is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"action must be {_ACTION_EXPECTED}, got dtype {arr.dtype}")
    if arr.shape != (ACTION_DIM,):
        raise ValueError(f"action must be {_ACTION_EXPECTED}, got shape {arr.shape}")
    # Clip finite entries before the cast: a finite float64 beyond float32's range would
    # otherwise become inf (and count as non-finite). The env clips to the same bounds, so
    # nothing else changes; NaN and inf are left for the env to replace and count.
    return np.where(np.isfinite(arr), np.clip(arr, -1.0, 1.0), arr).astype(np.float32)


def check_key(key) -> jax.Array:
    """-> ``key`` if it is a jax PRNG key; TypeError / ValueError naming ``options["key"]``."""
    if key is None or isinstance(key, (str, bytes)) or not hasattr(key, "dtype"):
        raise TypeError(f'options["key"] must be {_KEY_EXPECTED}, got {type(key).__name__}')
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or jax.random.key_data(key).shape != (2,):
            raise ValueError(f'options["key"] must be {_KEY_EXPECTED}, got a typed key of shape '
                             f"{key.shape}")
        return key
    if key.dtype != np.uint32:
        raise TypeError(f'options["key"] must be {_KEY_EXPECTED}, got dtype {key.dtype}')
    if key.shape != (2,):
        raise ValueError(f'options["key"] must be {_KEY_EXPECTED}, got shape {key.shape}')
    return key


def _reset_key(options) -> jax.Array | None:
    """The key ``options`` asks for, None to draw one; errors name the allowed options."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict with keys from {RESET_OPTIONS} or None, got "
                        f"{type(options).__name__}")
    unknown = sorted(map(str, set(options) - set(RESET_OPTIONS)))
    if unknown:
        raise ValueError(f"options: unknown {unknown}; allowed: {RESET_OPTIONS}")
    return check_key(options["key"]) if "key" in options else None


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

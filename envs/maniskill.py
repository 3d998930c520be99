"""ManiSkill3 tabletop tasks as the env suite ``maniskill`` (optional extra ``maniskill``).

ManiSkill3 (mani-skill 3.0.1, SAPIEN 3.0.3) is a torch simulator, so it is stepped on the host
(``jittable=False``): ``steerlab eval suite=maniskill task=PickCube-v1 ...`` runs the harness's
jitted, vmapped decisions over ``eval.host_envs`` environments at a time through the batched
host driver (``envs.host``), each environment a ``ManiSkillGymEnv``. The CPU backend allows one
simulation per ``gym.make`` (``num_envs=1``); several of them live in one process or in
``eval.host_workers`` worker processes.

Observation dict (as the built-in suite's, ``envs.base``):
    state        float32 [S]   ManiSkill's flattened ``obs_mode="state"`` vector (robot qpos,
                               qvel, TCP pose, object and goal poses; S depends on the task)
    instruction  int32   [L]   the task's instruction over this suite's vocabulary
    task_id      int32   []    the task's index in ``TASKS``
    time         float32 []    elapsed steps / the time limit
    image        uint8 [128, 128, 3]  (``image=True``) the task's first camera (``base_camera``)
``info["success"]`` is ManiSkill's; ``info["progress"]`` is its normalised dense reward in
[0, 1] (1 on success), so dense-reward methods (TT-VLA) run here too. Actions are the control
mode's normalised [-1, 1] vector (``pd_ee_delta_pose``: 6 end-effector deltas + gripper).

SAPIEN wants a usable Vulkan device even for state-only physics: Mesa >= 25's lavapipe (Debian
bookworm-backports, ``make setup-maniskill``), on which ``image=True`` also renders the camera
(on the CPU, about a tenth of the state-only step rate: ``steerlab bench env --suite
maniskill``). Without one, making an env fails with that reason. A task whose assets would
need a download fails at once
(``MS_SKIP_ASSET_DOWNLOAD_PROMPT=1``): nothing can be downloaded here. Demonstrations:
``envs.maniskill_demos``.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np

from envs.base import EnvSpec
from envs.language import INSTRUCTION_LEN

# The tasks whose assets ship inside the mani-skill wheel, with an instruction each.
TASKS: dict[str, str] = {
    "PickCube-v1": "pick up the cube and move it to the goal",
    "PushCube-v1": "push the cube to the goal",
    "PullCube-v1": "pull the cube to the goal",
    "StackCube-v1": "stack the red cube on the green cube",
    "PegInsertionSide-v1": "insert the peg into the hole",
}
# Time limits at the pace of the motion-planned demonstrations (``envs.maniskill_demos``: the
# plans take 65-154 steps, hesitant segments and the end-effector replay's lag add to that), not
# ManiSkill's RL defaults (50; PegInsertionSide 100).
TIME_LIMITS = {"PickCube-v1": 150, "PushCube-v1": 150, "PullCube-v1": 150, "StackCube-v1": 200,
               "PegInsertionSide-v1": 300}
VARIANTS = ("nominal",)
CAMERA_SIZE = 128  # the tasks' base_camera
CONTROL_MODES = ("pd_ee_delta_pose", "pd_ee_delta_pos", "pd_joint_delta_pos", "pd_joint_pos")
VOCAB = ("<pad>", *sorted({w for text in TASKS.values() for w in text.split()}))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
SETUP_HINT = ("install the maniskill extra and a Vulkan driver once: `make setup-maniskill` "
              "(README)")


def tokenize(text: str) -> np.ndarray:
    """This suite's instruction -> int32 [INSTRUCTION_LEN], right-padded with 0."""
    ids = np.zeros(INSTRUCTION_LEN, np.int32)
    words = text.split()
    ids[: len(words)] = [WORD_ID[w] for w in words]
    return ids


def _import_maniskill():
    os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")  # fail at once, never prompt
    try:
        import gymnasium
        import mani_skill.envs  # noqa: F401  (registers the ManiSkill ids with gymnasium)
    except ImportError as e:
        raise ImportError(f"suite maniskill needs mani-skill ({e}); {SETUP_HINT}") from None
    return gymnasium


def _check(task: str, control_mode: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)} for suite 'maniskill', got {task!r}")
    if control_mode not in CONTROL_MODES:
        raise ValueError(f"control_mode must be one of {list(CONTROL_MODES)}, got "
                         f"{control_mode!r}")


class ManiSkillGymEnv:
    """One ManiSkill3 environment with steerlab's observation dict and info; the gymnasium
    reset/step signature the host driver expects. ``terminated`` = success, ``truncated`` = the
    time limit. ``reset(options={"key": k})`` seeds ManiSkill from the jax key's data, so
    episode i starts from the same state in every arm of a paired comparison."""

    def __init__(self, task: str = "PickCube-v1", max_steps: int | None = None,
                 control_mode: str = "pd_ee_delta_pose", image: bool = False):
        _check(task, control_mode)
        gym = _import_maniskill()
        self.task, self.task_id, self.image = task, list(TASKS).index(task), image
        self.max_steps = max_steps or TIME_LIMITS[task]
        try:
            # state observations in both cases; the camera is rendered on top (``_camera``)
            self.env = gym.make(task, obs_mode="state", sim_backend="physx_cpu",
                                control_mode=control_mode,
                                render_backend="cpu" if image else "none",
                                reward_mode="normalized_dense", max_episode_steps=self.max_steps)
        except RuntimeError as e:
            if "rendering device" in str(e) or "physical device" in str(e):
                need = ("image observations need a Vulkan device to render" if image else
                        "SAPIEN wants a Vulkan device even for state-only physics")
                raise RuntimeError(f"suite maniskill: {need}, and none is usable ({e}); "
                                   f"{SETUP_HINT}") from None
            raise
        self.instruction = tokenize(TASKS[task])
        self.t = 0
        self.nonfinite_actions = 0

    def _obs(self, state) -> dict:
        obs = {"state": np.asarray(state, np.float32).reshape(-1),
               "instruction": self.instruction, "task_id": np.int32(self.task_id),
               "time": np.float32(self.t / self.max_steps)}
        if self.image:
            obs["image"] = self._camera()
        return obs

    def _camera(self) -> np.ndarray:
        """The first camera's RGB frame, uint8 [128, 128, 3] (ManiSkill's sensor capture)."""
        u = self.env.unwrapped
        u.scene.update_render()
        u.capture_sensor_data()
        frames = u.get_sensor_images()
        return np.asarray(next(iter(frames.values()))["rgb"][0], np.uint8)

    def _info(self, info, progress) -> dict:
        return {"success": bool(np.asarray(info["success"]).reshape(-1)[0]),
                "progress": float(np.asarray(progress).reshape(-1)[0]),
                "nonfinite_actions": self.nonfinite_actions}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options and "key" in options:
            k = np.asarray(options["key"]).reshape(-1).astype(np.uint64)
            seed = int((k[0] * 2**32 + k[-1]) % (2**31 - 1))  # both words of a PRNGKey
        state, info = self.env.reset(seed=seed)
        self.t, self.nonfinite_actions = 0, 0
        import torch

        zero = torch.zeros((1, *self.env.action_space.shape))
        progress = self.env.unwrapped.compute_normalized_dense_reward(obs=state, action=zero,
                                                                      info=info)
        return self._obs(state), self._info(info, progress)

    def step(self, action):
        action = np.asarray(action, np.float32)
        if action.shape != self.env.action_space.shape:
            raise ValueError(f"action must have shape {self.env.action_space.shape} for "
                             f"{self.task}, got {action.shape}")
        if not np.all(np.isfinite(action)):  # no motion on that axis, counted per episode
            self.nonfinite_actions += 1
            action = np.nan_to_num(action, nan=0.0, posinf=0.0, neginf=0.0)
        state, reward, _, _, info = self.env.step(np.clip(action, -1.0, 1.0))
        self.t += 1
        out = self._info(info, reward)
        return self._obs(state), out["progress"], out["success"], \
            self.t >= self.max_steps and not out["success"], out

    def rollout_chunks(self, chunks: np.ndarray, success_bonus: float) -> np.ndarray:
        """The simulator oracle (``oracle_sim`` on the host): each chunk [M, h, A] executed
        from the current state, which is saved and restored around each (ManiSkill's state
        dict: every actor's and articulation's pose and velocity, and the step counter) ->
        progress after the chunk + ``success_bonus`` if it succeeded (stopping there), [M]."""
        u = self.env.unwrapped
        saved, elapsed = u.get_state_dict(), u._elapsed_steps.clone()

        def restore():
            u.set_state_dict(saved)
            u._elapsed_steps[:] = elapsed

        scores = np.zeros(len(chunks), np.float32)
        for m, chunk in enumerate(np.clip(np.nan_to_num(np.asarray(chunks, np.float32)), -1, 1)):
            restore()
            for action in chunk:
                _, reward, _, _, info = self.env.step(action)
                out = self._info(info, reward)
                scores[m] = out["progress"] + success_bonus * out["success"]
                if out["success"]:
                    break
        restore()
        return scores

    def close(self) -> None:
        self.env.close()


@functools.cache
def _dims(task: str, control_mode: str) -> tuple[int, int]:
    """(state dim, action dim) of a task under a control mode, read from one environment."""
    env = ManiSkillGymEnv(task, control_mode=control_mode)
    try:
        return int(env.reset(seed=0)[0]["state"].shape[0]), int(env.env.action_space.shape[0])
    finally:
        env.close()


@dataclass(frozen=True)
class ManiSkillSuiteEnv:
    """What ``make`` returns: the spec policies size themselves from and a picklable factory
    of environments for the host driver."""

    spec: EnvSpec
    control_mode: str

    def factory(self) -> ManiSkillGymEnv:
        return ManiSkillGymEnv(self.spec.task, self.spec.max_steps, self.control_mode,
                               self.spec.image)


def make(task: str = "PickCube-v1", variant: str = "nominal", image: bool = False,
         max_steps: int | None = None, control_mode: str = "pd_ee_delta_pose"
         ) -> ManiSkillSuiteEnv:
    _check(task, control_mode)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)} for suite 'maniskill', got "
                         f"{variant!r}")
    state_dim, action_dim = _dims(task, control_mode)
    spec = EnvSpec(task=task, variant=variant, state_dim=state_dim, action_dim=action_dim,
                   instruction_len=INSTRUCTION_LEN, vocab_size=len(VOCAB), num_tasks=len(TASKS),
                   max_steps=max_steps or TIME_LIMITS[task], image=image,
                   image_size=CAMERA_SIZE)
    return ManiSkillSuiteEnv(spec, control_mode)


def bench(tasks: tuple[str, ...] = tuple(TASKS), steps: int = 100, seed: int = 0) -> dict:
    """Per task, with state and with image observations: seconds to make and reset one env,
    and steps/s over ``steps`` random actions (one env in this process)."""
    rows = {}
    for task in tasks:
        row = {}
        for kind, image in (("state", False), ("image", True)):
            t0 = time.perf_counter()
            env = ManiSkillGymEnv(task, image=image)
            obs, _ = env.reset(seed=seed)
            made = time.perf_counter() - t0
            rng = np.random.default_rng(seed)
            actions = rng.uniform(-1, 1, (steps, *env.env.action_space.shape)).astype(np.float32)
            t0 = time.perf_counter()
            for a in actions:
                obs, _, terminated, truncated, _ = env.step(a)
                if terminated or truncated:
                    obs, _ = env.reset(seed=seed)
            row[kind] = {"make_reset_s": made, "steps_per_s": steps / (time.perf_counter() - t0),
                         "obs": {k: list(np.shape(v)) for k, v in obs.items()}}
            env.close()
        rows[task] = row
    return {"suite": "maniskill", "steps": steps, "tasks": rows, "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0]}

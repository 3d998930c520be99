"""Motion-planned ManiSkill3 demonstrations with suboptimal modes (run as a script).

ManiSkill's motion-planning solutions need mplib 0.1.1, which segfaults under numpy 2 while the
project's JAX needs numpy 2, so this file runs in a small separate environment (``.venv-mp``,
numpy < 2; ``make setup-maniskill``) as a subprocess of ``envs.maniskill_demos``. It imports
neither JAX nor the rest of steerlab and writes raw trajectories to one ``.npz``.

Per episode (seed s):
1. the task's motion-planning solution (π*) runs in ``pd_joint_pos`` control; every
   ``segment`` planned actions a mode is drawn from the mixture and perturbs them:
   optimal (as planned), hesitant (each planned action is preceded by a repeat of the
   previous one: the arm lags), noisy (Gaussian noise of ``noise`` rad on the 7 joint
   targets), release (the gripper is commanded open: an early release);
2. the executed end-effector path is converted to the policy's control mode, ``pd_ee_delta_pose``,
   by a closed-loop replay from the same initial state: at each step the action moves the TCP
   from where it is toward the recorded next TCP pose (translation / 0.1 m, rotation as XYZ
   Euler angles / -0.1 rad, the gripper command copied), and past the path's end toward its
   last pose for up to ``settle`` steps (the end-effector controller lags the joint-space one).
   The stored trajectory is the replay's, ended at its first success, so its observations,
   actions and success agree with the control mode the policy acts in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

MODES = ("optimal", "hesitant", "noisy", "release")


class _TooLong(Exception):
    pass


def _tcp_at_base(env):
    agent = env.unwrapped.agent
    pose = agent.robot.pose.inv() * agent.tcp.pose
    return np.concatenate([pose.p.cpu().numpy()[0], pose.q.cpu().numpy()[0]])


def _make_perturbed(gym, base, weights, segment, noise, max_steps, rng):
    class Perturbed(gym.Wrapper):
        """Draws a mode per ``segment`` planned actions and records the executed path."""

        def reset(self, **kwargs):
            out = self.env.reset(**kwargs)
            self.planned, self.modes, self.prev = 0, [], None
            self.path, self.grip, self.step_modes = [_tcp_at_base(self.env)], [], []
            return out

        def _exec(self, action, mode):
            if len(self.grip) >= max_steps:
                raise _TooLong
            out = self.env.step(action)
            self.path.append(_tcp_at_base(self.env))
            self.grip.append(float(action[-1]))
            self.step_modes.append(mode)
            self.prev = action
            return out

        def step(self, action):
            seg = self.planned // segment
            while len(self.modes) <= seg:
                self.modes.append(int(rng.choice(len(MODES), p=weights)))
            mode, self.planned = self.modes[seg], self.planned + 1
            a = np.array(action, np.float64)
            if MODES[mode] == "noisy":
                a[:7] += rng.normal(0.0, noise, 7)
            if MODES[mode] == "release":
                a[-1] = 1.0  # open
            if MODES[mode] == "hesitant" and self.prev is not None:
                self._exec(self.prev, mode)
            return self._exec(a, mode)

    return Perturbed(base)


def _delta_action(cur, target, grip):
    """pd_ee_delta_pose action (normalised) from TCP pose ``cur`` toward ``target`` (p, q wxyz,
    both in the robot base frame): target q = delta q * cur q (root-aligned body rotation)."""
    import torch
    from mani_skill.utils.geometry.rotation_conversions import (
        matrix_to_euler_angles,
        quaternion_invert,
        quaternion_multiply,
        quaternion_to_matrix,
    )

    dp = np.clip((target[:3] - cur[:3]) / 0.1, -1.0, 1.0)
    dq = quaternion_multiply(torch.tensor(target[3:]), quaternion_invert(torch.tensor(cur[3:])))
    # the controller scales the rotation entries by rot_lower = -0.1 (pd_ee_pose.py), sign
    # included, where the translation entries map [-1, 1] onto [-0.1, 0.1]
    rot = -matrix_to_euler_angles(quaternion_to_matrix(dq), "XYZ").numpy() / 0.1
    norm = np.linalg.norm(rot)
    if norm > 1.0:
        rot = rot / norm
    return np.concatenate([dp, rot, [grip]]).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", required=True, help=f"json list, one weight per {MODES}")
    p.add_argument("--segment", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--settle", type=int, default=30,
                   help="replay steps allowed past the recorded path's end")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS

    weights = np.asarray(json.loads(args.weights), np.float64)
    rng = np.random.default_rng(args.seed)
    common = dict(obs_mode="state", sim_backend="physx_cpu", render_backend="none",
                  reward_mode="normalized_dense", max_episode_steps=10_000)
    joint = _make_perturbed(gym, gym.make(args.task, control_mode="pd_joint_pos", **common),
                            weights, args.segment, args.noise, args.max_steps, rng)
    ee = gym.make(args.task, control_mode="pd_ee_delta_pose", **common)
    rows = {k: [] for k in ("state", "action", "progress", "success", "mode", "episode", "t")}
    episodes = {k: [] for k in ("seed", "planned_success", "length", "success", "failed_plan")}
    seed = args.seed * 100_000
    for e in range(args.episodes):
        seed += 1
        try:
            res = MP_SOLUTIONS[args.task](joint, seed=seed, debug=False, vis=False)
            failed = isinstance(res, int) and res == -1
            planned_ok = (not failed) and bool(np.asarray(res[-1]["success"]).reshape(-1)[0])
        except _TooLong:
            failed, planned_ok = False, False
        except Exception as err:  # a planning failure: ManiSkill's run.py treats it the same
            print(f"seed {seed}: motion planning failed ({err})", file=sys.stderr)
            failed, planned_ok = True, False
        obs, _ = ee.reset(seed=seed)
        success, n, steps = False, 0, len(joint.grip)
        # the replay lags the joint-space execution, so it may track the last pose a while
        for j in range(min(steps + args.settle, args.max_steps) if steps else 0):
            k = min(j, steps - 1)
            action = _delta_action(_tcp_at_base(ee), joint.path[k + 1], joint.grip[k])
            rows["state"].append(np.asarray(obs, np.float32).reshape(-1))
            obs, reward, _, _, info = ee.step(action)
            success = bool(np.asarray(info["success"]).reshape(-1)[0])
            progress = float(np.asarray(reward).reshape(-1)[0])
            for name, value in (("action", action), ("progress", progress), ("success", success),
                                ("mode", joint.step_modes[k]), ("episode", e), ("t", j)):
                rows[name].append(value)
            n += 1
            if success:
                break
        for name, value in (("seed", seed), ("planned_success", planned_ok), ("length", n),
                            ("success", success), ("failed_plan", failed)):
            episodes[name].append(value)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in rows.items()},
                        **{f"episode_{k}": np.asarray(v) for k, v in episodes.items()})
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

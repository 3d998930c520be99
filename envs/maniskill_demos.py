"""ManiSkill3 demonstrations in steerlab's dataset format (``steerlab demos --suite maniskill``).

π* is ManiSkill's motion-planning solution of the task; the suboptimal modes perturb its
execution per segment of planned actions (``envs/maniskill_mp.py``: hesitant, noisy, an early
release). The planner needs numpy < 2, so it runs as a subprocess in ``.venv-mp`` (or the
interpreter named by ``STEERLAB_MP_PYTHON``), created by ``make setup-maniskill``; its raw
trajectories, already converted to ``pd_ee_delta_pose`` by a closed-loop replay, are written
here as a dataset (``envs.dataset``) with modes, the per-step mode shares by progress bin and
the premise check, as the built-in suite's are. A mode index refers to the manifest's
``modes`` (``MODES``), not to the built-in suite's.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import numpy as np

from envs.dataset import save_dataset
from envs.maniskill import SETUP_HINT, TASKS, TIME_LIMITS, tokenize
from envs.mixture import bin_names, mode_shares_by_bin, premise_check, progress_bins
from envs.mixture import parse_mix as parse_weights  # the syntax; the modes are this suite's

MODES = ("optimal", "hesitant", "noisy", "release")  # the order of envs/maniskill_mp.py's
# Weights per segment. A hesitant segment takes twice the steps, so per step (what a count
# sees) these give π* about 64% and each other mode at most 18%: the premise check's targets.
MIXTURES = {"premise": {"optimal": 0.7, "hesitant": 0.1, "noisy": 0.1, "release": 0.1}}
REPLAN = 4  # the harness's default: every 4th step is a decision step
_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maniskill_mp.py")


def parse_mix(mix: str | None) -> dict[str, float]:
    """A named mixture or 'mode=weight,...' over ``MODES`` -> normalised weights."""
    text = (mix or "premise").strip()
    if text in MIXTURES:
        weights = MIXTURES[text]
    elif "=" in text:
        weights = parse_weights(text)
    else:
        raise ValueError(f"mix: {text!r} is neither a mixture name {sorted(MIXTURES)} nor "
                         "'mode=weight,...'")
    unknown = sorted(set(weights) - set(MODES))
    if unknown:
        raise ValueError(f"mix: unknown modes {unknown}; suite maniskill's modes are "
                         f"{list(MODES)}")
    total = sum(weights.values())
    if any(w < 0 for w in weights.values()) or not total > 0:
        raise ValueError(f"mix: weights must be >= 0 with a positive sum, got {weights}")
    return {m: weights.get(m, 0.0) / total for m in MODES}


def mp_python() -> str:
    """The interpreter of the motion-planning environment."""
    path = os.environ.get("STEERLAB_MP_PYTHON") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mp", "bin", "python")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"motion-planned demonstrations need the planning environment "
                                f"({path} not found: mplib needs numpy < 2); {SETUP_HINT}")
    return path


def write_maniskill_demos(task: str, episodes: int, mix: str | None, seed: int, out_dir: str,
                          variant: str = "nominal", segment: int = 4, noise: float = 0.05,
                          settle: int = 30, image: bool = False,
                          overwrite: bool = False) -> dict:
    """Motion-planned episodes of ``task`` with a mode per ``segment`` planned actions drawn
    from ``mix`` -> the dataset's manifest (written through a temporary sibling, which replaces
    ``out_dir`` only with ``overwrite``)."""
    if image:
        raise ValueError("demos.image: suite maniskill writes state-only demonstrations (camera "
                         "frames would be re-rendered by replay, not built yet); set it false")
    if variant != "nominal":
        raise ValueError(f"variant: suite maniskill has only 'nominal', got {variant!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)} for suite 'maniskill', got {task!r}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if segment < 1:
        raise ValueError(f"segment must be >= 1 for suite maniskill, got {segment}")
    weights = parse_mix(mix)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"out_dir: {out_dir} exists; give another --out, or delete it to "
                         "write it again")
    max_steps = TIME_LIMITS[task]
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.npz")
        cmd = [mp_python(), _SCRIPT, "--task", task, "--episodes", str(episodes),
               "--seed", str(seed), "--weights", json.dumps([weights[m] for m in MODES]),
               "--segment", str(segment), "--noise", str(noise), "--settle", str(settle),
               "--max-steps", str(max_steps), "--out", raw_path]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"motion planning for {task} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        with np.load(raw_path) as z:
            raw = {k: z[k] for k in z.files}
    return save_dataset(out_dir, *to_dataset(raw, task, max_steps),
                        manifest_extra(raw, task, weights, segment, noise, seed, max_steps))


def to_dataset(raw: dict, task: str, max_steps: int) -> tuple[dict, dict]:
    """Raw replayed trajectories -> (steps, episodes) in the dataset layout."""
    n, t = len(raw["action"]), raw["t"].astype(np.int32)
    last = np.ones(n, bool)
    last[:-1] = raw["episode"][1:] != raw["episode"][:-1]
    steps = {
        "state": raw["state"].astype(np.float32),
        "instruction": np.broadcast_to(tokenize(TASKS[task]), (n, len(tokenize("")))),
        "task_id": np.full(n, list(TASKS).index(task), np.int32),
        "time": t / np.float32(max_steps),
        "action": raw["action"],
        "mode": raw["mode"],
        "reward": raw["success"].astype(np.float32),  # sparse, as the built-in suite's
        "done": last,
        "success": raw["success"],
        "progress": raw["progress"],
        "episode": raw["episode"],
        "t": t,
        "decision": t % REPLAN == 0,
        "mode_label": np.eye(len(MODES), dtype=np.float32)[raw["mode"]],  # the true modes
    }
    eps = {"mode": np.full(len(raw["episode_length"]), -1, np.int32),
           "length": raw["episode_length"], "success": raw["episode_success"],
           "wrong_block": np.zeros(len(raw["episode_length"]), bool)}
    return steps, eps


def state_progress(raw: dict) -> np.ndarray:
    """The progress of each step's state: the previous step's (0 at an episode's start)."""
    before = np.zeros_like(raw["progress"])
    before[1:] = raw["progress"][:-1]
    return np.where(raw["t"] == 0, 0.0, before)


def manifest_extra(raw: dict, task: str, weights: dict, segment: int, noise: float, seed: int,
                   max_steps: int) -> dict:
    at = raw["t"] % REPLAN == 0
    bins = progress_bins(state_progress(raw)[at])
    shares, counts = mode_shares_by_bin(bins, np.eye(len(MODES))[raw["mode"][at]])
    ok = raw["episode_success"].astype(bool)
    return {
        "suite": "maniskill", "task": task, "variant": "nominal",
        "control_mode": "pd_ee_delta_pose", "mix": weights, "segment": segment,
        "noise": noise, "max_steps": max_steps, "seed": seed, "image": False,
        "modes": list(MODES),
        "counts": {"episodes": int(len(ok)), "steps": int(len(raw["action"])),
                   "successes": int(ok.sum()),
                   "failed_plans": int(raw["episode_failed_plan"].sum())},
        "success_rate": float(ok.mean()),
        "planned_success_rate": float(raw["episode_planned_success"].mean()),
        "mode_shares": {"modes": list(MODES), "bins": bin_names(),
                        "decisions": counts.tolist(), "true": shares.tolist()},
        "premise": premise_check(shares, counts),
    }

"""Per-decision transitions of a demonstration dataset, for chunk-level Q-learning.

A chunk policy decides at steps t = 0, replan, 2*replan, ... of an episode: it proposes an
H-step chunk and executes only its first ``replan`` actions before deciding again. One row here
is one such decision: the observation, the full proposed chunk actions[t : t+H], the plain sum
of the rewards of the ``replan`` executed steps (fewer at the episode's end), the discount
gamma**replan (applied per decision, not per step), the observation at the next decision, and
the Monte-Carlo return-to-go G_d = R_d + gamma**replan * G_{d+1} (G = 0 after the last
decision), which Cal-QL's calibration lower bound needs.

Only the prefix actions[t : t+replan] is executed; the tail actions[t+replan : t+H] is part of
the chunk but its consequences are not in the reward or in next_obs. A Q(s, chunk) learned from
these rows is therefore a value of what the policy proposes, evaluated by executing its prefix;
it says nothing about the tail beyond what the tail correlates with in the data.

Reward is the dataset's stored per-step ``reward``: the env's default sparse reward
(``envs.tabletop``: 1.0 on the step that reaches success, else 0), so an episode's return is 1
if it succeeded and 0 otherwise.

Ends of episodes. ``done`` is True at the last decision of an episode that terminated (its last
stored step is a success). ``truncated`` is True at the last decision of one that did not: it
hit the time limit (the last step is done without success) or recording stopped because the
expert stood still for good (the last step is not done; see ``envs.demos``). A learner should
bootstrap from next_obs on truncated rows and not on done rows. The observation after an
episode's final action is not stored, so at the last decision next_obs is the episode's last
stored observation (the one its final action was taken at). The discount stays gamma**replan
on a last decision that executed fewer than ``replan`` steps; it only matters on truncated rows.

Chunks past the episode's end are padded by repeating its last action, as in
``Dataset.chunks``; ``chunk_valid`` marks the real actions.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from envs.dataset import Dataset


def check_args(H, replan, gamma) -> None:
    """Raise ValueError naming the first bad argument and its allowed values."""
    if isinstance(H, bool) or not isinstance(H, int) or H < 1:
        raise ValueError(f"H: must be an int >= 1, got {H!r}")
    if isinstance(replan, bool) or not isinstance(replan, int) or not 1 <= replan <= H:
        raise ValueError(f"replan: must be an int with 1 <= replan <= H (H={H}), got {replan!r}")
    if (isinstance(gamma, bool) or not isinstance(gamma, Real) or math.isnan(gamma)
            or not 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma: must be a number with 0 <= gamma <= 1, got {gamma!r}")


def chunk_rows(rows: np.ndarray, end: np.ndarray, H: int) -> tuple[np.ndarray, np.ndarray]:
    """Step rows of the H-step chunk from each row, clipped to its episode's last step (so the
    last action repeats) -> (idx [D, H], valid [D, H]); ``Dataset.chunks`` indexes the same way."""
    idx = rows[:, None] + np.arange(H)[None, :]
    valid = idx < end[:, None]
    return np.minimum(idx, end[:, None] - 1), valid


def returns_to_go(reward: np.ndarray, episode: np.ndarray, decision: np.ndarray,
                  discount: float) -> np.ndarray:
    """G_d = R_d + discount * G_{d+1} within each episode, G = 0 after its last decision.

    Rows are laid out in an [episodes, max decisions] grid (zeros past each episode's end, so
    they add nothing) and the recursion runs backwards over decision columns, not over rows.
    """
    if len(reward) == 0:
        return np.zeros(0, np.float32)
    grid = np.zeros((episode.max() + 1, decision.max() + 2))
    grid[episode, decision] = reward
    for j in range(grid.shape[1] - 2, -1, -1):
        grid[:, j] += discount * grid[:, j + 1]
    return grid[episode, decision].astype(np.float32)


def transitions(demos: Dataset, H: int, replan: int, gamma: float) -> dict:
    """One row per decision (steps t = 0, replan, 2*replan, ... of each episode) -> dict:

    obs dict [D, ...] (the keys of ``demos.obs``), chunk f32 [D, H, A], chunk_valid bool [D, H],
    reward f32 [D], discount f32 [D], next_obs dict [D, ...], done bool [D], truncated bool [D],
    return_to_go f32 [D], episode i32 [D], decision_index i32 [D] (0, 1, ... within the
    episode; ``Dataset.chunks``' bool ``decision`` marks segment starts instead) and t i32 [D]
    (the decision's step within the episode).

    A dict of arrays like ``Dataset.chunks``, so the same ``jax.tree.map`` indexing batches both.
    """
    check_args(H, replan, gamma)
    steps = demos.steps
    start, end = demos.step_bounds()
    t = np.arange(len(start)) - start  # step within the episode
    rows = np.flatnonzero(t % replan == 0)  # decisions, in episode order
    last = rows + replan >= end[rows]  # the episode's last decision
    next_rows = np.where(last, end[rows] - 1, rows + replan)
    reward = np.asarray(steps["reward"], np.float64)
    # each decision's executed steps run to the next decision row (or the dataset's end): the
    # next episode starts with a decision, so no sum crosses an episode boundary
    r = np.add.reduceat(reward, rows) if len(rows) else np.zeros(0)
    final = end[rows] - 1
    terminal = np.asarray(steps["success"], bool)[final]
    discount = float(gamma) ** replan
    idx, chunk_valid = chunk_rows(rows, end[rows], H)
    decision = t[rows] // replan
    episode = np.asarray(steps["episode"], np.int64)[rows]
    obs = demos.obs
    return {
        "obs": {k: v[rows] for k, v in obs.items()},
        "chunk": np.asarray(steps["action"], np.float32)[idx],
        "chunk_valid": chunk_valid,
        "reward": r.astype(np.float32),
        "discount": np.full(len(rows), discount, np.float32),
        "next_obs": {k: v[next_rows] for k, v in obs.items()},
        "done": last & terminal,
        "truncated": last & ~terminal,
        "return_to_go": returns_to_go(r, episode, decision, discount),
        "episode": episode.astype(np.int32),
        "decision_index": decision.astype(np.int32),
        "t": t[rows].astype(np.int32),
    }

"""Demonstration mixtures and the per-step statistics that check the premise on the data.

A mixture gives each scripted-expert mode a weight; the dataset draws a mode per segment of a few
steps from it, so at every decision state the data is that mixture. The premise of a
pseudo-count verifier (TACO) is that pi* is the densest mode *per step where decisions are made*:
``premise_check`` tests it bin by bin over task progress, from the data alone. The same binning
and tie-splitting labels compare a policy's executed chunks with its data.
"""

from __future__ import annotations

import numpy as np

from envs.experts import MODES
from envs.tabletop import TASKS, VARIANTS

# Named mixtures (per decision step, the same for every task). "premise": pi* the densest mode
# at every stage, as TACO's analysis assumes, with room for the base policy to fail.
# "counter_premise": pi* a minority and one failure mode (hesitant: pauses and half speed) the
# densest everywhere, so a verifier that follows the density must do worse than random there.
# The dominant failure mode must be distinct from pi* in chunk space at every stage (sloppy is
# not: it equals pi* until the release) and fatal only when it is followed: a segment of
# hesitation costs a few steps, always hesitating never finishes. That needs a longer time
# limit than the task's default, set per task in MIXTURE_MAX_STEPS so that the mixture itself
# succeeds in about half of its episodes, pi* in all and hesitant in none (simulated from the
# experts alone, 2000 episodes per task, before any policy was trained). wrong_object (a
# grounding failure) is left to explicit mixes: a segment of it drops the right block, so a
# mixture dominated by it almost never succeeds and leaves no room to hurt.
MIXTURES: dict[str, dict[str, float]] = {
    "premise": {"optimal": 0.6, "hesitant": 0.2, "detour": 0.1, "sloppy": 0.1},
    "counter_premise": {"optimal": 0.25, "hesitant": 0.5, "detour": 0.25},
}
MIXTURE_MAX_STEPS: dict[str, dict[str, int]] = {
    "counter_premise": {"reach": 40, "push": 78, "pick_place": 92, "sort": 126},
}
DEFAULT_MIX = "premise"
PROGRESS_BINS = 5
# The premise, checked on the data per progress bin at decision steps.
PREMISE_PI_STAR = (0.5, 0.7)
PREMISE_FAILURE_MAX = 0.25

def check_task_variant(task: str, variant: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; allowed values are {TASKS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; allowed values are {VARIANTS}")


def time_limit(task: str, mix: dict[str, float] | str | None) -> int | None:
    """The episode time limit a named mixture sets for ``task`` (None: the task's default). The
    demonstrations and every evaluation of a policy trained on them use it."""
    if isinstance(mix, str) and mix.strip() in MIXTURE_MAX_STEPS:
        return MIXTURE_MAX_STEPS[mix.strip()].get(task)
    return None


def _parse_named(text: str) -> dict[str, float]:
    if "=" not in text:
        raise ValueError(f"mix: unknown mixture {text!r}; give a name from {sorted(MIXTURES)} "
                         "or 'mode=weight,...'")
    return parse_mix(text)


def parse_mix(text: str) -> dict[str, float]:
    """'optimal=0.6,hesitant=0.4' -> {"optimal": 0.6, "hesitant": 0.4} (syntax only)."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"mix: malformed entry {part!r}; expected 'mode=weight,...'")
        if name in mix:
            raise ValueError(f"mix: mode {name!r} given twice")
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"mix: weight of {name!r} is not a number: {value!r}") from None
    if not mix:
        raise ValueError("mix: empty; expected 'mode=weight,...'")
    return mix


def validate_mix(task: str, mix: dict[str, float] | str) -> dict[str, float]:
    """A mixture name (``MIXTURES``) or 'mode=weight,...' -> weights; checks mode names against
    MODES[task] and that weights are >= 0 and sum to 1."""
    check_task_variant(task, "nominal")
    if isinstance(mix, str):
        mix = dict(MIXTURES[mix.strip()]) if mix.strip() in MIXTURES else _parse_named(mix)
    allowed = MODES[task]
    for name, w in mix.items():
        if name not in allowed:
            raise ValueError(f"mix: unknown mode {name!r} for task {task!r}; allowed: {allowed}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"mix: weight of {name!r} must be a finite number >= 0, got {w}")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mix: weights must sum to 1 (tolerance 1e-6), got {total:.9g}")
    return {k: float(v) for k, v in mix.items()}


def progress_bins(progress: np.ndarray, n_bins: int = PROGRESS_BINS) -> np.ndarray:
    """Equal-width bins of task progress in [0, 1] -> int [N] in 0..n_bins-1."""
    return np.clip((np.asarray(progress) * n_bins).astype(np.int64), 0, n_bins - 1)


def bin_names(n_bins: int = PROGRESS_BINS) -> list[str]:
    return [f"{i / n_bins:.1f}-{(i + 1) / n_bins:.1f}" for i in range(n_bins)]


def mode_shares_by_bin(bins: np.ndarray, weights: np.ndarray, n_bins: int = PROGRESS_BINS):
    """Per-bin mean of mode weights: bins int [N], weights [N, n_modes] (one-hot or the
    classifier's tie-splitting labels) -> (shares [n_bins, n_modes], counts [n_bins]); an empty
    bin has shares of NaN."""
    weights = np.asarray(weights, np.float64)
    sums = np.zeros((n_bins, weights.shape[1]))
    np.add.at(sums, np.asarray(bins), weights)
    counts = np.bincount(np.asarray(bins), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def label_accuracy(true_modes: np.ndarray, labels: np.ndarray, modes: tuple[str, ...]) -> dict:
    """How the classifier labels chunks of known mode: per true mode, the mean label weight on
    each mode (a row of the confusion matrix; the diagonal entry is the accuracy)."""
    out = {}
    for i, name in enumerate(modes):
        sel = np.asarray(true_modes) == i
        if sel.any():
            row = np.asarray(labels)[sel].mean(0)
            out[name] = {"n": int(sel.sum()), "accuracy": float(row[i]),
                         "labelled_as": {m: float(w) for m, w in zip(modes, row, strict=True)}}
    return out


def premise_check(shares: np.ndarray, counts: np.ndarray, min_count: int = 50) -> dict:
    """pi* (mode 0) within PREMISE_PI_STAR and every failure mode <= PREMISE_FAILURE_MAX in each
    progress bin holding at least ``min_count`` decisions."""
    used = np.asarray(counts) >= min_count
    pi_star = shares[used, 0]
    failure = shares[used, 1:]
    lo, hi = PREMISE_PI_STAR
    passed = bool(used.any() and np.all((pi_star >= lo) & (pi_star <= hi))
                  and np.all(failure <= PREMISE_FAILURE_MAX))
    return {"pi_star_min": float(pi_star.min()) if used.any() else None,
            "pi_star_max": float(pi_star.max()) if used.any() else None,
            "failure_max": float(failure.max()) if used.any() else None,
            "bins_checked": int(used.sum()),
            "targets": {"pi_star": list(PREMISE_PI_STAR), "failure_max": PREMISE_FAILURE_MAX},
            "passed": passed}

"""``steerlab fit-progress``: fit a progress estimator (``algos.progress``) on a demonstration
dataset, save it, and record its accuracy on held-out episodes and on other datasets
(out-of-distribution variants) in ``progress.json``."""

from __future__ import annotations

import os
import time

from algos.progress import (
    ProgressConfig,
    evaluate_progress,
    fit_progress,
    save_progress,
    split_episodes,
)
from core.config import apply_overrides, to_dict
from core.io import write_json
from envs.dataset import load_demos


def _dataset_key(manifest: dict, taken: dict, path: str) -> str:
    """task/variant of a dataset's manifest; the directory's name is added if that is taken."""
    key = f"{manifest.get('task', '?')}/{manifest.get('variant', '?')}"
    return f"{key}@{os.path.basename(os.path.normpath(path))}" if key in taken else key


def _source(path: str, manifest: dict) -> dict:
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    return {"path": os.path.abspath(path), "task": manifest.get("task"),
            "variant": manifest.get("variant"), "mix": manifest.get("mix"),
            "seed": manifest.get("seed"), "episodes": counts.get("episodes")}


def fit_progress_run(demos: str, out: str, eval_demos: list[str] | None = None,
                     overrides: list[str] | None = None) -> dict:
    """Fits on ``demos`` with ``field=value`` overrides of ``ProgressConfig``, saves the
    estimator into ``out`` and writes ``out/progress.json`` -> that record."""
    cfg = apply_overrides(ProgressConfig, ProgressConfig(), list(overrides or []))
    data = load_demos(demos)
    others = [(p, load_demos(p)) for p in eval_demos or []]  # fail on a bad path before training
    curve: list[dict] = []
    start = time.perf_counter()
    estimator = fit_progress(data, cfg, log=curve.append)
    fit_s = time.perf_counter() - start
    save_progress(estimator, out)

    train_eps, held_eps = split_episodes(data.num_episodes, cfg.holdout, cfg.seed)
    record = {
        "config": to_dict(cfg),
        "demos": _source(demos, data.manifest),
        "split": {"train_episodes": int(len(train_eps)), "heldout_episodes": int(len(held_eps)),
                  "heldout": held_eps.tolist()},
        "loss_curve": curve,
        "fit_s": fit_s,
        "train": evaluate_progress(estimator, data, train_eps)["overall"],
        "heldout": evaluate_progress(estimator, data, held_eps) if len(held_eps) else None,
        "eval": {},
    }
    for path, other in others:
        key = _dataset_key(other.manifest, record["eval"], path)
        record["eval"][key] = {"demos": _source(path, other.manifest),
                               **evaluate_progress(estimator, other)}
    write_json(os.path.join(out, "progress.json"), record)
    return record


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def progress_table(record: dict) -> str:
    """The accuracy rows of a ``progress.json`` record as a fixed-width table."""
    sets = ([("heldout", record["heldout"])] if record.get("heldout") else [])
    sets += list(record.get("eval", {}).items())
    head = (f"{'dataset':<24}{'group':<14}{'steps':>8}{'MAE':>8}{'Spearman':>10}"
            f"{'inc.Spearman':>14}")
    lines = [head, "-" * len(head)]
    for name, r in sets:
        groups = [("overall", r["overall"]), *r["modes"].items(), *r["outcome"].items()]
        for group, m in groups:
            lines.append(f"{name:<24}{group:<14}{m['steps']:>8}{_fmt(m['mae']):>8}"
                         f"{_fmt(m['spearman']):>10}{_fmt(m['increment_spearman']):>14}")
        lines.append(f"{name:<24}{'(constant)':<14}{'':>8}{_fmt(r['overall']['constant_mae']):>8}")
    return "\n".join(lines)

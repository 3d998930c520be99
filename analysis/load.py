"""Run directories → one tidy table.

A run directory holds ``result.json`` (schema ``steerlab.result/1``) and usually ``config.json``.
Each run becomes one row: the resolved config flattened to dotted columns (``verifier.name``,
``eval.M``), scalar metrics as ``metrics.<name>``, latencies as ``latency_ms.<phase>.<stat>``,
plus ``kind``, ``schema``, ``path`` and the ``policy_dir`` / ``verifier_dir`` a run names. Curves
stay out of the table; ``load_records`` keeps them. ``episodes.jsonl`` (one row per evaluation
episode) is read separately with ``read_episodes``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
EPISODES_FILE = "episodes.jsonl"
LOCATION_KEYS = ("policy_dir", "verifier_dir")


def _as_paths(paths_or_dirs) -> list[Path]:
    if isinstance(paths_or_dirs, str | os.PathLike):
        return [Path(paths_or_dirs)]
    return [Path(p) for p in paths_or_dirs]


def _skip(path: Path, root: Path) -> bool:
    # Temp dirs of interrupted writes and the shared stage cache are not runs.
    rel = path.relative_to(root).parts[:-1]
    return any(p.startswith(".") or p == "stages" for p in rel)


def find_results(paths_or_dirs) -> list[Path]:
    """``result.json`` files under the given files/directories, sorted, without duplicates."""
    found: list[Path] = []
    for p in _as_paths(paths_or_dirs):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(f for f in sorted(p.rglob(RESULT_FILE)) if not _skip(f, p))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def load_records(paths_or_dirs) -> list[dict]:
    """Raw result dicts (with ``path`` = run dir, ``config`` filled from config.json if absent).

    Unreadable files are skipped, not fatal: a grid may be read while cells are still writing.
    """
    records = []
    for f in find_results(paths_or_dirs):
        try:
            rec = _read_json(f)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict):
            continue
        run_dir = f.parent
        if not isinstance(rec.get("config"), dict) and (run_dir / CONFIG_FILE).is_file():
            try:
                rec["config"] = _read_json(run_dir / CONFIG_FILE)
            except (OSError, json.JSONDecodeError):
                rec["config"] = {}
        rec["path"] = str(run_dir)
        records.append(rec)
    return records


def _scalar(value: Any) -> Any:
    """A table-friendly value: lists/dicts become JSON text so every column stays tabular."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True)
    return value


def flatten(data: dict, prefix: str = "", out: dict | None = None) -> dict:
    """Nested dict → ``{"a.b.c": value}`` (non-dict leaves kept, lists as JSON text)."""
    out = {} if out is None else out
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flatten(v, key + ".", out)
        else:
            out[key] = _scalar(v)
    return out


def record_row(rec: dict) -> dict:
    """One table row for a result record."""
    row: dict[str, Any] = {}
    cfg = rec.get("config") or {}
    if isinstance(cfg, dict):
        flatten(cfg, "", row)
    metrics = dict(rec.get("metrics") or {})
    latency = metrics.pop("latency_ms", None)
    flatten(metrics, "metrics.", row)
    if isinstance(latency, dict):
        flatten(latency, "latency_ms.", row)
    row["kind"] = rec.get("kind")
    row["schema"] = rec.get("schema")
    row["path"] = rec.get("path")
    for key in LOCATION_KEYS:
        row[key] = rec.get(key)
    return row


def load_runs(paths_or_dirs) -> pd.DataFrame:
    """One row per run found under ``paths_or_dirs`` (files or directories, searched recursively).

    Tolerant of extra or missing keys: absent values are NaN.
    """
    rows = [record_row(r) for r in load_records(paths_or_dirs)]
    df = pd.DataFrame(rows)
    if "path" in df.columns:
        df = df.sort_values("path", kind="stable").reset_index(drop=True)
    return df


def varying_columns(df: pd.DataFrame, prefixes: Iterable[str] = ()) -> list[str]:
    """Config columns whose value differs across rows (the effective axes of a set of runs)."""
    skip = ("metrics.", "latency_ms.", "path", "schema", *LOCATION_KEYS)
    cols = []
    for c in df.columns:
        if c.startswith(skip) or (prefixes and not c.startswith(tuple(prefixes))):
            continue
        vals = df[c].map(lambda v: "<nan>" if isinstance(v, float) and math.isnan(v) else v)
        if vals.astype(str).nunique() > 1:
            cols.append(c)
    return cols


def read_episodes(run_dir) -> list[dict]:
    """The rows of ``<run_dir>/episodes.jsonl``; [] when absent. Unreadable lines are skipped."""
    path = Path(run_dir) / EPISODES_FILE
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json_dict(path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = _read_json(Path(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def resolve_dir(path: str, run_dir=None) -> Path | None:
    """An existing directory for a path a result names, or None.

    Absolute paths are taken as they are. A relative path was relative to the working directory
    of the run, so it is tried against the current directory and then against each ancestor of
    ``run_dir`` (a report made from elsewhere still finds ``out/stages/...``).
    """
    if not path:
        return None
    p = Path(path)
    if p.is_absolute():
        return p if p.is_dir() else None
    bases = [Path.cwd()]
    if run_dir is not None:
        bases += list(Path(run_dir).resolve().parents)
    return next((b / p for b in bases if (b / p).is_dir()), None)

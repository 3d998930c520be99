"""Run directories → one tidy table.

A run directory holds ``result.json`` (schema ``steerlab.result/1``) and usually ``config.json``.
Each run becomes one row: the resolved config flattened to dotted columns (``verifier.name``,
``eval.M``), scalar metrics as ``metrics.<name>``, latencies as ``latency_ms.<phase>.<stat>``,
plus ``kind``, ``schema``, ``path`` and the ``policy_dir`` / ``verifier_dir`` a run names. Curves
stay out of the table; ``load_records`` keeps them. ``episodes.jsonl`` (one row per evaluation
episode) is read separately with ``read_episodes``. The per-run reading lives in ``core.results``
(the grid runner reads runs the same way); this module adds the tables built from it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from core.io import MissingFileError, read_json, read_json_object
from core.results import (
    CONFIG_FILE,
    EPISODES_FILE,
    LOCATION_KEYS,
    RESULT_FILE,
    find_results,
    flatten,
    load_records,
    read_episodes,
    record_row,
)

__all__ = [
    "CONFIG_FILE",
    "EPISODES_FILE",
    "LOCATION_KEYS",
    "RESULT_FILE",
    "check_results",
    "find_results",
    "flatten",
    "load_records",
    "load_runs",
    "read_episodes",
    "read_json_dict",
    "record_row",
    "resolve_dir",
    "varying_columns",
]


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


def check_results(paths_or_dirs) -> list[Path]:
    """The result files under ``paths_or_dirs``, each read once: a path that does not exist, or
    a result.json (or the config.json it relies on) that does not parse, raises naming the
    file, so a reader stops before writing anything."""
    single = isinstance(paths_or_dirs, str | os.PathLike)
    paths = [Path(p) for p in ([paths_or_dirs] if single else paths_or_dirs)]
    for p in paths:
        if not p.exists():
            raise MissingFileError(f"{p}: no such run or grid directory")
    found = find_results(paths)
    for f in found:
        remedy = f"re-run the command that wrote {f.parent}, or move it out of the way"
        rec = read_json_object(f, remedy)
        if not isinstance(rec.get("config"), dict) and (f.parent / CONFIG_FILE).is_file():
            read_json(f.parent / CONFIG_FILE, remedy)
    return found


def read_json_dict(path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = read_json(path)
    except (OSError, ValueError):  # missing, or not JSON (BadFileError)
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

"""Reading a run directory's ``result.json`` and ``episodes.jsonl`` into flat rows.

A run directory holds ``result.json`` (schema ``steerlab.result/1``) and usually ``config.json``.
Both the grid runner (its results table) and the analysis package (reports) read runs the same
way, so the reading lives here, below both of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.io import read_json

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


def load_records(paths_or_dirs) -> list[dict]:
    """Raw result dicts (with ``path`` = run dir, ``config`` filled from config.json if absent).

    Unreadable files are skipped, not fatal: a grid may be read while cells are still writing.
    """
    records = []
    for f in find_results(paths_or_dirs):
        try:
            rec = read_json(f)
        except (OSError, ValueError):  # missing, half-written or not JSON
            continue
        if not isinstance(rec, dict):
            continue
        run_dir = f.parent
        if not isinstance(rec.get("config"), dict) and (run_dir / CONFIG_FILE).is_file():
            try:
                rec["config"] = read_json(run_dir / CONFIG_FILE)
            except (OSError, ValueError):
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

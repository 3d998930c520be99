"""An SFT run directory on disk: whether it may be (re)started with a config, and its
``metrics.jsonl`` (appended row by row, so a killed run may leave a torn last line)."""

from __future__ import annotations

import json
import os

from core.io import BadFileError, read_json, write_text


def metric_rows(path: str) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the process died mid-append) is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise BadFileError(f"{path}: line {i + 1}, column {e.colno} is not valid JSON "
                                   f"({e.msg})") from None
    return rows


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop rows logged after the restored checkpoint (they will be redone)."""
    if os.path.exists(path):
        rows = [r for r in metric_rows(path) if r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def has_final(path: str) -> bool:
    return any(r.get("final") for r in metric_rows(path))


def log_row(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def has_checkpoint(run_dir: str) -> bool:
    ckpt = os.path.join(run_dir, "ckpt")
    return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def check_run_dir(run_dir: str, config: dict) -> None:
    """Refuses a run directory whose checkpoints belong to another config (``config``: the
    resolved config as a dict). One whose start failed before its first checkpoint holds
    nothing to resume, so a corrected config may start there afresh."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not (os.path.exists(cfg_path) and has_checkpoint(run_dir)):
        return
    if read_json(cfg_path, "use a new run directory") != config:
        raise ValueError(f"{run_dir} holds a run with a different config; "
                         "use a new run directory")

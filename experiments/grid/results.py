"""Reading a grid directory: the status of each cell (from its marker files) and the results
table (one row per cell, written to ``DIR/results.parquet`` and ``DIR/results.csv``).

Status is read from files rather than from the runner, so ``steerlab grid status`` works while a
grid runs in another process, and after it was killed.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core.io import read_json, write_text
from core.results import load_records, record_row
from experiments.grid.spec import Cell

# Files in a cell directory that the runner writes and the status is read from.
DONE = "_DONE"
RUNNING = "_RUNNING"
ERROR = "error.json"
LOG = "log.txt"


def console():
    """The rich console the grid prints to (imported late: rich is only needed for printing)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_status(cell_dir: Path) -> str:
    """done / running / failed / pending, from the markers (a dead runner's cell is pending)."""
    if (cell_dir / DONE).exists():
        return "done"
    try:
        info = read_json(cell_dir / RUNNING)
        if info.get("host") != socket.gethostname() or _pid_alive(int(info["pid"])):
            return "running"  # another host's PID cannot be checked from here
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (cell_dir / ERROR).exists():
        return "failed"
    return "pending"


def grid_status(out_dir: str | Path) -> dict:
    """Counts of done / running / failed / pending cells (plus total and failed cell names)."""
    root = Path(out_dir)
    try:
        cells = [c["name"] for c in read_json(root / "grid.json")["cells"]]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"{root}: not a grid directory (no readable grid.json)") from e
    counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    failed = []
    for name in cells:
        s = cell_status(root / "cells" / name)
        counts[s] += 1
        if s == "failed":
            failed.append(name)
    return {**counts, "total": len(cells), "failed_cells": failed}


def _tabular(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with mixed types become text so Parquet can store them."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            types_ = {type(v) for v in df[c] if v is not None and not (isinstance(v, float)
                                                                       and v != v)}
            if len(types_) > 1 or (types_ and not types_ <= {str, bool}):
                df[c] = df[c].map(lambda v: v if v is None or (isinstance(v, float) and v != v)
                                  else str(v))
    return df


def collect_results(root: str | Path, cells: Sequence[Cell]) -> pd.DataFrame:
    """One row per cell: cell, hash, status, axes (dotted names), error, flattened metrics."""
    root = Path(root)
    rows = []
    for cell in cells:
        cdir = root / "cells" / cell.name
        status = cell_status(cdir)
        row = {"cell": cell.name, "hash": cell.hash, "status": status}
        for f, v in cell.axes.items():
            row[f] = json.dumps(v, sort_keys=True) if isinstance(v, list | tuple | dict) else v
        if status == "failed":
            try:
                err = read_json(cdir / ERROR)
                row["error"] = f"{err.get('type')}: {err.get('message')}"
            except (OSError, ValueError):
                row["error"] = "unreadable error.json"
        if status == "done" and (cdir / "result.json").is_file():
            for rec in load_records(cdir / "result.json"):
                r = record_row(rec)
                row.update({k: v for k, v in r.items()
                            if k.startswith(("metrics.", "latency_ms.")) or k == "kind"})
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(root: str | Path, df: pd.DataFrame) -> None:
    """Parquet by atomic rename (a reader never sees half a table), and the same table as CSV."""
    root = Path(root)
    df = _tabular(df)
    tmp = root / f".results.{os.getpid()}.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, root / "results.parquet")
    write_text(root / "results.csv", df.to_csv(index=False))


def grid_status_cli(out: str) -> int:
    """``steerlab grid status DIR``: the counts, then each failed cell with its error."""
    from rich.markup import escape

    st = grid_status(out)
    con = console()
    con.print(f"{out}: {st['done']}/{st['total']} done, {st['running']} running, "
              f"{st['failed']} failed, {st['pending']} pending")
    for name in st["failed_cells"]:
        try:
            err = read_json(Path(out) / "cells" / name / ERROR)
            msg = escape(f"{name}: {err.get('type')}: {err.get('message')}")
            con.print(f"  [red]failed[/red] {msg}", markup=True)
        except (OSError, ValueError):
            con.print(f"  failed {name}")
    return 0

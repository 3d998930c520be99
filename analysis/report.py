"""``make_report``: run directories → ``report.md`` with tables and embedded figures.

Sections: results (success per evaluation run), a paired comparison of every verifier with the
``random`` verifier under the same config (exact McNemar test on per-episode successes), the
scaling study (power-law fits and the error-vs-N plot), latency, the base policy's reproduction
check, where the policy and verifier directories live (with commands to reuse them), figures.
The table and section builders are pure and live in ``analysis.tables``, ``analysis.paired``
and ``analysis.report_sections``; ``make_report`` does the reading and the plotting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd

from analysis.load import check_results, load_records, read_episodes, record_row
from analysis.paired import paired_comparisons, paired_section
from analysis.plots import (
    eval_rows,
    plot_error_vs_n,
    plot_latency_vs_m,
    plot_learning_curves,
    plot_loss_curve,
    plot_success_vs_m,
)
from analysis.report_sections import (
    fit_table,
    locations,
    locations_section,
    policy_section,
    read_reproductions,
    scaling_section,
)
from analysis.tables import latency_table, markdown_table, results_table, table_rows

REPORT_FILE = "report.md"


def _as_dirs(dirs) -> list[Path]:
    dirs = [Path(dirs)] if isinstance(dirs, str | os.PathLike) else [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("dirs: give at least one run or grid directory")
    return dirs


def _rel(path: Path | None, out: Path) -> str | None:
    return None if path is None else os.path.relpath(path, out)


def _episodes_of(df: pd.DataFrame) -> dict[str, list[dict]]:
    if df.empty or "path" not in df.columns:
        return {}
    return {p: read_episodes(p) for p in eval_rows(df)["path"].dropna()}


def _loss_figures(entries: list[dict], out: Path) -> dict[str, str]:
    figs = {}
    for i, e in enumerate(entries):
        rep = e["reproduction"] or {}
        name = "fig_policy_loss.png" if len(entries) == 1 else f"fig_policy_loss_{i}.png"
        path = plot_loss_curve(rep.get("loss_curve"), out / name,
                               title="Held-out loss: " + "/".join(Path(e["policy_dir"]).parts[-2:]))
        if path is not None:
            figs[e["policy_dir"]] = _rel(path, out)
    return figs


def _figures_section(figures: list[tuple[str, Path | None]], out: Path) -> list[str]:
    shown = [(t, p) for t, p in figures if p is not None]
    if not shown:
        return []
    lines = ["## Figures", ""]
    for title, p in shown:
        lines += [f"### {title}", "", f"![{title}]({_rel(p, out)})", ""]
    return lines


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def _staged(out: Path):
    """A hidden temporary directory to write the report into; its files move to ``out`` (the
    report last) only when the body succeeds, so a failing report leaves nothing behind."""
    base = out if out.is_dir() else _existing_ancestor(out.parent)
    stage = base / f".report.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    stage.mkdir()  # not mkdtemp: its 0700 mode would stay on a new ``out``
    try:
        yield stage
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage, out)
            return
        names = sorted(os.listdir(stage), key=lambda n: n == REPORT_FILE)
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _report_dir(dirs: list[Path], out_dir) -> Path:
    out = Path(out_dir) if out_dir is not None else dirs[0]
    return out.parent if out.is_file() else out


def make_report(dirs, out_dir=None) -> Path:
    """Loads every run under ``dirs`` and writes ``report.md`` plus PNG figures.

    The report goes to ``out_dir`` or else the first directory given. Works for one run, a set
    of runs or a grid directory (its cells are runs). A missing directory or an unreadable
    result.json raises before anything is written.
    """
    dirs = _as_dirs(dirs)
    check_results(dirs)
    out = _report_dir(dirs, out_dir)
    records = load_records(dirs)
    with _staged(out) as stage:
        (stage / REPORT_FILE).write_text(_render(records, dirs, stage))
    return out / REPORT_FILE


def _render(records: list[dict], dirs: list[Path], out: Path) -> str:
    """The report's markdown; its figures are written into ``out``."""
    df = pd.DataFrame([record_row(r) for r in records])
    rows = table_rows(df) if not df.empty else df

    lines = ["# steerlab report", "", f"Runs: {len(records)} from "
             + ", ".join(f"`{d}`" for d in dirs), ""]
    if df.empty:
        lines += ["No `result.json` found.", ""]
    elif not rows.empty:
        lines += ["## Results", "", "Success with 95% Wilson intervals.", "",
                  markdown_table(results_table(df))]
    lines += paired_section(paired_comparisons(df, _episodes_of(df)))
    error_fig = plot_error_vs_n(records, out / "fig_error_vs_N.png")
    lines += scaling_section(fit_table(records), _rel(error_fig, out))
    lat = latency_table(df) if not rows.empty else pd.DataFrame()
    if not lat.empty:
        lines += ["## Latency per step (ms)", "", markdown_table(lat)]
    entries = read_reproductions(records)
    lines += policy_section(entries, _loss_figures(entries, out))
    lines += locations_section(locations(records))

    figures = []
    if not rows.empty:
        figures.append(("Success vs M", plot_success_vs_m(rows, out / "fig_success_vs_M.png")))
        figures.append(("Latency vs M", plot_latency_vs_m(rows, out / "fig_latency_vs_M.png")))
    figures.append(("Learning curves", plot_learning_curves(records, out / "fig_learning.png")))
    lines += _figures_section(figures, out)
    return "\n".join(lines)

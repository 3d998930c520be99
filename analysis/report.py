"""``make_report``: run directories → ``report.md`` with tables and embedded figures."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from analysis.load import load_records, record_row, varying_columns
from analysis.plots import (
    PHASES,
    plot_error_vs_n,
    plot_latency_vs_m,
    plot_learning_curves,
    plot_success_vs_m,
    scaling_curves,
)

REPORT_FILE = "report.md"
ID_DEFAULTS = ("kind", "task", "policy.name", "verifier.name", "adapter.name", "eval.M", "seed")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        if v.is_integer() and 100 <= abs(v) < 1e9:
            return str(int(v))
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no optional tabulate dependency)."""
    if df.empty:
        return "_no rows_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _id_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in ID_DEFAULTS if c in df.columns]
    cols += [c for c in varying_columns(df) if c not in cols and c != "kind"]
    return cols


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    ids = _id_columns(df)
    metrics = [
        ("metrics.success_rate", "success"),
        ("metrics.success_ci_low", "ci_low"),
        ("metrics.success_ci_high", "ci_high"),
        ("metrics.episodes", "episodes"),
        ("metrics.mean_length", "mean_len"),
        ("metrics.mean_final_progress", "progress"),
        ("metrics.candidates_per_s", "cand/s"),
        ("metrics.oracle_gap", "oracle_gap"),
        ("metrics.pi_star_fraction", "pi*_frac"),
    ]
    present = [(c, n) for c, n in metrics if c in df.columns]
    out = df[ids + [c for c, _ in present]].rename(columns=dict(present))
    sort = [c for c in ids if c in out.columns]
    return out.sort_values(sort, kind="stable").reset_index(drop=True) if sort else out


def latency_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = [
        (f"latency_ms.{p}.{s}", f"{p} {s}")
        for p in (*PHASES, "total")
        for s in ("p50", "p95")
        if f"latency_ms.{p}.{s}" in df.columns
    ]
    if not cols:
        return pd.DataFrame()
    ids = [c for c in _id_columns(df) if c != "kind"]
    out = df[df[[c for c, _ in cols]].notna().any(axis=1)]
    out = out[ids + [c for c, _ in cols]].rename(columns=dict(cols))
    return out.sort_values(ids, kind="stable").reset_index(drop=True) if ids else out


def fit_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for c in scaling_curves(records):
        f = c["fit"]
        if not f:
            continue
        rows.append({
            "curve": c["label"],
            "run": Path(c["path"]).name if c["path"] else "",
            "a": f["a"],
            "a 95% CI": "[{:.3g}, {:.3g}]".format(*f.get("a_ci", (math.nan, math.nan))),
            "b": f["b"],
            "b 95% CI": "[{:.3g}, {:.3g}]".format(*f.get("b_ci", (math.nan, math.nan))),
            "c": f.get("c", math.nan),
            "R²": f.get("r2", math.nan),
        })
    return pd.DataFrame(rows)


def make_report(dirs, out_dir=None) -> Path:
    """Loads every run under ``dirs`` and writes ``report.md`` plus PNG figures.

    The report goes to ``out_dir`` or else the first directory given. Works for one run, a set
    of runs or a grid directory (its cells are runs).
    """
    dirs = [Path(dirs)] if isinstance(dirs, str | os.PathLike) else [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("dirs: give at least one run or grid directory")
    out = Path(out_dir) if out_dir is not None else dirs[0]
    if out.is_file():
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(dirs)
    df = pd.DataFrame([record_row(r) for r in records])

    lines = ["# steerlab report", "", f"Runs: {len(records)} from "
             + ", ".join(f"`{d}`" for d in dirs), ""]
    if df.empty:
        lines += ["No `result.json` found.", ""]
    else:
        lines += ["## Results", "", "Success with 95% Wilson intervals.", "",
                  markdown_table(results_table(df))]

    figures = []
    if not df.empty:
        figures.append(("Success vs M", plot_success_vs_m(df, out / "fig_success_vs_M.png")))
    figures.append(("Action error vs N", plot_error_vs_n(records, out / "fig_error_vs_N.png")))
    if not df.empty:
        figures.append(("Latency vs M", plot_latency_vs_m(df, out / "fig_latency_vs_M.png")))
    figures.append(("Learning curves", plot_learning_curves(records, out / "fig_learning.png")))

    fits = fit_table(records)
    if not fits.empty:
        lines += ["## Power-law fits", "",
                  "e(N) = c + a·N^b (c = 0 unless fitted with an offset); bootstrap 95% CIs.",
                  "", markdown_table(fits)]
    lat = latency_table(df) if not df.empty else pd.DataFrame()
    if not lat.empty:
        lines += ["## Latency per step (ms)", "", markdown_table(lat)]
    shown = [(t, p) for t, p in figures if p is not None]
    if shown:
        lines += ["## Figures", ""]
        for title, p in shown:
            rel = os.path.relpath(p, out)
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]

    path = out / REPORT_FILE
    tmp = out / f".{REPORT_FILE}.{os.getpid()}.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path

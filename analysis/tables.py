"""Markdown tables for the report: cell formatting, and the success and latency tables of the
runs table (``analysis.load.record_row`` rows)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.load import varying_columns
from analysis.plots import PHASES

# Results with their own section rather than rows of the success table.
OWN_SECTION_KINDS = ("scaling",)
ID_DEFAULTS = ("kind", "task", "policy.name", "verifier.name", "adapter.name", "eval.M", "seed")


def _is_num(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _as_int(v):
    return int(v) if _is_num(v) and float(v).is_integer() else v


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


def table_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows for the success and latency tables: not the scaling studies (they have a section)."""
    if "kind" not in df.columns:
        return df
    return df[~df["kind"].isin(OWN_SECTION_KINDS)].reset_index(drop=True)


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    df = table_rows(df)
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
    for c in [*ids, "episodes"]:  # counts stay integers when missing values made them floats
        if c in out.columns and out[c].dtype.kind == "f":
            out[c] = out[c].map(_as_int)
    sort = [c for c in ids if c in out.columns]
    return out.sort_values(sort, kind="stable").reset_index(drop=True) if sort else out


def latency_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = [
        (f"latency_ms.{p}.{s}", f"{p} {s}")
        for p in (*PHASES, "total")
        for s in ("p50", "p95")
        if f"latency_ms.{p}.{s}" in df.columns
    ]
    df = table_rows(df)
    if not cols or df.empty:
        return pd.DataFrame()
    out = df[df[[c for c, _ in cols]].notna().any(axis=1)]
    ids = [c for c in _id_columns(out) if c != "kind" or out["kind"].nunique() > 1]
    out = out[ids + [c for c, _ in cols]].rename(columns=dict(cols))
    return out.sort_values(ids, kind="stable").reset_index(drop=True) if ids else out

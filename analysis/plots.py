"""Paper-ready figures from run tables and records (Agg backend, PNG).

Each function returns the written path, or ``None`` when the inputs hold nothing to plot.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.stats import fit_power_law, wilson_interval  # noqa: E402

M_COLUMNS = ("eval.M", "harness.M", "M")
VERIFIER_COLUMNS = ("verifier.name", "verifier")
PHASES = ("encode", "sample", "score", "env")
X_KEYS = ("episodes", "updates", "env_steps", "steps", "x", "decision")
Y_KEYS = ("success_rate", "success", "return", "progress")


def find_column(df: pd.DataFrame, candidates) -> str | None:
    return next((c for c in candidates if c in df.columns), None)


def eval_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Evaluation runs only, when the table says which runs are evaluations."""
    if "kind" in df.columns and (df["kind"] == "eval").any():
        return df[df["kind"].isna() | (df["kind"] == "eval")]
    return df


def _save(fig, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def _group_label(value) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "all" if missing else str(value)


def success_by_group(df: pd.DataFrame, group: str | None, m_col: str) -> pd.DataFrame:
    """Pools runs (e.g. seeds) per (group, M): successes, episodes, rate and a Wilson 95% CI."""
    rate, eps = "metrics.success_rate", "metrics.episodes"
    d = df[df[rate].notna() & df[m_col].notna()].copy()
    d["_g"] = d[group].map(_group_label) if group else "all"
    rows = []
    for (g, m), sub in d.groupby(["_g", m_col], sort=True):
        if eps in sub and sub[eps].notna().all():
            n = int(sub[eps].sum())
            k = float((sub[rate] * sub[eps]).sum())
            lo, hi = wilson_interval(round(k), n)
            p = k / n if n else float("nan")
        else:  # no episode counts: average the rates and their stored intervals
            n, p = len(sub), float(sub[rate].mean())
            lo = float(sub.get("metrics.success_ci_low", sub[rate]).mean())
            hi = float(sub.get("metrics.success_ci_high", sub[rate]).mean())
        rows.append({"group": g, "M": m, "success": p, "low": lo, "high": hi, "episodes": n})
    return pd.DataFrame(rows)


def plot_success_vs_m(df: pd.DataFrame, out_path, group: str | None = None) -> Path | None:
    """Success rate vs number of candidates M per verifier, Wilson 95% bands, log2 x-axis."""
    m_col = find_column(df, M_COLUMNS)
    if m_col is None or "metrics.success_rate" not in df.columns:
        return None
    group = group or find_column(df, VERIFIER_COLUMNS)
    table = success_by_group(eval_rows(df), group, m_col)
    if table.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for g, sub in table.groupby("group", sort=True):
        sub = sub.sort_values("M")
        (line,) = ax.plot(sub["M"], sub["success"], marker="o", label=g)
        ax.fill_between(sub["M"], sub["low"], sub["high"], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates per step M")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title=group or None, fontsize=8)
    ax.set_title("Success vs M (95% Wilson intervals)")
    return _save(fig, out_path)


def _curve_entries(c: dict) -> list[tuple[str | None, dict]]:
    """(method, curve) pairs from a ``curves`` dict.

    Two layouts: a scaling study's ``{"Ns": [...], "methods": {m: {"error_mean", "error_sem",
    "fit"}}}`` (one curve per proposal method) or a single ``{"N", "error"|"error_mean", ...}``.
    """
    methods = c.get("methods")
    if isinstance(methods, dict) and "Ns" in c:
        return [(str(m), {**v, "N": c["Ns"]}) for m, v in methods.items() if isinstance(v, dict)]
    return [(c.get("method"), c)]


def _curve_arrays(cur: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """N [K], mean error [K] and its standard error [K] (or None), or None when malformed."""
    if "N" not in cur or not ("error" in cur or "error_mean" in cur):
        return None
    try:
        n = np.asarray(cur["N"], dtype=float)
        err = np.asarray(cur["error"] if "error" in cur else cur["error_mean"], dtype=float)
    except (TypeError, ValueError):
        return None
    if n.ndim != 1 or err.ndim not in (1, 2) or err.shape[-1] != n.shape[0] or n.size == 0:
        return None
    mean = err.mean(0) if err.ndim == 2 else err
    sem = None
    if err.ndim == 2 and err.shape[0] > 1:
        sem = err.std(0) / math.sqrt(err.shape[0])
    elif "error_sem" in cur:
        try:
            sem = np.asarray(cur["error_sem"], dtype=float)
        except (TypeError, ValueError):
            sem = None
        sem = sem if sem is not None and sem.shape == mean.shape else None
    return n, mean, sem


def _curve_fit(cur: dict, n: np.ndarray, err: np.ndarray) -> dict | None:
    """The stored fit, else a power law fitted here (None when it cannot be fitted)."""
    fit = cur.get("fit")
    if isinstance(fit, dict) and "a" in fit and "b" in fit:
        return fit
    if len(np.unique(n)) < 2 or not np.all(err > 0) or not np.all(n > 0):
        return None
    try:
        return fit_power_law(n, err, n_boot=200)
    except ValueError:
        return None


def scaling_curves(records: list[dict]) -> list[dict]:
    """Scaling curves from records, one per proposal method.

    Each: label (method), run (directory name), N, mean error, sem (or None), fit, path, states.
    """
    out = []
    for rec in records:
        c = rec.get("curves")
        if not isinstance(c, dict):
            continue
        cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        run = Path(rec["path"]).name if rec.get("path") else ""
        for method, cur in _curve_entries(c):
            arrays = _curve_arrays(cur)
            if arrays is None:
                continue
            n, mean, sem = arrays
            err = np.asarray(cur["error"], dtype=float) if "error" in cur else mean
            label = str(method or cfg.get("task") or run or "?")
            out.append({"label": label, "run": run, "N": n, "error": mean, "sem": sem,
                        "fit": _curve_fit(cur, n, err), "path": rec.get("path"),
                        "states": c.get("states")})
    return out


def power_law(fit: dict, n: np.ndarray) -> np.ndarray:
    """``c + a·N^b`` for a fit dict (c = 0 when the fit has no offset)."""
    return float(fit.get("c", 0.0) or 0.0) + float(fit["a"]) * n ** float(fit["b"])


def plot_error_vs_n(records: list[dict], out_path) -> Path | None:
    """Oracle action error vs number of samples N on log–log axes with fitted power laws."""
    curves = scaling_curves(records)
    if not curves:
        return None
    several_runs = len({c["path"] for c in curves}) > 1
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for c in curves:
        name = f"{c['run']}: {c['label']}" if several_runs else c["label"]
        sem = c["sem"]
        (line, *_) = ax.errorbar(c["N"], c["error"], yerr=sem, fmt="o", capsize=2,
                                 label=f"{name} (data)")
        fit = c["fit"]
        if fit:
            grid = np.geomspace(c["N"].min(), c["N"].max(), 100)
            r2 = fit.get("r2", float("nan"))
            label = f"{name} fit: b={fit['b']:.3f}, R²={r2:.3f}"
            ax.plot(grid, power_law(fit, grid), "-", color=line.get_color(), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples N")
    ax.set_ylabel("min action error (RMSE)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Action error vs N (power-law fit)")
    return _save(fig, out_path)


def loss_points(loss_curve) -> tuple[np.ndarray, np.ndarray]:
    """(step, held-out loss) arrays from ``[{"step", "heldout_loss"}, ...]``, keeping only rows
    with a finite step and a finite positive loss (the y-axis is logarithmic), sorted by step."""
    pts = []
    for row in loss_curve if isinstance(loss_curve, list) else []:
        try:
            step, loss = float(row["step"]), float(row["heldout_loss"])
        except (TypeError, KeyError, ValueError):
            continue
        if math.isfinite(step) and math.isfinite(loss) and loss > 0:
            pts.append((step, loss))
    pts.sort()
    return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])


def plot_loss_curve(loss_curve, out_path, title: str = "Held-out loss") -> Path | None:
    """Held-out loss vs training step (log y) from a ``loss_curve`` list."""
    steps, loss = loss_points(loss_curve)
    if steps.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(steps, loss, marker="." if steps.size < 50 else None)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_path)


def latency_by_m(df: pd.DataFrame, group: str | None, m_col: str) -> pd.DataFrame:
    """Mean p50 latency per phase for each (group, M)."""
    cols = {p: f"latency_ms.{p}.p50" for p in PHASES if f"latency_ms.{p}.p50" in df.columns}
    if not cols:
        return pd.DataFrame()
    d = df[df[m_col].notna()].copy()
    d["_g"] = d[group].map(_group_label) if group else "all"
    agg = d.groupby(["_g", m_col], sort=True)[list(cols.values())].mean().reset_index()
    return agg.rename(columns={"_g": "group", m_col: "M", **{v: k for k, v in cols.items()}})


def plot_latency_vs_m(df: pd.DataFrame, out_path, group: str | None = None) -> Path | None:
    """Per-step p50 latency vs M stacked by phase (encode/sample/score/env), a panel per group."""
    m_col = find_column(df, M_COLUMNS)
    if m_col is None:
        return None
    group = group or find_column(df, VERIFIER_COLUMNS)
    table = latency_by_m(eval_rows(df), group, m_col)
    if table.empty:
        return None
    phases = [p for p in PHASES if p in table.columns]
    groups = sorted(table["group"].unique())
    ncols = min(len(groups), 4)
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows), squeeze=False,
                             sharey=True)
    for ax, g in zip(axes.flat, groups):
        sub = table[table["group"] == g].sort_values("M")
        x = np.arange(len(sub))
        bottom = np.zeros(len(sub))
        for p in phases:
            vals = sub[p].fillna(0.0).to_numpy()
            ax.bar(x, vals, bottom=bottom, label=p)
            bottom += vals
        ax.set_xticks(x, [str(int(m)) if float(m).is_integer() else str(m) for m in sub["M"]])
        ax.set_xlabel("candidates per step M")
        ax.set_title(str(g), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("p50 latency per step (ms)")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out_path)


def learning_curves(records: list[dict]) -> list[dict]:
    """Adapter learning curves: ``curves`` with an x key (episodes/updates/...) and a y key."""
    out = []
    for rec in records:
        c = rec.get("curves") or {}
        if not isinstance(c, dict):
            continue
        xk = next((k for k in X_KEYS if k in c), None)
        yk = next((k for k in Y_KEYS if k in c), None)
        if xk is None or yk is None:
            continue
        x, y = np.asarray(c[xk], dtype=float), np.asarray(c[yk], dtype=float)
        if x.shape != y.shape or x.size == 0:
            continue
        cfg = rec.get("config") or {}
        adapter = cfg.get("adapter") if isinstance(cfg.get("adapter"), dict) else {}
        label = str(c.get("method") or adapter.get("name") or Path(rec.get("path", "?")).name)
        out.append({"label": label, "x": x, "y": y, "x_key": xk, "y_key": yk})
    return out


def plot_learning_curves(records: list[dict], out_path) -> Path | None:
    curves = learning_curves(records)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for c in curves:
        ax.plot(c["x"], c["y"], marker=".", label=c["label"])
    ax.set_xlabel(curves[0]["x_key"].replace("_", " "))
    ax.set_ylabel(curves[0]["y_key"].replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Adapter learning curves")
    return _save(fig, out_path)

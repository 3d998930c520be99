"""``make_report``: run directories → ``report.md`` with tables and embedded figures.

Sections: results (success per evaluation run), a paired comparison of every verifier with the
``random`` verifier under the same config (exact McNemar test on per-episode successes), the
scaling study (power-law fits and the error-vs-N plot), latency, the base policy's reproduction
check, where the policy and verifier directories live (with commands to reuse them), figures.
The table and section builders are pure; ``make_report`` does the reading and the plotting.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import (
    check_results,
    load_records,
    read_episodes,
    read_json_dict,
    record_row,
    resolve_dir,
    varying_columns,
)
from analysis.plots import (
    M_COLUMNS,
    PHASES,
    eval_rows,
    find_column,
    plot_error_vs_n,
    plot_latency_vs_m,
    plot_learning_curves,
    plot_loss_curve,
    plot_success_vs_m,
    scaling_curves,
)
from core.stats import mcnemar

REPORT_FILE = "report.md"
REPRODUCTION_FILE = "reproduction.json"
BASELINE = "random"
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


# --- paired comparison with the random verifier ---------------------------------------------

PAIR_SKIP_PREFIXES = ("metrics.", "latency_ms.", "verifier.")
PAIR_SKIP_COLUMNS = ("kind", "schema", "path", "verifier_dir")


def pairing_columns(df: pd.DataFrame) -> list[str]:
    """Columns two runs must agree on to be paired: every config field except ``verifier.*``,
    and the policy directory."""
    return [c for c in df.columns
            if not c.startswith(PAIR_SKIP_PREFIXES) and c not in PAIR_SKIP_COLUMNS]


def _norm(v) -> str:
    """A comparable form of a config value (NaN/None alike, 16 and 16.0 alike)."""
    if v is None or (_is_num(v) and math.isnan(v)):
        return "<nan>"
    if _is_num(v) and float(v).is_integer():
        return str(int(v))
    return repr(v)


def _successes_by_episode(rows: list[dict]) -> dict | str:
    out = {}
    for r in rows:
        if "episode" not in r or "success" not in r:
            return "episodes.jsonl rows without episode/success"
        out[r["episode"]] = bool(r["success"])
    return out if len(out) == len(rows) else "repeated episode indices in episodes.jsonl"


NO_EPISODES_EITHER = "no episodes.jsonl for either run"


def pair_episodes(a: list[dict], b: list[dict]) -> tuple[np.ndarray, np.ndarray] | str:
    """Success vectors of two runs paired by episode index, or a note saying why not."""
    if not a and not b:
        return NO_EPISODES_EITHER
    if not a or not b:
        return "no episodes.jsonl for the " + ("verifier" if not a else "random") + " run"
    if len(a) != len(b):
        return f"episode counts differ ({len(a)} vs {len(b)})"
    sa, sb = _successes_by_episode(a), _successes_by_episode(b)
    for s in (sa, sb):
        if isinstance(s, str):
            return s
    if set(sa) != set(sb):
        return "episode indices differ"
    idx = sorted(sa)
    return np.array([sa[i] for i in idx]), np.array([sb[i] for i in idx])


def _pair_key(row: pd.Series, keys: list[str]) -> tuple:
    return tuple(_norm(row[c]) for c in keys)


def _comparison(paired, run: str, base: str) -> dict:
    if isinstance(paired, str):
        return {"note": f"{paired} (`{run}` vs `{base}`)"}
    t = mcnemar(*paired)
    return {"episodes": t["n"], "success": t["rate_a"], BASELINE: t["rate_b"], "diff": t["diff"],
            "n10": t["n10"], "n01": t["n01"], "p": t["p_value"], "note": ""}


PAIRED_COLUMNS = ("verifier", "M", "episodes", "success", BASELINE, "diff", "n10", "n01", "p",
                  "note")


def paired_comparisons(df: pd.DataFrame, episodes: Mapping[str, list[dict]]) -> pd.DataFrame:
    """Every evaluation run whose verifier is not ``random`` against the ``random`` run with the
    same config (``verifier.*`` aside) and policy, episodes paired by index.

    ``df``: the runs table (``record_row`` rows); ``episodes``: run path → its episodes.jsonl
    rows. Runs without such a random run are left out. One row per pair: verifier, M, the config
    fields that vary among the runs, episodes, success of each, diff, n10 (verifier succeeds,
    random fails), n01, the exact McNemar p, and a note (non-empty when the pair was skipped).
    """
    v, m = "verifier.name", find_column(df, M_COLUMNS)
    if df.empty or v not in df.columns or m is None or "path" not in df.columns:
        return pd.DataFrame(columns=list(PAIRED_COLUMNS))
    runs = eval_rows(df).sort_values("path", kind="stable")
    keys = pairing_columns(runs)
    extra = [c for c in varying_columns(runs[keys]) if c != m]
    base: dict = {}
    for _, r in runs[runs[v] == BASELINE].iterrows():
        base.setdefault(_pair_key(r, keys), r)
    rows = []
    for _, r in runs[runs[v].notna() & (runs[v] != BASELINE)].iterrows():
        b = base.get(_pair_key(r, keys))
        if b is None:
            continue
        paired = pair_episodes(list(episodes.get(r["path"], [])),
                               list(episodes.get(b["path"], [])))
        rows.append({"verifier": r[v], "M": _as_int(r[m]), **{c: r[c] for c in extra},
                     **_comparison(paired, Path(r["path"]).name, Path(b["path"]).name)})
    cols = ["verifier", "M", *extra, *PAIRED_COLUMNS[2:]]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["verifier", "M", *extra], kind="stable").reset_index(drop=True)


def paired_section(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return []
    done = table[table["note"] == ""].drop(columns="note")
    done = done.astype({c: int for c in ("episodes", "n10", "n01")})
    done["p"] = done["p"].map(lambda p: f"{p:.3g}")  # p-values: significant digits
    lines = ["## Paired comparison with random", "",
             "Each verifier against the `random` verifier with the same config (task, M, seeds, "
             "episodes, policy), episodes paired by index (same initial states). n10: the "
             "verifier succeeds where random fails; n01: the reverse; p: two-sided exact "
             "McNemar test.", ""]
    if not done.empty:
        lines.append(markdown_table(done))
    skipped = table[table["note"] != ""]
    if done.empty and skipped["note"].str.startswith(NO_EPISODES_EITHER).all():
        lines += ["No run has an episodes.jsonl (per-episode results): nothing to pair.", ""]
    elif not skipped.empty:
        lines += ["Not compared:", ""]
        lines += [f"- {r['verifier']} at M={r['M']}: {r['note']}" for _, r in skipped.iterrows()]
        lines.append("")
    return lines


# --- scaling study --------------------------------------------------------------------------


def _ci(fit: dict, key: str) -> str:
    ci = fit.get(key)
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return ""
    return "[{:.3g}, {:.3g}]".format(*(float(x) for x in ci))


def _n_range(n: np.ndarray) -> str:
    return f"{n.min():g}–{n.max():g} ({len(n)})"


def fit_table(records: list[dict]) -> pd.DataFrame:
    """Power-law fits e(N) = (c +) a·N^b, one row per proposal method of each scaling result."""
    rows = []
    for c in scaling_curves(records):
        f = c["fit"]
        if not f:
            continue
        row = {"method": c["label"], "run": c["run"], "N": _n_range(c["N"]),
               "states": c["states"], "a": f["a"], "b": f["b"], "b 95% CI": _ci(f, "b_ci"),
               "R²": f.get("r2", math.nan)}
        if "c" in f:
            row["c"] = f["c"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty and df["states"].isna().all():
        df = df.drop(columns="states")
    return df


def scaling_section(fits: pd.DataFrame, figure: str | None) -> list[str]:
    """The scaling study: the fit table and the log–log error-vs-N figure (relative path)."""
    if fits.empty and figure is None:
        return []
    lines = ["## Scaling: action error vs N", ""]
    if not fits.empty:
        lines += ["Power-law fits e(N) = a·N^b per proposal method (c: fitted offset, e = c + "
                  "a·N^b); b's 95% CI from a bootstrap over states; R² of the fit.", "",
                  markdown_table(fits)]
    if figure is not None:
        lines += [f"![Action error vs N]({figure})", ""]
    return lines


# --- base policy ----------------------------------------------------------------------------


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def checks_table(checks) -> pd.DataFrame:
    rows = [{"check": c.get("name", ""), "value": _num(c.get("value")),
             "target": c.get("target", ""),
             "passed": {True: "yes", False: "**no**"}.get(c.get("passed"), "")}
            for c in (checks if isinstance(checks, list) else []) if isinstance(c, dict)]
    return pd.DataFrame(rows)


def _share(values, i: int) -> str:
    v = _num(values[i]) if isinstance(values, list) and i < len(values) else math.nan
    return "" if math.isnan(v) else f"{v:.2f}"


def mode_share_table(shares) -> pd.DataFrame:
    """Per bin, each mode's share as ``policy / data``."""
    if not isinstance(shares, dict) or not isinstance(shares.get("modes"), list):
        return pd.DataFrame()
    modes, bins = shares["modes"], shares.get("bins")
    pol, dat = shares.get("policy") or [], shares.get("data") or []
    n = len(bins) if isinstance(bins, list) else max(len(pol), len(dat))
    rows = []
    for b in range(n):
        row = {"bin": str(bins[b]) if isinstance(bins, list) else str(b)}
        p = pol[b] if isinstance(pol, list) and b < len(pol) else None
        d = dat[b] if isinstance(dat, list) and b < len(dat) else None
        for i, mode in enumerate(modes):
            row[str(mode)] = f"{_share(p, i)} / {_share(d, i)}"
        rows.append(row)
    return pd.DataFrame(rows)


def _rate(v) -> str:
    x = _num(v)
    return "?" if math.isnan(x) else f"{x:.3f}"


def reproduction_summary(rep: dict) -> list[str]:
    """The verdict, success and wrong-block lines of a reproduction check."""
    lines = []
    if "passed" in rep or "episodes" in rep:
        verdict = {True: "**passed**", False: "**failed**"}.get(rep.get("passed"), "unknown")
        eps = f" over {rep['episodes']} episodes" if "episodes" in rep else ""
        lines.append(f"- Reproduction check: {verdict}{eps}.")
    s = rep.get("success")
    if isinstance(s, dict):
        ci = s.get("policy_ci")
        ci_txt = (f" [{_rate(ci[0])}, {_rate(ci[1])}]"
                  if isinstance(ci, list | tuple) and len(ci) == 2 else "")
        lines.append(f"- Success: policy {_rate(s.get('policy'))}{ci_txt} vs data "
                     f"{_rate(s.get('data'))}.")
    w = rep.get("wrong_block_rate")
    if isinstance(w, dict):
        lines.append(f"- Wrong-block rate: policy {_rate(w.get('policy'))} vs data "
                     f"{_rate(w.get('data'))}.")
    return lines


def reproduction_lines(rep: dict, loss_figure: str | None = None) -> list[str]:
    """A reproduction.json rendered: summary, checks, mode shares and the held-out loss plot."""
    lines = reproduction_summary(rep)
    lines += [""] if lines else []
    checks = checks_table(rep.get("checks"))
    if not checks.empty:
        lines += ["Checks:", "", markdown_table(checks)]
    shares = mode_share_table(rep.get("mode_shares"))
    if not shares.empty:
        lines += ["Mode shares per bin (policy / data):", "", markdown_table(shares)]
    if loss_figure is not None:
        lines += [f"![Held-out loss]({loss_figure})", ""]
    return lines


def policy_dirs(records: list[dict]) -> list[tuple[str, str | None]]:
    """Distinct (policy_dir, a run dir naming it) over the results, in order of appearance."""
    seen: dict[str, str | None] = {}
    for rec in records:
        p = rec.get("policy_dir")
        if isinstance(p, str) and p and p not in seen:
            seen[p] = rec.get("path")
    return list(seen.items())


def read_reproductions(records: list[dict]) -> list[dict]:
    """Per distinct policy_dir: its name, resolved directory (or None) and reproduction.json."""
    out = []
    for p, run in policy_dirs(records):
        d = resolve_dir(p, run)
        rep = read_json_dict(d / REPRODUCTION_FILE) if d is not None else None
        out.append({"policy_dir": p, "dir": d, "reproduction": rep})
    return out


def policy_section(entries: list[dict], loss_figures: Mapping[str, str]) -> list[str]:
    """One subsection per policy_dir; ``loss_figures`` maps policy_dir → held-out loss figure."""
    if not entries:
        return []
    lines = ["## Base policy", ""]
    for e in entries:
        lines += [f"### `{e['policy_dir']}`", ""]
        if e["dir"] is None:
            lines += ["Directory not found from here.", ""]
        elif e["reproduction"] is None:
            lines += [f"No `{REPRODUCTION_FILE}` in this directory.", ""]
        else:
            lines += reproduction_lines(e["reproduction"], loss_figures.get(e["policy_dir"]))
    return lines


# --- where things live ----------------------------------------------------------------------


def _shown(path: str, run_dir) -> str:
    d = resolve_dir(path, run_dir)
    return str(d.resolve()) if d is not None else path


def _verifier_name(rec: dict) -> str:
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    vcfg = cfg.get("verifier") if isinstance(cfg.get("verifier"), dict) else {}
    return str(vcfg.get("name", "?"))


def locations(records: list[dict]) -> list[dict]:
    """Per policy directory (resolved where found; "" when a verifier names none): the
    (verifier_dir, verifier name) pairs the results evaluated it with."""
    out: dict[str, dict[str, str]] = {}
    for rec in records:
        p, vd = rec.get("policy_dir"), rec.get("verifier_dir")
        policy = _shown(p, rec.get("path")) if isinstance(p, str) and p else ""
        if policy:
            out.setdefault(policy, {})
        if isinstance(vd, str) and vd:
            out.setdefault(policy, {}).setdefault(_shown(vd, rec.get("path")), _verifier_name(rec))
    return [{"policy_dir": p, "verifiers": list(v.items())} for p, v in out.items()]


def reuse_commands(policy: str, verifiers: list[tuple[str, str]]) -> list[str]:
    """Shell commands that evaluate and benchmark with a policy (and its fitted verifiers)."""
    p = shlex.quote(policy)
    if not verifiers:
        return [f"steerlab eval --out runs/eval_{BASELINE}_M16 policy_dir={p} "
                f"verifier.name={BASELINE} eval.M=16",
                f"steerlab bench sampling --policy {p} --json bench_sampling.json"]
    cmds = []
    for vdir, name in verifiers:
        n = shlex.quote(name)
        cmds += [f"steerlab eval --out runs/eval_{name}_M16 policy_dir={p} "
                 f"verifier_dir={shlex.quote(vdir)} verifier.name={n} eval.M=16",
                 f"steerlab bench sampling --policy {p} --verifier {n} "
                 f"--json bench_sampling_{name}.json"]
    return cmds


def locations_section(locs: list[dict]) -> list[str]:
    if not locs:
        return []
    lines = ["## Where things live", ""]
    for loc in locs:
        if loc["policy_dir"]:
            lines.append(f"- policy_dir: `{loc['policy_dir']}`")
        lines += [f"  - verifier_dir ({name}): `{v}`" if loc["policy_dir"] else
                  f"- verifier_dir ({name}): `{v}`" for v, name in loc["verifiers"]]
    lines.append("")
    cmds = [c for loc in locs if loc["policy_dir"]
            for c in reuse_commands(loc["policy_dir"], loc["verifiers"])]
    if cmds:
        lines += ["Reuse them (evaluate at another M; time sampling and scoring):", "", "```sh",
                  *cmds, "```", ""]
    return lines


# --- the report -----------------------------------------------------------------------------


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

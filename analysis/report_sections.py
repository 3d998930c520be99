"""Report sections beside the results: the scaling study (power-law fits), the base policy's
reproduction check, and where the policy and verifier directories live (with commands to reuse
them). Each builder is pure: records or tables in, markdown lines out."""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping

import numpy as np
import pandas as pd

from analysis.load import read_json_dict, resolve_dir
from analysis.paired import BASELINE
from analysis.plots import scaling_curves
from analysis.tables import markdown_table

REPRODUCTION_FILE = "reproduction.json"


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


def _run_args(rec: dict) -> str:
    """The suite and task a result ran on, as eval arguments ("" for the defaults)."""
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    suite, task = cfg.get("suite", "tabletop"), cfg.get("task", "pick_place")
    return "" if (suite, task) == ("tabletop", "pick_place") else f"suite={suite} task={task}"


def locations(records: list[dict]) -> list[dict]:
    """Per policy directory (resolved where found; "" when a verifier names none): the
    (verifier_dir, verifier name) pairs the results evaluated it with, and the suite and task
    they ran on (``run_args``)."""
    out: dict[str, dict[str, str]] = {}
    args: dict[str, str] = {}
    for rec in records:
        p, vd = rec.get("policy_dir"), rec.get("verifier_dir")
        policy = _shown(p, rec.get("path")) if isinstance(p, str) and p else ""
        if policy:
            out.setdefault(policy, {})
        args.setdefault(policy, _run_args(rec))
        if isinstance(vd, str) and vd:
            out.setdefault(policy, {}).setdefault(_shown(vd, rec.get("path")), _verifier_name(rec))
    return [{"policy_dir": p, "verifiers": list(v.items()), "run_args": args.get(p, "")}
            for p, v in out.items()]


def reuse_commands(policy: str, verifiers: list[tuple[str, str]], run_args: str = "") -> list[str]:
    """Shell commands that evaluate and benchmark with a policy (and its fitted verifiers) on
    the suite and task of ``run_args``."""
    p = shlex.quote(policy)
    at = f" {run_args}" if run_args else ""
    if not verifiers:
        return [f"steerlab eval --out runs/eval_{BASELINE}_M16 policy_dir={p}{at} "
                f"verifier.name={BASELINE} eval.M=16",
                f"steerlab bench sampling --policy {p} --json bench_sampling.json"]
    cmds = []
    for vdir, name in verifiers:
        n = shlex.quote(name)
        cmds += [f"steerlab eval --out runs/eval_{name}_M16 policy_dir={p}{at} "
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
            for c in reuse_commands(loc["policy_dir"], loc["verifiers"], loc["run_args"])]
    if cmds:
        lines += ["Reuse them (evaluate at another M; time sampling and scoring):", "", "```sh",
                  *cmds, "```", ""]
    return lines

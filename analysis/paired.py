"""The paired comparison of every verifier with the ``random`` verifier under the same config:
per-episode successes paired by index, an exact McNemar test per pair, and its report section."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import varying_columns
from analysis.plots import M_COLUMNS, eval_rows, find_column
from analysis.tables import _as_int, _is_num, markdown_table
from core.stats import mcnemar

BASELINE = "random"

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

"""Report sections on hand-made run directories: paired comparison with random (McNemar),
scaling study, base-policy reproduction check, and where the policy/verifier directories live."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.load import load_records, load_runs, read_episodes
from analysis.paired import pair_episodes, paired_comparisons
from analysis.report import make_report
from analysis.report_sections import (
    checks_table,
    fit_table,
    locations,
    mode_share_table,
    reproduction_lines,
    reuse_commands,
)


def _config(verifier, M, seed=0, episodes=10, eval_seed=1000, **verifier_fields):
    return {"task": "pick_place", "seed": seed, "verifier": {"name": verifier, **verifier_fields},
            "eval": {"M": M, "episodes": episodes, "seed": eval_seed},
            "policy": {"name": "flow"}}


def _write_eval(d, cfg, successes, policy_dir="pol", verifier_dir=None, extra_rows=0):
    """An eval run dir as ``experiments.run.run_eval`` writes it; ``successes`` per episode."""
    d.mkdir(parents=True, exist_ok=True)
    n = len(successes)
    result = {"schema": "steerlab.result/1", "kind": "eval", "config": cfg,
              "policy_dir": str(policy_dir),
              "metrics": {"success_rate": sum(successes) / n, "episodes": n}}
    if verifier_dir is not None:
        result["verifier_dir"] = str(verifier_dir)
    rows = [{"episode": i, "success": bool(s), "progress": float(s), "length": 40}
            for i, s in enumerate(list(successes) + [0] * extra_rows)]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "result.json").write_text(json.dumps(result))
    (d / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# random:    1 1 0 0 0 0 0 0 0 0  (2/10)
# cfn:       1 0 1 1 1 1 1 1 1 0  (8/10) -> n10 = 7, n01 = 1
RANDOM = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
CFN = [1, 0, 1, 1, 1, 1, 1, 1, 1, 0]


def _fabricate(root):
    _write_eval(root / "random_M4", _config("random", 4), RANDOM)
    _write_eval(root / "cfn_M4", _config("cfn", 4, hidden_dim=32), CFN,
                verifier_dir=root / "cfn_fit")
    # verifier.* fields are ignored when pairing; consensus ties random exactly.
    _write_eval(root / "consensus_M4", _config("consensus", 4, k=3), RANDOM)
    # No random run at M = 8: not paired, not listed.
    _write_eval(root / "cfn_M8", _config("cfn", 8), CFN)
    # A random run at M = 2 with an extra episode row: skipped with a note.
    _write_eval(root / "random_M2", _config("random", 2), RANDOM, extra_rows=1)
    _write_eval(root / "cfn_M2", _config("cfn", 2), CFN)
    # Same M but another evaluation seed, or another policy: not the same initial states.
    _write_eval(root / "cfn_M4_seed7", _config("cfn", 4, eval_seed=7), CFN)
    _write_eval(root / "cfn_M4_other_policy", _config("cfn", 4), CFN, policy_dir="other")


def test_pair_episodes_by_index():
    a = [{"episode": 1, "success": True}, {"episode": 0, "success": False}]
    b = [{"episode": 0, "success": True}, {"episode": 1, "success": True}]
    x, y = pair_episodes(a, b)
    np.testing.assert_array_equal(x, [False, True])
    np.testing.assert_array_equal(y, [True, True])
    assert "counts differ (2 vs 1)" in pair_episodes(a, b[:1])
    assert "indices differ" in pair_episodes(a, [{"episode": 0, "success": 1},
                                                 {"episode": 5, "success": 1}])
    assert "verifier run" in pair_episodes([], b)
    assert "either run" in pair_episodes([], [])
    assert "repeated" in pair_episodes(a, [{"episode": 0, "success": 1}] * 2)


def test_paired_comparisons_on_run_dirs(tmp_path):
    _fabricate(tmp_path)
    df = load_runs(tmp_path)
    episodes = {p: read_episodes(p) for p in df["path"]}
    table = paired_comparisons(df, episodes)
    # eval.seed varies among the runs, so it is shown next to verifier and M.
    assert list(table.columns) == ["verifier", "M", "eval.seed", "episodes", "success", "random",
                                   "diff", "n10", "n01", "p", "note"]
    assert len(table) == 3  # cfn@2 (note), cfn@4, consensus@4
    cfn4 = table[(table["verifier"] == "cfn") & (table["M"] == 4)].iloc[0]
    assert cfn4["note"] == "" and cfn4["episodes"] == 10
    assert (cfn4["n10"], cfn4["n01"]) == (7, 1)
    assert cfn4["success"] == pytest.approx(0.8) and cfn4["random"] == pytest.approx(0.2)
    assert cfn4["diff"] == pytest.approx(0.6)
    assert cfn4["p"] == pytest.approx(2 * (1 + 8) / 2**8)  # 2·P(X <= 1), X ~ Bin(8, 1/2)
    cons = table[table["verifier"] == "consensus"].iloc[0]
    assert (cons["n10"], cons["n01"], cons["p"], cons["diff"]) == (0, 0, 1.0, 0.0)
    cfn2 = table[(table["verifier"] == "cfn") & (table["M"] == 2)].iloc[0]
    assert "episode counts differ (10 vs 11)" in cfn2["note"] and math.isnan(cfn2["p"])
    assert 8 not in set(table["M"])


def test_paired_comparisons_empty_inputs():
    assert paired_comparisons(pd.DataFrame(), {}).empty
    df = pd.DataFrame([{"verifier.name": "random", "eval.M": 4, "path": "a"}])
    assert paired_comparisons(df, {}).empty


def test_report_paired_section(tmp_path):
    runs = tmp_path / "runs"
    _fabricate(runs)
    text = make_report(runs, out_dir=tmp_path / "out").read_text()
    section = text.split("## Paired comparison with random")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 2  # header, separator, cfn@4, consensus@4
    assert rows[0].startswith("| verifier | M | eval.seed | episodes |")
    assert "| cfn | 4 | 1000 | 10 | 0.800 | 0.200 | 0.600 | 7 | 1 | 0.0703 |" in section
    assert "- cfn at M=2: episode counts differ (10 vs 11)" in section


def test_report_without_episodes_says_so(tmp_path):
    for v in ("random", "cfn"):
        _write_eval(tmp_path / v, _config(v, 4), RANDOM)
        (tmp_path / v / "episodes.jsonl").unlink()
    text = make_report(tmp_path).read_text()
    assert "No run has an episodes.jsonl" in text
    assert "- cfn at M=4" not in text


# --- scaling --------------------------------------------------------------------------------


def _scaling_result(d, policy_dir="pol"):
    """A scaling result as ``experiments.run.run_scaling`` writes it (fits stored)."""
    d.mkdir(parents=True, exist_ok=True)
    Ns = [1, 2, 4, 8, 16]
    methods = {}
    for method, a, b in [("policy", 0.5, -0.2), ("gaussian", 0.9, -0.45)]:
        err = (a * np.asarray(Ns, float) ** b).tolist()
        methods[method] = {"error_mean": err, "error_sem": [0.01] * len(Ns),
                           "fit": {"a": a, "b": b, "r2": 0.99, "a_ci": [a - 0.1, a + 0.1],
                                   "b_ci": [b - 0.05, b + 0.05], "n_boot": 20}}
    result = {"schema": "steerlab.result/1", "kind": "scaling",
              "config": _config("random", 1), "policy_dir": str(policy_dir),
              "metrics": {"scaling_s": 1.0},
              "curves": {"Ns": Ns, "states": 8, "n_hat": 2, "methods": methods}}
    (d / "result.json").write_text(json.dumps(result))


def test_fit_table_reads_scaling_study_layout(tmp_path):
    _scaling_result(tmp_path / "scaling")
    fits = fit_table(load_records(tmp_path))
    assert list(fits["method"]) == ["policy", "gaussian"]
    assert list(fits.columns) == ["method", "run", "N", "states", "a", "b", "b 95% CI", "R²"]
    g = fits[fits["method"] == "gaussian"].iloc[0]
    assert (g["a"], g["b"], g["R²"], g["states"]) == (0.9, -0.45, 0.99, 8)
    assert g["b 95% CI"] == "[-0.5, -0.4]" and g["N"] == "1–16 (5)"


def test_report_scaling_section_not_a_results_row(tmp_path):
    _write_eval(tmp_path / "random_M4", _config("random", 4), RANDOM)
    _scaling_result(tmp_path / "scaling")
    text = make_report(tmp_path).read_text()
    results = text.split("## Results")[1].split("\n## ")[0]
    assert sum(1 for line in results.splitlines() if line.startswith("|")) == 1 + 2
    assert "scaling" not in results
    scaling = text.split("## Scaling: action error vs N")[1].split("\n## ")[0]
    assert "| policy | scaling |" in scaling and "| gaussian | scaling |" in scaling
    assert "![Action error vs N](fig_error_vs_N.png)" in scaling
    assert (tmp_path / "fig_error_vs_N.png").stat().st_size > 1000


def test_report_scaling_only(tmp_path):
    _scaling_result(tmp_path / "scaling")
    text = make_report(tmp_path / "scaling").read_text()
    assert "## Results" not in text and "## Scaling" in text
    assert "## Latency" not in text and "Success vs M" not in text


# --- base policy ----------------------------------------------------------------------------

REPRODUCTION = {
    "episodes": 200, "passed": False,
    "checks": [{"name": "success", "value": 0.62, "target": ">= 0.55", "passed": True},
               {"name": "wrong_block", "value": 0.21, "target": "<= 0.15", "passed": False}],
    "success": {"policy": 0.62, "policy_ci": [0.55, 0.68], "data": 0.7},
    "wrong_block_rate": {"policy": 0.21, "data": 0.1},
    "mode_shares": {"modes": ["left", "right"], "bins": ["early", "late"],
                    "policy": [[0.6, 0.4], [0.3, 0.7]], "data": [[0.5, 0.5], [0.25, 0.75]]},
    "loss_curve": [{"step": s, "heldout_loss": 2.0 / (1 + s / 100)} for s in range(0, 1001, 100)],
}


def test_reproduction_rendering_pure():
    text = "\n".join(reproduction_lines(REPRODUCTION, "fig_policy_loss.png"))
    assert "Reproduction check: **failed** over 200 episodes" in text
    assert "Success: policy 0.620 [0.550, 0.680] vs data 0.700" in text
    assert "Wrong-block rate: policy 0.210 vs data 0.100" in text
    assert "| wrong_block | 0.210 | <= 0.15 | **no** |" in text
    assert "| early | 0.60 / 0.50 | 0.40 / 0.50 |" in text
    assert "![Held-out loss](fig_policy_loss.png)" in text
    shares = mode_share_table(REPRODUCTION["mode_shares"])
    assert list(shares.columns) == ["bin", "left", "right"]
    assert list(shares["right"]) == ["0.40 / 0.50", "0.70 / 0.75"]


def test_reproduction_rendering_tolerates_missing_keys():
    assert reproduction_lines({}) == []
    assert reproduction_lines({"passed": True}) == ["- Reproduction check: **passed**.", ""]
    assert checks_table("nope").empty and checks_table([{"name": "x"}]).shape == (1, 4)
    assert mode_share_table({"bins": ["a"]}).empty
    # Ragged shares: blanks, not errors.
    ragged = mode_share_table({"modes": ["l", "r"], "bins": ["a", "b"], "policy": [[0.5]]})
    assert list(ragged["l"]) == ["0.50 / ", " / "] and list(ragged["r"]) == [" / ", " / "]
    text = "\n".join(reproduction_lines({"success": {"policy": 0.5}, "checks": [None]}))
    assert "Success: policy 0.500 vs data ?" in text


def test_report_base_policy_and_locations(tmp_path):
    pol, pol2, cfn_dir = tmp_path / "policy_a", tmp_path / "policy_b", tmp_path / "cfn_fit"
    for d in (pol, pol2, cfn_dir):
        d.mkdir()
    (pol / "reproduction.json").write_text(json.dumps(REPRODUCTION))
    (pol2 / "reproduction.json").write_text(json.dumps({"passed": True, "episodes": 50}))
    runs = tmp_path / "runs"
    _write_eval(runs / "random", _config("random", 4), RANDOM, policy_dir=pol)
    _write_eval(runs / "cfn", _config("cfn", 4), CFN, policy_dir=pol, verifier_dir=cfn_dir)
    _write_eval(runs / "b", _config("random", 4), RANDOM, policy_dir=pol2)
    _write_eval(runs / "gone", _config("random", 4), RANDOM, policy_dir=tmp_path / "missing")
    out = tmp_path / "out"
    text = make_report(runs, out_dir=out).read_text()

    base = text.split("## Base policy")[1].split("\n## ")[0]
    assert f"### `{pol}`" in base and f"### `{pol2}`" in base
    assert "| success | 0.620 | >= 0.55 | yes |" in base
    assert "| late | 0.30 / 0.25 | 0.70 / 0.75 |" in base
    assert "Reproduction check: **passed** over 50 episodes" in base
    assert "Directory not found" in base
    figs = sorted(p.name for p in out.glob("fig_policy_loss*.png"))
    assert len(figs) == 1 and f"]({figs[0]})" in base  # only policy_a has a loss curve

    where = text.split("## Where things live")[1].split("\n## ")[0]
    assert f"- policy_dir: `{pol}`" in where
    assert f"  - verifier_dir (cfn): `{cfn_dir}`" in where
    assert (f"steerlab eval --out runs/eval_cfn_M16 policy_dir={pol} verifier_dir={cfn_dir} "
            "verifier.name=cfn eval.M=16") in where
    assert f"steerlab bench sampling --policy {pol} --verifier cfn --json" in where
    assert f"steerlab bench sampling --policy {pol2} --json bench_sampling.json" in where


def test_locations_relative_paths_resolve_from_run_ancestors(tmp_path, monkeypatch):
    (tmp_path / "qs" / "stages" / "pol").mkdir(parents=True)
    run = tmp_path / "qs" / "cells" / "c1"
    _write_eval(run, _config("cfn", 4), CFN, policy_dir="qs/stages/pol",
                verifier_dir="qs/stages/nowhere")
    monkeypatch.chdir(run)  # the report is made from somewhere else than the evaluation
    locs = locations(load_records(run))
    assert locs == [{"policy_dir": str((tmp_path / "qs" / "stages" / "pol").resolve()),
                     "verifiers": [("qs/stages/nowhere", "cfn")], "run_args": ""}]


def test_reuse_commands_quote_paths():
    cmds = reuse_commands("/a b/pol", [("/v", "cfn")])
    assert cmds[0] == ("steerlab eval --out runs/eval_cfn_M16 policy_dir='/a b/pol' "
                       "verifier_dir=/v verifier.name=cfn eval.M=16")
    assert cmds[1] == ("steerlab bench sampling --policy '/a b/pol' --verifier cfn "
                       "--json bench_sampling_cfn.json")
    on = reuse_commands("/p", [("/v", "knn")], "suite=maniskill task=PickCube-v1")
    assert on[0] == ("steerlab eval --out runs/eval_knn_M16 policy_dir=/p suite=maniskill "
                     "task=PickCube-v1 verifier_dir=/v verifier.name=knn eval.M=16")

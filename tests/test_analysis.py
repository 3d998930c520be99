"""Known-answer tests for analysis statistics, run loading and the report."""

import json
import math

import numpy as np
import pytest

from analysis.load import load_records, load_runs
from analysis.report import make_report
from core.stats import (
    binom_cdf_half,
    fit_power_law,
    mcnemar,
    rankdata,
    spearman,
    wilson_interval,
)

# --- Wilson --------------------------------------------------------------------------------


def test_wilson_known_values():
    # Hand-computed: p=0.8, n=10, z=1.96 -> centre 0.71676, half 0.22662.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490157, abs=1e-5)
    assert hi == pytest.approx(0.943319, abs=1e-5)
    # 0/10: lower bound exactly 0, upper z²/(n+z²) = 3.8416/13.8416.
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, abs=1e-9)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / 13.8416, abs=1e-9)
    # 50/100: symmetric around 0.5.
    lo, hi = wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0) and lo == pytest.approx(0.403832, abs=1e-5)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


# --- power law ------------------------------------------------------------------------------

N = np.array([1, 2, 4, 8, 16, 32, 64, 128])


def test_power_law_noise_free_exact():
    e = 2.5 * N**-0.4
    fit = fit_power_law(N, e, n_boot=50)
    assert fit["a"] == pytest.approx(2.5, rel=1e-10)
    assert fit["b"] == pytest.approx(-0.4, abs=1e-10)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["b_ci"][0] == pytest.approx(-0.4, abs=1e-9)
    assert fit["b_ci"][1] == pytest.approx(-0.4, abs=1e-9)


def test_power_law_with_offset_noise_free():
    e = 0.15 + 2.0 * N**-0.7
    fit = fit_power_law(N, e, offset=True, n_boot=20)
    assert fit["c"] == pytest.approx(0.15, abs=1e-6)
    assert fit["a"] == pytest.approx(2.0, abs=1e-5)
    assert fit["b"] == pytest.approx(-0.7, abs=1e-5)
    # Without the offset the log-log fit is biased towards a shallower exponent.
    assert fit_power_law(N, e, n_boot=0)["b"] > -0.7 + 0.05


def test_power_law_noisy_ci_covers_truth_points_and_states():
    rng = np.random.default_rng(3)
    e = 1.7 * N**-0.5 * np.exp(rng.normal(0, 0.08, N.shape))
    fit = fit_power_law(N, e, n_boot=400, seed=1)
    assert fit["b_ci"][0] < -0.5 < fit["b_ci"][1]
    assert fit["b_ci"][1] - fit["b_ci"][0] < 0.2
    # Per-state curves [S, K]: resample states.
    E = 1.7 * N**-0.5 * np.exp(rng.normal(0, 0.2, (40, N.size)))
    fit2 = fit_power_law(N, E, n_boot=400, seed=1)
    assert fit2["b_ci"][0] < -0.5 < fit2["b_ci"][1]
    assert fit2["a_ci"][0] < 1.7 * math.exp(0.02) < fit2["a_ci"][1]
    # Determinism under a fixed seed.
    assert fit_power_law(N, E, n_boot=100, seed=5) == fit_power_law(N, E, n_boot=100, seed=5)


def test_power_law_bad_input():
    with pytest.raises(ValueError, match="e:"):
        fit_power_law(N, np.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        fit_power_law(N, np.zeros(N.size))
    with pytest.raises(ValueError, match="N:"):
        fit_power_law([1, 1], [0.5, 0.4])


# --- Spearman -------------------------------------------------------------------------------


def test_rankdata_ties_averaged():
    np.testing.assert_allclose(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_spearman_known_and_vs_scipy():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Hand-computed: ranks x=(1,2,3), y=(1,3,2) -> 1 - 6*2/(3*8) = 0.5.
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 50)  # many ties
    y = x + rng.integers(0, 3, 50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


# --- McNemar -------------------------------------------------------------------------------


def _vectors(n11, n10, n01, n00):
    a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return np.array(a, bool), np.array(b, bool)


def test_binom_cdf_half_known():
    assert binom_cdf_half(1, 9) == pytest.approx((1 + 9) / 512, abs=0)
    assert binom_cdf_half(0, 1) == 0.5 and binom_cdf_half(-1, 4) == 0.0
    assert binom_cdf_half(4, 4) == 1.0
    assert binom_cdf_half(2, 4) == (1 + 4 + 6) / 16


def test_mcnemar_hand_computed():
    a, b = _vectors(n11=5, n10=8, n01=1, n00=6)
    t = mcnemar(a, b)
    assert (t["n"], t["n10"], t["n01"], t["n11"], t["n00"]) == (20, 8, 1, 5, 6)
    # Two-sided exact: 2 * P(X <= 1 | X ~ Bin(9, 1/2)) = 2 * (1 + 9) / 512.
    assert t["p_value"] == pytest.approx(0.0390625, abs=1e-15)
    assert t["rate_a"] == pytest.approx(13 / 20) and t["rate_b"] == pytest.approx(6 / 20)
    assert t["diff"] == pytest.approx(7 / 20)
    # Concordant pairs do not change the test.
    assert mcnemar(*_vectors(0, 8, 1, 0))["p_value"] == t["p_value"]
    # A balanced split is p = 1 (capped), one discordant pair too.
    assert mcnemar(*_vectors(2, 3, 3, 2))["p_value"] == 1.0
    assert mcnemar(*_vectors(0, 1, 0, 4))["p_value"] == 1.0


def test_mcnemar_symmetric_and_identical():
    a, b = _vectors(n11=3, n10=2, n01=9, n00=4)
    ab, ba = mcnemar(a, b), mcnemar(b, a)
    assert ab["p_value"] == ba["p_value"]
    assert (ab["n10"], ab["n01"]) == (ba["n01"], ba["n10"])
    assert ab["diff"] == pytest.approx(-ba["diff"])
    same = mcnemar(a, a)
    assert same["p_value"] == 1.0 and same["n10"] == same["n01"] == 0 and same["diff"] == 0.0
    empty = mcnemar([], [])
    assert empty["p_value"] == 1.0 and empty["n"] == 0 and math.isnan(empty["diff"])
    with pytest.raises(ValueError, match="equal length"):
        mcnemar([True, False], [True])


def test_mcnemar_vs_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n, pa, pb in [(20, 0.5, 0.5), (64, 0.6, 0.3), (200, 0.4, 0.45), (500, 0.9, 0.8)]:
        a, b = rng.random(n) < pa, rng.random(n) < pb
        t = mcnemar(a, b)
        want = stats.binomtest(t["n10"], t["n10"] + t["n01"], 0.5).pvalue
        assert t["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-300)


# --- loading and report ---------------------------------------------------------------------


def _write_run(d, verifier, M, seed, succ, episodes=20, kind="eval", curves=None):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"task": "pick_place", "seed": seed, "verifier": {"name": verifier},
           "eval": {"M": M, "episodes": episodes}, "policy": {"name": "flow", "dims": [64, 64]}}
    lo, hi = wilson_interval(succ, episodes)
    lat = {p: {"p50": 1.0 + M * k, "p95": 2.0 + M * k}
           for p, k in [("encode", 0.0), ("sample", 0.1), ("score", 0.05), ("env", 0.0)]}
    result = {"schema": "steerlab.result/1", "kind": kind, "config": cfg,
              "metrics": {"success_rate": succ / episodes, "success_ci_low": lo,
                          "success_ci_high": hi, "episodes": episodes, "mean_length": 50.0,
                          "mean_final_progress": 0.7, "candidates_per_s": 1000.0 * M,
                          "latency_ms": lat, "extra_metric": 3}}
    if curves is not None:
        result["curves"] = curves
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "result.json").write_text(json.dumps(result))


def _fabricate(root):
    for v, base in [("random", 4), ("cfn", 8)]:
        for M in (1, 4, 16):
            for seed in (0, 1):
                _write_run(root / f"{v}_M{M}_s{seed}", v, M, seed, base + M // 4 + seed)
    n = [1, 2, 4, 8, 16, 32]
    err = (0.8 * np.asarray(n, float) ** -0.3)[None] * np.exp(
        np.random.default_rng(0).normal(0, 0.05, (10, 6)))
    _write_run(root / "scaling", "oracle", 1, 0, 10, kind="scaling",
               curves={"method": "gaussian", "N": n, "error": err.tolist()})
    _write_run(root / "adapter", "random", 1, 0, 10, kind="adapter",
               curves={"method": "pld", "episodes": [0, 10, 20], "success_rate": [0.2, 0.4, 0.6]})


def test_load_runs_flattens_and_tolerates(tmp_path):
    _fabricate(tmp_path)
    # Hidden temp dirs and broken files are ignored; missing config comes from config.json.
    (tmp_path / ".tmp-x").mkdir()
    (tmp_path / ".tmp-x" / "result.json").write_text("{}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    (sparse / "config.json").write_text(json.dumps({"task": "reach"}))
    (sparse / "result.json").write_text(json.dumps({"kind": "eval", "metrics": {}}))
    df = load_runs(tmp_path)
    assert len(df) == 12 + 2 + 1
    for col in ["verifier.name", "eval.M", "task", "metrics.success_rate",
                "latency_ms.sample.p50", "metrics.extra_metric", "path", "kind"]:
        assert col in df.columns, col
    assert "metrics.latency_ms.sample.p50" not in df.columns
    row = df[df["path"].str.endswith("cfn_M16_s1")].iloc[0]
    assert row["eval.M"] == 16 and row["metrics.success_rate"] == pytest.approx(13 / 20)
    assert row["latency_ms.sample.p50"] == pytest.approx(2.6)
    assert row["policy.dims"] == "[64, 64]"
    assert df[df["path"].str.endswith("sparse")].iloc[0]["task"] == "reach"
    # A single result file works too.
    assert len(load_runs(tmp_path / "scaling" / "result.json")) == 1
    assert len(load_records([tmp_path / "scaling", tmp_path / "scaling"])) == 1


def test_report_round_trip(tmp_path):
    runs = tmp_path / "runs"
    _fabricate(runs)
    out = tmp_path / "out"
    path = make_report([runs], out_dir=out)
    text = path.read_text()
    assert path == out / "report.md"
    for fig in ["fig_success_vs_M.png", "fig_error_vs_N.png", "fig_latency_vs_M.png",
                "fig_learning.png"]:
        assert (out / fig).stat().st_size > 1000, fig
        assert f"]({fig})" in text
    assert "## Results" in text and "| verifier.name |" in text
    assert "## Scaling: action error vs N" in text and "gaussian" in text
    assert "## Latency per step" in text
    # 12 eval + 1 adapter rows + header + separator; the scaling result is not a row.
    results = text.split("## Results")[1].split("##")[0]
    assert sum(1 for line in results.splitlines() if line.startswith("|")) == 13 + 2
    assert "| scaling |" not in text.split("## Scaling")[0]
    # The error-vs-N figure sits in the scaling section, next to the fit table.
    scaling = text.split("## Scaling")[1].split("\n## ")[0]
    assert "](fig_error_vs_N.png)" in scaling
    # Fitted exponent near the truth appears in the fit table.
    header = next(line for line in scaling.splitlines() if line.startswith("| method"))
    cols = [c.strip() for c in header.split("|")]
    fit_line = next(line for line in scaling.splitlines() if line.startswith("| gaussian"))
    b = float(fit_line.split("|")[cols.index("b")])
    assert b == pytest.approx(-0.3, abs=0.05)
    assert "b 95% CI" in cols and "R²" in cols


def test_report_single_run_in_place(tmp_path):
    _write_run(tmp_path / "one", "cfn", 4, 0, 12)
    path = make_report(tmp_path / "one")
    assert path == tmp_path / "one" / "report.md"
    text = path.read_text()
    assert "0.600" in text  # 12/20
    assert (tmp_path / "one" / "fig_success_vs_M.png").exists()
    assert not (tmp_path / "one" / "fig_error_vs_N.png").exists()  # no scaling curves
    assert "Learning curves" not in text

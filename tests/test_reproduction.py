"""The reproduction check: known-answer comparisons of a policy's harness metrics with its data."""

import numpy as np

from experiments.reproduction import compare, heldout_curve, share_difference


def _metrics(success=0.55, wrong=0.0, shares=None, decisions=(100, 100)):
    shares = shares if shares is not None else [[0.6, 0.4], [0.5, 0.5]]
    return {"success_rate": success, "wrong_block_rate": wrong,
            "mode_shares_by_bin": {"shares": shares, "decisions": list(decisions)}}


MANIFEST = {"success_rate": 0.6, "wrong_block_rate": 0.0,
            "mode_shares": {"classified": [[0.6, 0.4], [0.55, 0.45]], "decisions": [500, 500]}}


def test_share_difference_ignores_thin_bins():
    assert np.isclose(share_difference([[0.6, 0.4], [0.0, 1.0]], [[0.5, 0.5], [1.0, 0.0]],
                                       [100, 3], [100, 100]), 0.1)
    assert share_difference([[0.6, 0.4]], [[0.5, 0.5]], [3], [100]) is None


def test_every_check_can_pass_and_fail():
    ok = compare(_metrics(), MANIFEST)
    assert all(c["passed"] for c in ok), ok
    bad = {c["name"]: c for c in compare(
        _metrics(success=0.2, wrong=0.1, shares=[[0.9, 0.1], [0.5, 0.5]]), MANIFEST)}
    assert not bad["success vs data"]["passed"] and np.isclose(bad["success vs data"]["value"],
                                                               -0.4)
    assert not bad["success in range"]["passed"]
    assert not bad["wrong-block rate"]["passed"]
    assert not bad["mode shares vs data (max over bins)"]["passed"]
    assert np.isclose(bad["mode shares vs data (max over bins)"]["value"], 0.3)


def test_heldout_curve_reads_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 50, "train/loss": 1.0}\n{"step": 500, "heldout/loss": 0.4}\n')
    assert heldout_curve(tmp_path) == [{"step": 500, "heldout_loss": 0.4}]
    assert heldout_curve(tmp_path / "missing") == []

"""The quickstart pipeline end to end at smoke size: every stage runs and a report appears."""

import json

import pandas as pd
import pytest

from experiments.quickstart import quickstart, quickstart_spec


def test_spec_runs_m1_once():
    spec = quickstart_spec({"task": "pick_place"}, Ms=(1, 2, 4), verifiers=("random", "cfn"))
    assert spec["exclude"] == [{"verifier.name": "cfn", "eval.M": 1}]


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    out = tmp_path / "qs"
    report = quickstart(str(out), fast=True)
    text = report.read_text()
    assert "success" in text.lower() and ".png" in text
    table = pd.read_parquet(out / "results.parquet")
    assert (table["status"] == "done").all()
    assert set(table["verifier.name"]) == {"random", "consensus", "cfn", "oracle_sim"}
    # the report pairs every verifier with random and shows the policy's reproduction check
    assert "Paired comparison" in text and "reproduction" in text.lower()
    policy_runs = list((out / "stages" / "policy").glob("*/run/reproduction.json"))
    assert len(policy_runs) == 1
    scaling = json.loads((out / "scaling" / "result.json").read_text())
    assert set(scaling["curves"]["methods"]) == {"policy", "gaussian"}
    # Rerunning finds everything done and recomputes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    quickstart(str(out), fast=True)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}

"""The quickstart pipeline end to end at smoke size: every stage runs and a report appears."""

import json

import pandas as pd
import pytest

from experiments.cli import main
from experiments.quickstart import quickstart_spec, quickstart_verifiers


def test_spec_runs_m1_once():
    spec = quickstart_spec({"task": "pick_place"}, Ms=(1, 2, 4), verifiers=("random", "cfn"))
    assert spec["exclude"] == [{"verifier.name": "cfn", "eval.M": 1}]


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--fast"]) == 0
    text = (out / "report.md").read_text()
    assert "success" in text.lower() and ".png" in text
    table = pd.read_parquet(out / "results.parquet")
    assert (table["status"] == "done").all()
    # every registered verifier that the flow policy can serve, with no list kept here
    assert set(table["verifier.name"]) == set(quickstart_verifiers())
    assert {"random", "consensus", "cfn", "oracle_sim"} <= set(quickstart_verifiers())
    # the report pairs every verifier with random and shows the policy's reproduction check
    assert "Paired comparison" in text and "reproduction" in text.lower()
    policy_runs = list((out / "stages" / "policy").glob("*/run/reproduction.json"))
    assert len(policy_runs) == 1
    scaling = json.loads((out / "scaling" / "result.json").read_text())
    assert set(scaling["curves"]["methods"]) == {"policy", "gaussian"}
    # Rerunning finds everything done and recomputes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert main(["quickstart", "--out", str(out), "--fast"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}

"""Grid engine: spec validation, expansion, stage caching, failure isolation, resume after
SIGKILL, concurrent stage builds, corruption detection, and the local/Ray backends."""

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from grid_toy import STAGES, ToyConfig

from core.config import ConfigError
from experiments.grid import (
    COMPLETE,
    GridOptions,
    check_stage,
    expand,
    grid_status,
    load_spec,
    run_grid,
)

PY = sys.executable
TESTS = Path(__file__).resolve().parent


def with_tests_on_path(env) -> dict:
    """``env`` with ``tests/`` on PYTHONPATH, so processes pytest did not start import grid_toy."""
    return {**env, "PYTHONPATH": os.pathsep.join(
        p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)}


def spec(**axes):
    return {"name": "toy", "base": {"task": "reach"}, "axes": axes}


def builds(counter: Path) -> collections.Counter:
    """``stage:key`` (shared stages; from the ``.tmp-<key>-...`` build dir) or ``eval:<cell>``."""
    f = counter / "builds.txt"
    lines = f.read_text().split() if f.exists() else []
    norm = []
    for line in lines:
        stage, ident = line.split(":", 1)
        norm.append(f"{stage}:{ident.split('-')[1] if ident.startswith('.tmp-') else ident}")
    return collections.Counter(norm)


def stage_counts(counter: Path) -> collections.Counter:
    return collections.Counter(k.split(":")[0] for k in builds(counter).elements())


def run(s, out, **kw):
    return run_grid(s, out, STAGES, ToyConfig, GridOptions(quiet=True, **kw))


# --- spec validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"base": {"tsk": "reach"}}, "tsk"),
        ({"axes": {"verifier.nam": ["cfn"]}}, "verifier.nam"),
        ({"axes": {"eval.M": []}}, "eval.M: empty axis"),
        ({"axes": {"eval.M": ["four"]}}, "eval.M"),
        ({"axes": {"verifier.name": ["cfn", "bogus"]}}, "verifier.name"),
        ({"axes": {"eval.M": 4}}, "expected a list"),
        ({"zip": [{"seed": [0, 1], "train.steps": [5]}]}, r"zip\[0\].*equal lengths"),
        ({"zip": [{"train.stepz": [5]}]}, "train.stepz"),
        ({"exclude": [{"eval.MM": 1}]}, "eval.MM"),
        ({"axes": {"seed": [0]}, "zip": [{"seed": [1]}]}, "more than one axis"),
        ({"axis": {"seed": [0]}}, "unknown key 'axis'"),
    ],
)
def test_bad_spec_raises_before_running(tmp_path, raw, match):
    out = tmp_path / "g"
    with pytest.raises(ConfigError, match=match):
        run({"name": "bad", **raw}, out)
    assert not out.exists()  # nothing ran, nothing was written


def test_load_spec_yaml(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(textwrap.dedent("""
        name: verifier_comparison
        base: {task: pick_place, eval: {episodes: 50}}
        axes:
          verifier.name: [random, consensus, cfn]
          eval.M: [1, 4, 16]
          seed: [0, 1]
        zip:
          - {train.lr: [0.1, 0.2], train.steps: [2000, 3000]}
        exclude:
          - {verifier.name: random, eval.M: 1}
    """))
    s = load_spec(p, ToyConfig)
    cells = expand(s, ToyConfig)
    # 3*3*2 crossed with 2 zipped = 36, minus random@M=1 (2 seeds x 2 zip rows) = 32.
    assert len(cells) == 32
    assert not any(c.axes["verifier.name"] == "random" and c.axes["eval.M"] == 1 for c in cells)
    assert all(c.config.eval.episodes == 50 and c.config.task == "pick_place" for c in cells)
    assert {(c.config.train.lr, c.config.train.steps) for c in cells} == {(0.1, 2000), (0.2, 3000)}
    names = [c.name for c in cells]
    assert len(set(names)) == 32 and len({c.hash for c in cells}) == 32
    assert names[0] == cells[0].hash[:8] + "__verifier.name=random,eval.M=4,seed=0,train.lr=0.1," \
        "train.steps=2000"
    assert [c.name for c in expand(s, ToyConfig)] == names  # stable


# --- running ------------------------------------------------------------------------------------


def test_stage_reuse_and_table(tmp_path):
    counter = tmp_path / "count"
    counter.mkdir()
    s = {"name": "t", "base": {"counter_dir": str(counter)},
         "axes": {"verifier.name": ["random", "consensus", "cfn"], "eval.M": [1, 4],
                  "seed": [0, 1]}}
    df = run(s, tmp_path / "g")
    assert len(df) == 12 and (df["status"] == "done").all()
    # Each stage key built once: data/policy per seed, verifier per (seed, verifier), eval per cell.
    assert stage_counts(counter) == {"data": 2, "policy": 2, "verifier": 6, "eval": 12}
    assert max(builds(counter).values()) == 1
    table = pd.read_parquet(tmp_path / "g" / "results.parquet")
    csv = pd.read_csv(tmp_path / "g" / "results.csv")
    assert len(table) == len(csv) == 12
    for col in ["cell", "status", "verifier.name", "eval.M", "seed", "metrics.success_rate",
                "latency_ms.sample.p50"]:
        assert col in table.columns, col
    assert table["latency_ms.sample.p50"].tolist() == [0.5 * m for m in table["eval.M"]]
    # Rerun: nothing recomputed, same table.
    df2 = run(s, tmp_path / "g")
    assert stage_counts(counter) == {"data": 2, "policy": 2, "verifier": 6, "eval": 12}
    pd.testing.assert_frame_equal(df, df2)
    cell = tmp_path / "g" / "cells" / df["cell"][0]
    assert {"config.json", "log.txt", "result.json", "_DONE", "stages.json"} <= {
        p.name for p in cell.iterdir()}
    assert grid_status(tmp_path / "g") == {"done": 12, "running": 0, "failed": 0, "pending": 0,
                                           "total": 12, "failed_cells": []}


def test_failure_isolated_and_only_failed_retried(tmp_path):
    counter = tmp_path / "count"
    counter.mkdir()
    flag = tmp_path / "fail"
    flag.write_text("cfn")
    s = {"name": "t", "base": {"counter_dir": str(counter), "fail_file": str(flag)},
         "axes": {"verifier.name": ["random", "cfn"], "eval.M": [1, 4, 16]}}
    df = run(s, tmp_path / "g")
    assert (df["status"] == "failed").sum() == 3 and (df["status"] == "done").sum() == 3
    failed = df[df["status"] == "failed"]
    assert (failed["verifier.name"] == "cfn").all()
    assert failed["error"].str.contains("RuntimeError: toy failure").all()
    err = json.loads((tmp_path / "g" / "cells" / failed["cell"].iloc[0] / "error.json").read_text())
    assert err["type"] == "RuntimeError" and "Traceback" in err["traceback"]
    st = grid_status(tmp_path / "g")
    assert (st["done"], st["failed"], st["pending"]) == (3, 3, 0)
    before = builds(counter)
    flag.unlink()
    df2 = run(s, tmp_path / "g")
    assert (df2["status"] == "done").all()
    new = builds(counter) - before
    # Only the three failed cells' eval ran again; their shared stages were reused.
    assert sum(new.values()) == 3 and all(
        k.startswith("eval:") and "verifier.name=cfn" in k for k in new)
    assert "error" not in df2.columns or df2["error"].isna().all()


def _spec_for_kill(counter: Path):
    return {"name": "k", "base": {"counter_dir": str(counter), "sleep_s": 0.15},
            "axes": {"verifier.name": ["random", "consensus", "cfn"], "eval.M": [1, 4],
                     "seed": [0, 1]}}


def test_sigkill_midway_then_resume(tmp_path):
    counter = tmp_path / "count"
    counter.mkdir()
    out = tmp_path / "g"
    s = _spec_for_kill(counter)
    script = (f"from experiments.grid import GridOptions, run_grid; from grid_toy import STAGES, "
              f"ToyConfig; run_grid({s!r}, {str(out)!r}, STAGES, ToyConfig, "
              f"GridOptions(quiet=True))")
    proc = subprocess.Popen([PY, "-c", script], start_new_session=True,
                            env=with_tests_on_path(os.environ))
    deadline = time.time() + 60
    while time.time() < deadline:
        n_done = len(list(out.glob("cells/*/_DONE")))
        if n_done >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_cells = {p.parent.name for p in out.glob("cells/*/_DONE")}
    assert 3 <= len(done_cells) < 12, "kill landed too late to test resumption"
    finished = {f"eval:{c}" for c in done_cells}
    for marker in out.glob("stages/*/*/" + COMPLETE):
        finished.add(f"{marker.parent.parent.name}:{marker.parent.name}")

    df = run(s, out)
    assert (df["status"] == "done").all() and len(df) == 12
    after = builds(counter)
    # Nothing finished before the kill was computed again ...
    assert all(after[k] == 1 for k in finished), {k: after[k] for k in finished}
    # ... every stage key and cell was built, and at most the one in flight (workers=1) twice.
    assert stage_counts(counter).keys() == {"data", "policy", "verifier", "eval"}
    assert len({k for k in after if k.startswith("eval:")}) == 12
    assert sum(1 for n in after.values() if n > 1) <= 1 and max(after.values()) <= 2

    # Same table as an uninterrupted run (cell names differ only by the counter path's hash).
    counter2 = tmp_path / "count2"
    counter2.mkdir()
    ref = run(_spec_for_kill(counter2), tmp_path / "r")
    drop = ["cell", "hash"]
    pd.testing.assert_frame_equal(df.drop(columns=drop), ref.drop(columns=drop))


CONCURRENT = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from grid_toy import ToyConfig, ToyTrain
    from experiments.grid import Stage, ensure_stage
    import grid_toy as toy
    cfg = ToyConfig(counter_dir=sys.argv[2], sleep_s=1.5)
    stage = Stage("data", ("task", "seed"), (), toy.make_data)
    path, built = ensure_stage(Path(sys.argv[1]), stage, "k123", cfg, {})
    print(json.dumps({"path": str(path), "built": built}))
""")


def test_concurrent_builders_build_once(tmp_path):
    counter = tmp_path / "count"
    counter.mkdir()
    procs = [subprocess.Popen([PY, "-c", CONCURRENT, str(tmp_path / "g"), str(counter)],
                              stdout=subprocess.PIPE, text=True,
                              env=with_tests_on_path(os.environ)) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["path"] == outs[1]["path"]
    assert stage_counts(counter) == {"data": 1}
    assert check_stage(Path(outs[0]["path"]), "k123")
    assert not list((tmp_path / "g" / "stages" / "data").glob(".tmp-*"))


def test_corrupted_stage_detected_and_rebuilt(tmp_path):
    counter = tmp_path / "count"
    counter.mkdir()
    s = {"name": "c", "base": {"counter_dir": str(counter)}, "axes": {"seed": [0]}}
    out = tmp_path / "g"
    run(s, out)
    dirs = {p.parent.parent.name: p.parent for p in out.glob("stages/*/*/" + COMPLETE)}
    keys = {n: d.name for n, d in dirs.items()}
    (dirs["policy"] / "ckpt" / "params.json").unlink()  # a file missing
    (dirs["data"] / COMPLETE).unlink()  # the marker missing
    v = dirs["verifier"] / "verifier.json"  # same size, different bytes
    v.write_text(v.read_text().replace("0.0", "9.9"))
    for n in ("data", "policy", "verifier"):
        assert not check_stage(dirs[n], keys[n])
    for p in out.glob("cells/*/_DONE"):
        p.unlink()
    df = run(s, out)
    assert (df["status"] == "done").all()
    assert stage_counts(counter) == {"data": 2, "policy": 2, "verifier": 2, "eval": 2}
    for n in ("data", "policy", "verifier"):
        assert check_stage(dirs[n], keys[n])


def test_status_running_and_dead_pid(tmp_path):
    s = {"name": "s", "axes": {"seed": [0, 1]}}
    out = tmp_path / "g"
    df = run(s, out)
    cell = out / "cells" / df["cell"][0]
    (cell / "_DONE").unlink()
    import socket

    (cell / "_RUNNING").write_text(json.dumps({"pid": os.getpid(),
                                               "host": socket.gethostname()}))
    assert grid_status(out)["running"] == 1
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    (cell / "_RUNNING").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    st = grid_status(out)
    assert (st["running"], st["pending"], st["done"]) == (0, 1, 1)


def test_report_on_grid_dir(tmp_path):
    from analysis.report import make_report

    s = {"name": "r", "axes": {"verifier.name": ["random", "cfn"], "eval.M": [1, 4]}}
    run(s, tmp_path / "g")
    text = make_report(tmp_path / "g").read_text()
    results = text.split("## Results")[1].split("##")[0]
    assert sum(1 for line in results.splitlines() if line.startswith("|")) == 4 + 2
    assert (tmp_path / "g" / "fig_success_vs_M.png").exists()
    assert (tmp_path / "g" / "fig_latency_vs_M.png").exists()


def test_local_process_pool_matches_inline(tmp_path):
    s = {"name": "p", "axes": {"verifier.name": ["random", "cfn"], "eval.M": [1, 4]}}
    a = run(s, tmp_path / "a", workers=1)
    b = run(s, tmp_path / "b", workers=2)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_ray_backend_matches_local(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'steerlab[ray]')")
    # Ray workers inherit the environment of the local instance this test starts.
    monkeypatch.setenv("PYTHONPATH", with_tests_on_path(os.environ)["PYTHONPATH"])
    s = {"name": "ray", "axes": {"verifier.name": ["random", "consensus", "cfn"],
                                 "eval.M": [1, 2, 4, 8], "seed": [0, 1]}}
    local = run(s, tmp_path / "local", workers=2)
    ray_df = run(s, tmp_path / "ray", workers=2, backend="ray")
    assert len(ray_df) == 24 and (ray_df["status"] == "done").all()
    pd.testing.assert_frame_equal(local, ray_df)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "local" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "ray" / "results.parquet"))


@pytest.mark.parametrize("path", sorted(Path("experiments/grids").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_grid_specs_expand_to_valid_configs(path):
    from experiments.config import RunConfig

    cells = expand(str(path), RunConfig)
    assert cells
    for cell in cells:
        cell.config.validate()

"""Bad inputs at the command line: every subcommand, given missing directories, truncated npz,
corrupt JSON, non-YAML configs, unknown fields or bad values, exits 2 with one line that names
the offending file or field, prints no traceback, and leaves nothing behind.

The table is checked against the parser, so a new subcommand without rows fails here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest

import experiments.run
from experiments.cli import build_parser, main

TINY_FLOW = dict(width=16, depth=1, heads=2, expert_width=8, expert_heads=2, num_steps=2,
                 horizon=4, loss_samples=1)
# train-policy overrides for a run that takes seconds
TINY_TRAIN = [*(f"flow.{k}={v}" for k, v in TINY_FLOW.items()), "eval_replan=2", "steps=2",
              "steps_per_call=2", "log_every=2", "checkpoint_every=2", "eval_episodes=0",
              "batch_size=8", "heldout=0", "warmup=1"]


def _cut(path: Path, keep: float = 0.5) -> None:
    """Truncates a file, as an interrupted copy or a full disk would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Good and broken inputs, shared by every row (rows must not change them)."""
    import envs
    from algos.sft import TrainConfig
    from core.config import to_dict
    from core.io import write_json
    from envs.demos import write_demos
    from policies import FlowConfig, example_obs, make_policy, save_policy

    root = tmp_path_factory.mktemp("inputs")
    demos = root / "demos"
    write_demos("pick_place", 2, None, 0, str(demos), image=False)
    _cut(_copy(demos, root / "trunc") / "steps.npz")
    _cut(_copy(demos, root / "badmanifest") / "manifest.json")

    flow = FlowConfig(**TINY_FLOW).with_spec(envs.make("pick_place").spec)
    policy = make_policy("flow", flow)
    run = root / "run"
    write_json(run / "config.json",
               to_dict(TrainConfig(flow=flow, datasets=(str(demos),), eval_replan=2)))
    save_policy(str(run / "policy"), policy,
                policy.init(jax.random.PRNGKey(0), example_obs(flow)))
    _cut(_copy(run, root / "badconfig") / "config.json")
    _cut(_copy(run, root / "badpolicy") / "policy" / "policy.json")
    params = _copy(run, root / "noparams") / "policy" / "params"
    shutil.rmtree(params)
    params.mkdir()

    result = root / "results" / "r1" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text('{"schema": "steerlab.result/1", "kind": "eval", "metrics": {"succ')
    (root / "grid").mkdir()
    (root / "grid" / "grid.json").write_text('{"cells": [{"name": "a"')

    files = {
        "notyaml.yaml": "base:\n  eval: {M: 4\n  verifier: [cfn\n",
        "list.yaml": "- steps\n- 10\n",
        "train_unknown.yaml": "bogus_field: 1\n",
        "grid_unknown.yaml": "name: g\nbase: {bogus_field: 1}\naxes: {eval.M: [1]}\n",
        "grid_badvalue.yaml": "name: g\nbase: {eval: {M: many}}\naxes: {seed: [0]}\n",
        "grid_badkey.yaml": "name: g\nbogus_key: 1\n",
        "afile.txt": "not a directory\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    names: tuple[str, ...]  # what the one-line message must name
    kind: str = "clear"  # clear: our one-line error | argparse: usage error

    @property
    def command(self) -> str:
        return " ".join(self.argv[:2]) if self.argv[0] == "grid" else self.argv[0]


def case(id, argv, *names, kind="clear"):
    return Case(id, tuple(argv.split()), names, kind)


# {in}: the shared inputs; {tmp}: this row's working directory (also the cwd); {out}: an output
# path under it that must not appear.
CASES = [
    case("quickstart-bad-workers", "quickstart --workers 0 --out {out}", "workers"),
    case("quickstart-workers-type", "quickstart --workers many", "--workers", kind="argparse"),
    case("quickstart-out-is-a-file", "quickstart --out {in}/afile.txt", "afile.txt"),
    case("demos-bad-episodes", "demos --episodes 0 --out {out}", "episodes"),
    case("demos-unknown-task", "demos --task stack --out {out}", "stack"),
    case("demos-unknown-mode", "demos --mix bogus_mode=1 --out {out}", "bogus_mode"),
    case("demos-out-exists", "demos --episodes 1 --out {in}/demos", "demos", "exists"),
    case("demos-no-out", "demos --episodes 1", "--out", kind="argparse"),
    case("demos-unknown-suite", "demos --suite libero --out {out}", "libero", "maniskill",
         "tabletop"),
    case("demos-maniskill-task", "demos --suite maniskill --task pick_place --out {out}",
         "pick_place", "PickCube-v1"),
    case("demos-maniskill-variant",
         "demos --suite maniskill --task PickCube-v1 --variant layout --out {out}", "variant",
         "nominal"),
    case("demos-maniskill-mode", "demos --suite maniskill --task PickCube-v1 --mix wobbly=1 "
         "--out {out}", "wobbly"),
    case("train-truncated-npz", "train-policy --out {out} datasets=[{in}/trunc]",
         "trunc/steps.npz", "delete {in}/trunc", "steerlab demos", "--out {in}/trunc"),
    case("train-corrupt-manifest", "train-policy --out {out} datasets=[{in}/badmanifest]",
         "badmanifest/manifest.json", "line", "column", "delete {in}/badmanifest"),
    case("train-missing-dataset", "train-policy --out {out} datasets=[{tmp}/nope]", "nope"),
    case("train-config-not-yaml", "train-policy --config {in}/notyaml.yaml --out {out}",
         "notyaml.yaml", "line", "column"),
    case("train-config-not-mapping", "train-policy --config {in}/list.yaml --out {out}",
         "list.yaml", "mapping"),
    case("train-config-missing", "train-policy --config {tmp}/missing.yaml --out {out}",
         "missing.yaml"),
    case("train-config-unknown-field",
         "train-policy --config {in}/train_unknown.yaml --out {out}", "bogus_field"),
    case("train-unknown-field", "train-policy --out {out} bogus_field=1", "bogus_field"),
    case("train-bad-value", "train-policy --out {out} steps=0", "steps"),
    case("train-bad-type", "train-policy --out {out} steps=many", "steps"),
    case("fit-unknown-name", "fit-verifier bogus_name --policy {in}/run --out {out}",
         "bogus_name"),
    case("fit-missing-policy", "fit-verifier cfn --policy {tmp}/nope --out {out}", "nope"),
    case("fit-truncated-npz",
         "fit-verifier cfn --policy {in}/run --demos {in}/trunc --out {out}",
         "trunc/steps.npz", "steerlab demos"),
    case("fit-corrupt-run-config", "fit-verifier cfn --policy {in}/badconfig --out {out}",
         "badconfig/config.json", "line"),
    case("fit-corrupt-policy-json",
         "fit-verifier cfn --policy {in}/badpolicy --demos {in}/demos --out {out}",
         "policy.json", "line"),
    case("fit-empty-params",
         "fit-verifier cfn --policy {in}/noparams --demos {in}/demos --out {out}",
         "noparams/policy/params", "train-policy"),
    case("fit-unknown-field", "fit-verifier cfn --policy {in}/run --out {out} bogus_field=1",
         "bogus_field"),
    case("fit-bad-value", "fit-verifier cfn --policy {in}/run --out {out} epochs=many",
         "epochs"),
    case("fit-progress-missing-demos", "fit-progress --demos {tmp}/nope --out {out}", "nope"),
    case("fit-progress-truncated-npz", "fit-progress --demos {in}/trunc --out {out}",
         "trunc/steps.npz"),
    case("fit-progress-missing-eval-demos",
         "fit-progress --demos {in}/demos --eval-demos {tmp}/nope --out {out}", "nope"),
    case("fit-progress-unknown-field",
         "fit-progress --demos {in}/demos --out {out} bogus_field=1", "bogus_field"),
    case("fit-progress-bad-value", "fit-progress --demos {in}/demos --out {out} steps=0",
         "steps"),
    case("fit-progress-no-out", "fit-progress --demos {in}/demos", "--out", kind="argparse"),
    case("adapt-unknown-name", "adapt bogus_adapter --policy {in}/run --out {out}",
         "bogus_adapter"),
    case("adapt-missing-policy", "adapt clip_to_data --policy {tmp}/nope --out {out}", "nope"),
    case("check-missing-policy", "check-policy --policy {tmp}/nope", "nope"),
    case("check-corrupt-run-config", "check-policy --policy {in}/badconfig",
         "badconfig/config.json", "line"),
    case("check-corrupt-manifest", "check-policy --policy {in}/run --demos {in}/badmanifest",
         "badmanifest/manifest.json", "line"),
    case("check-missing-demos", "check-policy --policy {in}/run --demos {tmp}/nope", "nope"),
    case("check-bad-type", "check-policy --policy {in}/run --episodes many", "--episodes",
         kind="argparse"),
    case("eval-no-policy", "eval --out {out} verifier.name=random", "policy_dir"),
    case("eval-missing-policy", "eval --out {out} policy_dir={tmp}/nope", "nope"),
    case("eval-corrupt-policy-json", "eval --out {out} policy_dir={in}/badpolicy",
         "policy.json", "line"),
    case("eval-empty-params", "eval --out {out} policy_dir={in}/noparams", "params"),
    case("eval-config-not-yaml",
         "eval --config {in}/notyaml.yaml --out {out} policy_dir={in}/run",
         "notyaml.yaml", "line", "column"),
    case("eval-config-not-mapping", "eval --config {in}/list.yaml --out {out} "
         "policy_dir={in}/run", "list.yaml", "mapping"),
    case("eval-unknown-field", "eval --out {out} policy_dir={in}/run bogus_field=1",
         "bogus_field"),
    case("eval-bad-value", "eval --out {out} policy_dir={in}/run eval.M=0", "eval.M"),
    case("eval-task-not-in-suite", "eval --out {out} policy_dir={in}/run suite=maniskill",
         "task", "PickCube-v1"),
    case("eval-unknown-verifier", "eval --out {out} policy_dir={in}/run verifier.name=bogus_v",
         "bogus_v"),
    case("scaling-missing-policy", "scaling --policy {tmp}/nope --out {out}", "nope"),
    case("scaling-corrupt-policy-json", "scaling --policy {in}/badpolicy --out {out}",
         "policy.json", "line"),
    case("scaling-unknown-field", "scaling --policy {in}/run --out {out} bogus_field=1",
         "bogus_field"),
    case("scaling-bad-value", "scaling --policy {in}/run --out {out} scaling.states=1",
         "scaling.states"),
    case("bench-missing-policy", "bench sampling --policy {tmp}/nope --json {out}.json",
         "nope"),
    case("bench-corrupt-policy-json",
         "bench sampling --policy {in}/badpolicy --json {out}.json", "policy.json", "line"),
    case("bench-unknown-verifier", "bench sampling --verifier bogus_v --json {out}.json",
         "bogus_v"),
    case("bench-envful-verifier", "bench sampling --verifier oracle_sim --json {out}.json",
         "oracle_sim"),
    case("bench-bad-Ms", "bench sampling --Ms 0,4 --json {out}.json", "--Ms"),
    case("bench-unknown-what", "bench nope", "nope", kind="argparse"),
    case("report-missing-dir", "report {tmp}/runs_typo", "runs_typo"),
    case("report-missing-dir-out", "report {tmp}/runs_typo --out {out}", "runs_typo"),
    case("report-corrupt-result", "report {in}/results --out {out}",
         "r1/result.json", "line 1, column"),
    case("report-corrupt-result-in-place", "report {in}/results", "r1/result.json"),
    case("report-no-dirs", "report", "dirs", kind="argparse"),
    case("grid-run-not-yaml", "grid run {in}/notyaml.yaml --out {out}",
         "notyaml.yaml", "line", "column"),
    case("grid-run-not-mapping", "grid run {in}/list.yaml --out {out}", "list.yaml",
         "mapping"),
    case("grid-run-missing-spec", "grid run {tmp}/missing.yaml --out {out}", "missing.yaml"),
    case("grid-run-default-out", "grid run {in}/notyaml.yaml", "notyaml.yaml"),
    case("grid-run-bad-workers", "grid run {in}/grid_unknown.yaml --workers 0 --out {out}",
         "workers"),
    case("grid-run-unknown-field", "grid run {in}/grid_unknown.yaml --out {out}",
         "bogus_field"),
    case("grid-run-bad-value", "grid run {in}/grid_badvalue.yaml --out {out}", "eval.M"),
    case("grid-run-unknown-key", "grid run {in}/grid_badkey.yaml --out {out}", "bogus_key"),
    case("grid-status-missing", "grid status {tmp}/nope", "nope"),
    case("grid-status-corrupt", "grid status {in}/grid", "grid.json"),
]

def _param(c: Case):
    return pytest.param(c, id=c.id)


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every leaf subcommand of a parser ("grid run", not "grid")."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= subcommands(sub, f"{prefix}{name} ") or {f"{prefix}{name}"}
    return found


def test_every_subcommand_has_rows():
    missing = subcommands(build_parser()) - {c.command for c in CASES}
    assert not missing, f"add bad-input rows for: {sorted(missing)}"


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse, and commands that return an exit code
        return e.code


@pytest.mark.parametrize("c", [_param(c) for c in CASES])
def test_bad_input_exits_2_with_one_named_line(c, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative default outputs (runs/<grid>) land here and are seen
    fill = {"in": str(inputs), "tmp": str(work), "out": str(work / "out")}
    argv = [a.format(**fill) for a in c.argv]
    before = _snapshot(inputs, work)

    code = run_cli(argv)
    cap = capsys.readouterr()

    assert code == 2, (code, cap.err[-2000:], cap.out[-2000:])
    assert "Traceback" not in cap.err + cap.out
    text = cap.err
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if c.kind == "argparse":  # usage lines, then the error
        assert lines and "error:" in lines[-1], text
    else:
        assert len(lines) == 1, text
    for name in c.names:
        assert name.format(**fill) in lines[-1], (name, lines[-1])
    assert _snapshot(inputs, work) == before, "a failed command left or changed files"


def test_failed_start_does_not_block_the_corrected_retry(inputs, tmp_path, capsys):
    out = str(tmp_path / "run")
    bad = ["train-policy", "--out", out, f"datasets=[{inputs}/trunc]", *TINY_TRAIN]
    assert run_cli(bad) == 2
    assert "steps.npz" in capsys.readouterr().err and not os.path.exists(out)
    good = ["train-policy", "--out", out, f"datasets=[{inputs}/demos]", *TINY_TRAIN]
    assert run_cli(good) == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, "policy", "policy.json"))


def test_report_after_a_failed_report_writes_only_the_report(inputs, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli(["report", str(inputs / "results"), "--out", str(out)]) == 2
    assert not out.exists()
    good = tmp_path / "good"
    shutil.copytree(inputs / "results", good)
    (good / "r1" / "result.json").write_text('{"schema": "steerlab.result/1", "kind": "eval"}')
    assert run_cli(["report", str(good), "--out", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def _synthetic_chunks(n=128, seed=0):
    rng = np.random.default_rng(seed)
    state = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
    obs = {"state": state, "instruction": np.tile(np.array([1, 2, 3, 0, 0], np.int32), (n, 1)),
           "task_id": np.zeros((n,), np.int32)}
    actions = np.tanh(state[:, None, :3] * np.arange(1, 5)[None, :, None]).astype(np.float32)
    return {"obs": obs, "actions": actions, "valid": np.ones((n, 4), bool)}


def test_nonfinite_loss_stops_sft_and_keeps_the_last_good_checkpoint(tmp_path):
    from algos.sft import NonFiniteLossError, TrainConfig, load_checkpoint, train_policy
    from policies import FlowConfig

    flow = FlowConfig(state_dim=4, instruction_len=5, vocab_size=10, num_tasks=2, image=False,
                      **TINY_FLOW)
    # lr 0 at step 1 and 5e29 at step 2 (the params stay finite: a good checkpoint at step
    # 2), then the loss overflows
    cfg = TrainConfig(flow=flow, steps=40, batch_size=8, lr=1e30, warmup=2, cosine=False,
                      grad_clip=1e30, steps_per_call=2, log_every=2, checkpoint_every=2,
                      keep_last=2, eval_episodes=0, eval_replan=2)
    run = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"not finite at step (\d+)") as err:
        train_policy(cfg, run, data=_synthetic_chunks(), progress=False)
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    steps = sorted(int(d) for d in os.listdir(os.path.join(run, "ckpt")) if d.isdigit())
    assert steps and max(steps) < bad_step, (steps, bad_step)
    assert f"last good checkpoint is step {max(steps)}" in str(err.value)
    _, params, _ = load_checkpoint(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert not os.path.exists(os.path.join(run, "policy"))  # nothing exported


def test_bench_sampling_without_policy_times_scoring_on_its_own(inputs, monkeypatch):
    """No --policy: a fresh-init policy (here a tiny one standing in for the default, which
    takes half a minute to time) that the verifier is sized from."""
    import policies.bench
    from policies import example_obs, load_policy

    policy, params = load_policy(str(inputs / "run"))
    monkeypatch.setattr(policies.bench, "_default_policy",
                        lambda: (policy, params, example_obs(policy.cfg)))
    res = experiments.run.bench_sampling_cli(None, "cfn", Ms=[1], repeats=2)
    assert res["score_ms_at_M32"] > 0 and res["sample_ms_at_M32"] > 0
    assert res["score_overhead_at_M32"] == res["score_ms_at_M32"] / res["sample_ms_at_M32"]
    assert res["fused_minus_sample_ms_at_M32"] == res["fused_ms_at_M32"] - res["sample_ms_at_M32"]

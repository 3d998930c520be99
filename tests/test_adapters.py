"""Adapters: the act hook in the harness, the clip_to_data adapter's known answers, and the
generic ``steerlab adapt`` command and grid stage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import envs
from algos.base import ExecuteChosen
from algos.clip import ClipState, ClipToData, action_range
from experiments.cli import main
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from experiments.host_loop import evaluate_gym
from policies.base import Candidates
from verifiers.registry import make_verifier


def test_action_range_known_answer():
    chunks = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 3), np.float32)
    low, high = action_range(chunks, 0.0)
    np.testing.assert_array_equal(low, 0.0)
    np.testing.assert_array_equal(high, 4.0)
    low, high = action_range(chunks, 0.25)  # linear interpolation over 0..4: 1 and 3
    np.testing.assert_array_equal(low, 1.0)
    np.testing.assert_array_equal(high, 3.0)


def test_clip_acts_on_the_chosen_candidate_only():
    actions = jnp.asarray([[[0.9, -0.9]], [[0.2, -0.2]]], jnp.float32)  # [M=2, H=1, A=2]
    cands = Candidates(actions=actions, features=jnp.zeros((2, 1)))
    state = ClipState(low=jnp.asarray([[-0.5, -0.5]]), high=jnp.asarray([[0.5, 0.5]]))
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(ClipToData(state).act(state, {}, None, cands, 0, key),
                                  [[0.5, -0.5]])
    np.testing.assert_array_equal(ClipToData(state).act(state, {}, None, cands, 1, key),
                                  actions[1])
    np.testing.assert_array_equal(ExecuteChosen().act(None, {}, None, cands, 0, key),
                                  actions[0])


def _setup(env, policy, adapter):
    return Setup(env=env, policy=policy, verifier=make_verifier("random"),
                 cfg=EvalConfig(M=3, episodes=6, replan=2, timing_decisions=0,
                                annotate_oracle=False, classify_modes=False),
                 adapter=adapter)


def _clip(low: float, high: float, policy) -> ClipToData:
    shape = (policy.horizon, policy.action_dim)
    return ClipToData(ClipState(jnp.full(shape, low), jnp.full(shape, high)))


def test_the_hook_changes_what_is_executed(tiny):
    """A range that contains every action executes exactly what no adapter executes (the hook
    changed no key); a zero range executes zero motion, in the compiled harness and the gym
    loop alike (the adapter's state reaches both)."""
    env, policy, params = tiny
    plain = evaluate_compiled(_setup(env, policy, ExecuteChosen()), params, None)
    wide = _clip(-1e9, 1e9, policy)
    same = evaluate_compiled(_setup(env, policy, wide), params, None, wide.state)
    jax.tree.map(np.testing.assert_array_equal, plain, same)

    frozen = _clip(0.0, 0.0, policy)
    setup = _setup(env, policy, frozen)
    still = evaluate_compiled(setup, params, None, frozen.state)
    assert not still["success"].any()
    assert not np.array_equal(still["progress"], plain["progress"])
    looped = evaluate_gym(setup, envs.TabletopGymEnv(task="reach", max_steps=12), params, None,
                          frozen.state)
    np.testing.assert_array_equal(still["success"], looped["success"])
    np.testing.assert_allclose(still["progress"], looped["progress"], atol=1e-5)


FAST_BASE = {
    "task": "reach",
    "demos": {"episodes": 6},
    "reproduction": {"episodes": 0},
    "policy": {"steps": 10, "steps_per_call": 10, "eval_episodes": 0, "checkpoint_every": 10,
               "heldout_every": 10,
               "flow": {"width": 32, "depth": 1, "heads": 2, "expert_width": 16,
                        "expert_heads": 2, "num_steps": 2, "horizon": 4}},
    "eval": {"M": 2, "episodes": 4, "max_steps": 12, "timing_decisions": 0},
}


@pytest.mark.slow
def test_adapt_command_and_grid_stage(tmp_path, capsys):
    """``steerlab adapt`` and the grid's adapter stage work for a registered adapter with no
    per-name code: the grid fits clip_to_data once, notes that none and the test-time learner
    ttvla have nothing to fit, and trains the policy once for all three."""
    from experiments.config import RunConfig
    from experiments.grid import run_grid
    from experiments.pipeline import STAGES

    spec = {"name": "adapters", "base": FAST_BASE,
            "axes": {"adapter.name": ["none", "clip_to_data", "ttvla"]}}
    table = run_grid(spec, tmp_path / "grid", STAGES, RunConfig)
    assert (table["status"] == "done").all() and len(table) == 3
    stages = tmp_path / "grid" / "stages"
    assert len([p for p in (stages / "policy").iterdir() if p.is_dir()]) == 1
    fitted = [p.name for p in (stages / "adapter").glob("*/*") if p.is_dir()]
    assert sorted(fitted) == ["fitted"]
    assert len(list((stages / "adapter").glob("*/NOT_FITTED"))) == 2
    results = [json.loads(p.read_text()) for p in (tmp_path / "grid").glob("cells/*/result.json")]
    assert sorted("adapter_dir" in r for r in results) == [False, False, True]

    policy = next(p for p in (stages / "policy").iterdir() if p.is_dir()) / "run"
    out = tmp_path / "clip"
    assert main(["adapt", "clip_to_data", "--policy", str(policy), "--out", str(out),
                 "quantile=0.1"]) == 0
    fit = json.loads((out / "range.json").read_text())
    assert np.all(np.asarray(fit["low"]) <= np.asarray(fit["high"]))
    assert main(["eval", "--out", str(tmp_path / "eval"), f"policy_dir={policy}",
                 f"adapter_dir={out}", "adapter.name=clip_to_data",
                 "adapter.clip_to_data.quantile=0.1", "task=reach", "eval.episodes=2",
                 "eval.max_steps=12", "eval.timing_decisions=0"]) == 0
    # the fitted range and the run's options must agree
    assert main(["eval", "--out", str(tmp_path / "eval2"), f"policy_dir={policy}",
                 f"adapter_dir={out}", "adapter.name=clip_to_data", "task=reach",
                 "eval.episodes=2", "eval.timing_decisions=0"]) == 2
    assert main(["adapt", "none", "--policy", str(policy), "--out", str(tmp_path / "x")]) == 2
    assert "untrainable" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert pd.read_parquet(tmp_path / "grid" / "results.parquet")["adapter.name"].nunique() == 3

    # a test-time learner: deployed with and without learning on the same episodes
    tt = ["adapt", "ttvla", "--policy", str(policy), "--out", str(tmp_path / "tt"), "task=reach",
          "eval.episodes=4", "eval.max_steps=12", "eval.replan=2", "eval.timing_decisions=0",
          "interval=2"]
    assert main(tt) == 0
    comparison = json.loads((tmp_path / "tt" / "comparison.json").read_text())
    assert comparison["mcnemar"]["n"] == 4
    assert len(comparison["curves"]["adapted"]) == len(comparison["curves"]["frozen"]) == 6
    assert comparison["learner"]["learner_updates_per_episode"] > 0
    assert (tmp_path / "tt" / "adaptation.png").is_file()
    capsys.readouterr()
    assert main(tt) == 0  # resumes: both arms are kept
    assert capsys.readouterr().out.count("[adapt] ") == 3
    # continual on a shifted variant: the streams' final adapters are checked back on nominal
    cont = [*tt[:5], str(tmp_path / "tc"), *tt[6:], "reset=continual", "streams=2",
            "variant=dynamics"]
    assert main(cont) == 0
    comparison = json.loads((tmp_path / "tc" / "comparison.json").read_text())
    assert comparison["mcnemar_after_nominal"]["n"] == 4
    assert set(comparison["stream_halves"]) == {"adapted", "frozen"}
    with np.load(tmp_path / "tc" / "adapted" / "adapters.npz") as saved:
        assert saved["up"].shape[0] == 4  # the adapter after each episode
    after = json.loads((tmp_path / "tc" / "after_nominal" / "result.json").read_text())
    assert after["metrics"]["learner_updates_per_episode"] == 0  # deployed, not learning
    capsys.readouterr()
    assert main(cont) == 0
    assert capsys.readouterr().out.count(": kept ") == 4

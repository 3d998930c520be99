"""The ManiSkill3 suite (``envs.maniskill``): its environments' observation dict and info, paired
resets, bad input, and the harness through the batched host driver (``steerlab eval
suite=maniskill``). Needs the maniskill extra and a Vulkan driver (``make setup-maniskill``);
CI installs both, so there a missing one fails instead of skipping."""

import json
import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.maniskill


@pytest.fixture(scope="module")
def suite_env():
    try:
        import mani_skill  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the maniskill extra is not installed (make setup-maniskill)")
    from envs.maniskill import make

    return make("PickCube-v1")


def test_observation_info_and_paired_resets(suite_env):
    spec = suite_env.spec
    assert (spec.state_dim, spec.action_dim, spec.max_steps) == (42, 7, 150)
    env = suite_env.factory()
    try:
        obs, info = env.reset(options={"key": jax.random.PRNGKey(3)})
        assert obs["state"].shape == (42,) and obs["state"].dtype == np.float32
        assert obs["instruction"].shape == (spec.instruction_len,) and obs["instruction"][0] > 0
        assert int(obs["task_id"]) == 0 and float(obs["time"]) == 0.0
        assert 0.0 <= info["progress"] <= 1.0 and info["success"] is False
        example = spec.example_obs()  # what verifiers are sized from (no functional reset here)
        assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in example.items()} == \
            {k: (np.shape(v), np.asarray(v).dtype) for k, v in obs.items()}
        again, _ = env.reset(options={"key": jax.random.PRNGKey(3)})
        np.testing.assert_array_equal(obs["state"], again["state"])  # the same initial state
        other, _ = env.reset(options={"key": jax.random.PRNGKey(4)})
        assert not np.array_equal(obs["state"], other["state"])
        for _ in range(3):
            moved, reward, terminated, truncated, info = env.step(np.full(7, 0.5))
            assert reward == info["progress"] and not truncated
        assert float(moved["time"]) == pytest.approx(3 / 150)
        assert not np.array_equal(moved["state"], other["state"])  # the robot moved
        env.step(np.array([np.nan, 0, 0, 0, 0, 0, 0]))
        assert env.step(np.zeros(7))[4]["nonfinite_actions"] == 1
        with pytest.raises(ValueError, match=r"action must have shape \(7,\)"):
            env.step(np.zeros(3))
    finally:
        env.close()


def test_bad_input_is_named(suite_env):
    from envs.maniskill import make

    with pytest.raises(ValueError, match="task must be one of"):
        make("OpenDoor-v9")
    with pytest.raises(ValueError, match="control_mode must be one of"):
        make("PickCube-v1", control_mode="torque")


def test_the_simulator_oracle_restores_the_state(suite_env):
    """``rollout_chunks`` (oracle_sim on the host): a chunk's score is what executing it gives,
    and the env goes on from the state it was in (PhysX restores to about 1e-6)."""
    from envs.maniskill import ManiSkillGymEnv

    a, b = ManiSkillGymEnv("PickCube-v1"), ManiSkillGymEnv("PickCube-v1")
    try:
        a.reset(seed=3)
        b.reset(seed=3)
        chunks = np.random.default_rng(0).uniform(-1, 1, (3, 4, 7)).astype(np.float32)
        scores = a.rollout_chunks(chunks, success_bonus=1.0)
        assert scores.shape == (3,) and len(set(scores.tolist())) == 3
        for action in chunks[1]:
            got = a.step(action)
            want = b.step(action)
        np.testing.assert_allclose(got[0]["state"], want[0]["state"], atol=1e-4)
        assert got[1] == pytest.approx(scores[1], abs=1e-4) and got[0]["time"] == want[0]["time"]
    finally:
        a.close()
        b.close()


def test_camera_observations_and_the_benchmark(suite_env):
    """image=True adds the camera's RGB frame and leaves the state and the physics as they are
    without it; the benchmark reports both kinds per task."""
    from envs.maniskill import ManiSkillGymEnv, bench, make

    assert make("PickCube-v1", image=True).spec.image and not suite_env.spec.image
    plain, seen = ManiSkillGymEnv("PickCube-v1"), ManiSkillGymEnv("PickCube-v1", image=True)
    try:
        a, _ = plain.reset(seed=5)
        b, _ = seen.reset(seed=5)
        assert "image" not in a and b["image"].shape == (128, 128, 3)
        assert b["image"].dtype == np.uint8 and b["image"].std() > 5  # a scene, not a blank
        for _ in range(2):
            a = plain.step(np.full(7, 0.3))[0]
            b = seen.step(np.full(7, 0.3))[0]
        np.testing.assert_array_equal(a["state"], b["state"])
    finally:
        plain.close()
        seen.close()
    figures = bench(tasks=("PushCube-v1",), steps=5)["tasks"]["PushCube-v1"]
    assert figures["image"]["obs"]["image"] == [128, 128, 3]
    assert figures["state"]["steps_per_s"] > 0 and figures["image"]["steps_per_s"] > 0


def test_the_harness_through_the_host_driver(suite_env, tmp_path):
    """A tiny untrained flow policy sized from the suite's spec: ``steerlab eval
    suite=maniskill`` runs it on host-stepped environments, and a second run of the same
    episodes repeats them exactly (paired initial states, same keys); the simulator oracle and
    a test-time learner run there too."""
    from experiments.cli import main
    from policies import FlowConfig, example_obs, make_policy, save_policy

    cfg = FlowConfig(width=32, depth=1, heads=2, expert_width=16, expert_heads=2, num_steps=2,
                     horizon=4).with_spec(suite_env.spec)
    policy = make_policy("flow", cfg)
    save_policy(str(tmp_path / "policy"), policy,
                policy.init(jax.random.PRNGKey(0), example_obs(cfg)))
    results = []
    for run in ("a", "b"):
        args = ["eval", "--out", str(tmp_path / run), f"policy_dir={tmp_path / 'policy'}",
                "suite=maniskill", "task=PickCube-v1", "eval.M=2", "eval.episodes=3",
                "eval.max_steps=8", "eval.replan=2", "eval.host_envs=2",
                "verifier.name=consensus"]
        assert main(args) == 0
        results.append([json.loads(line) for line in
                        (tmp_path / run / "episodes.jsonl").read_text().splitlines()])
    assert [r["length"] for r in results[0]] == [8, 8, 8]  # an untrained policy: time limit
    assert all(0.0 <= r["progress"] <= 1.0 for r in results[0])
    assert results[0] == results[1]
    oracle = ["eval", "--out", str(tmp_path / "oracle"), f"policy_dir={tmp_path / 'policy'}",
              "suite=maniskill", "task=PickCube-v1", "eval.M=3", "eval.episodes=2",
              "eval.max_steps=8", "eval.replan=2", "verifier.name=oracle_sim"]
    assert main(oracle) == 0
    learner = ["eval", "--out", str(tmp_path / "ttvla"), f"policy_dir={tmp_path / 'policy'}",
               "suite=maniskill", "task=PickCube-v1", "eval.M=2", "eval.episodes=2",
               "eval.max_steps=8", "eval.replan=2", "adapter.name=ttvla",
               "adapter.ttvla.interval=2"]
    assert main(learner) == 0
    metrics = json.loads((tmp_path / "ttvla" / "result.json").read_text())["metrics"]
    assert metrics["learner_updates_per_episode"] == 1.0  # decisions 0-3: one update, at 2


def test_motion_planned_demonstrations_and_a_policy_sized_from_them(suite_env, tmp_path):
    """``steerlab demos --suite maniskill``: π* alone (the motion-planning solution, replayed
    in the policy's control mode) succeeds; a mixture records its modes per step; the dataset
    loads and a policy trains on it, sized from the suite's spec."""
    from envs.dataset import load_demos
    from experiments.cli import main
    from policies import load_policy

    assert main(["demos", "--suite", "maniskill", "--task", "PickCube-v1", "--episodes", "3",
                 "--mix", "optimal=1", "--out", str(tmp_path / "pi_star")]) == 0
    pi_star = load_demos(str(tmp_path / "pi_star"))
    assert pi_star.episodes["success"].all() and (pi_star.steps["mode"] == 0).all()
    assert main(["demos", "--suite", "maniskill", "--task", "PickCube-v1", "--episodes", "4",
                 "--seed", "1", "--mix", "optimal=0.5,hesitant=0.5", "--out",
                 str(tmp_path / "mix")]) == 0
    mix = load_demos(str(tmp_path / "mix"))
    assert set(np.unique(mix.steps["mode"])) == {0, 1}
    assert mix.manifest["modes"] == ["optimal", "hesitant", "noisy", "release"]
    assert mix.steps["action"].shape[1] == 7 and np.abs(mix.steps["action"]).max() <= 1.0
    np.testing.assert_array_equal(mix.steps["decision"], mix.steps["t"] % 4 == 0)
    assert main(["train-policy", "--out", str(tmp_path / "policy"), "suite=maniskill",
                 "tasks=[PickCube-v1]", f"datasets=[{tmp_path / 'mix'}]", "steps=4",
                 "steps_per_call=2", "log_every=2", "checkpoint_every=4", "heldout_every=0",
                 "policy=flow", "flow.width=32", "flow.depth=1", "flow.heads=2",
                 "flow.expert_width=16", "flow.expert_heads=2", "flow.num_steps=2",
                 "flow.horizon=4"]) == 0
    policy, _ = load_policy(str(tmp_path / "policy"))
    assert (policy.cfg.state_dim, policy.cfg.action_dim) == (42, 7)


def test_demonstration_input_is_checked(monkeypatch, tmp_path):
    from envs.maniskill_demos import mp_python, parse_mix

    with pytest.raises(ValueError, match="unknown modes"):
        parse_mix("optimal=0.5,wobbly=0.5")
    with pytest.raises(ValueError, match="neither a mixture name"):
        parse_mix("counter_premise")
    assert parse_mix("premise")["optimal"] == pytest.approx(0.7)
    monkeypatch.setenv("STEERLAB_MP_PYTHON", str(tmp_path / "no_python"))
    with pytest.raises(FileNotFoundError, match="make setup-maniskill"):
        mp_python()


def test_a_grid_runs_every_stage_on_the_suite(suite_env, tmp_path):
    """The grid pipeline on suite maniskill: motion-planned demonstrations, a normalised
    policy, a fitted verifier and a test-time learner, evaluated on the same episodes."""
    from experiments.config import RunConfig
    from experiments.grid import run_grid
    from experiments.pipeline import STAGES

    tiny = {"width": 32, "depth": 1, "heads": 2, "expert_width": 16, "expert_heads": 2,
            "num_steps": 2, "horizon": 4}
    spec = {"name": "ms", "base": {
        "suite": "maniskill", "task": "PickCube-v1", "demos": {"episodes": 2},
        "policy": {"steps": 4, "steps_per_call": 2, "checkpoint_every": 4, "normalize": True,
                   "heldout": 0.0, "flow": tiny},
        "eval": {"episodes": 2, "max_steps": 8, "replan": 2, "M": 2},
        "adapter": {"ttvla": {"interval": 2}}},
        "zip": [{"verifier.name": ["random", "knn", "random"],
                 "adapter.name": ["none", "none", "ttvla"]}]}
    table = run_grid(spec, tmp_path / "grid", STAGES, RunConfig)
    assert len(table) == 3 and (table["status"] == "done").all(), table.get("error")
    assert table["metrics.episodes"].tolist() == [2, 2, 2]
    assert table["metrics.learner_updates_per_episode"].iloc[2] == 1.0
    policies = list((tmp_path / "grid").glob("stages/policy/*/run/policy/policy.json"))
    assert len(policies) == 1  # trained once for the three cells
    flow = json.loads(policies[0].read_text())["config"]
    assert len(flow["state_mean"]) == 42 and len(flow["action_std"]) == 7

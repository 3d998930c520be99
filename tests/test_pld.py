"""PLD: the xi schedule, the residual's composition on the executed steps, per-decision
transitions from episode records (known rewards, terminals and Monte-Carlo returns), collection
reproducing the harness's M = 1 episodes, the Learn stage's probe lengths, takeover and dataset
(known rows; replayed in the env), distillation starting from the base, and a tiny end-to-end
fit that the harness evaluates through ``adapter.name=pld`` and that resumes."""

import json
import os
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algos.base import BuildContext, ExecuteChosen
from algos.pld import (
    EVAL_SEED,
    PLDConfig,
    PLDState,
    ResidualAdapter,
    _distill,
    _setup,
    apply_residual,
    collect,
    hybrid_steps,
    probe_lengths,
    residual_obs,
    to_transitions,
    xi_at,
)
from algos.registry import get_adapter_plugin
from algos.sac import ResidualActor, SACConfig
from envs.dataset import load_demos, save_dataset
from envs.rollout import episode_keys, num_decisions, split_episode_key
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from verifiers.registry import make_verifier

REPLAN = 2


def test_xi_schedule_ramps_linearly_then_holds():
    cfg = PLDConfig(xi=0.5, xi_ramp_episodes=100)
    assert [xi_at(cfg, e) for e in (0, 25, 100, 400)] == [0.0, 0.125, 0.5, 0.5]
    assert xi_at(replace(cfg, xi_ramp_episodes=0), 0) == 0.5


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="adapter.pld.xi "):
        PLDConfig(xi=-0.1).validate()
    with pytest.raises(ValueError, match="adapter.pld.sac.utd"):
        PLDConfig(sac=SACConfig(utd=0)).validate()
    with pytest.raises(ValueError, match="adapter.pld.envs_per_round"):
        PLDConfig(envs_per_round=0).validate()


def test_to_transitions_known_rewards_terminals_and_returns():
    # episode 0 succeeds at its third decision (the fourth is after the end); episode 1 runs
    # out of time without success
    alive = jnp.array([[True, True, True, False], [True, True, True, True]])
    obs = {"state": jnp.arange(8.0).reshape(2, 4, 1)}
    recs = {"alive": alive, "obs": obs, "base": jnp.zeros((2, 4, 1)),
            "action": jnp.ones((2, 4, 1))}
    tr, valid = to_transitions(recs, jnp.array([True, False]), 0.9)
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(tr["reward"], [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tr["done"][valid], [0, 0, 1, 0, 0, 0, 1])
    np.testing.assert_allclose(tr["mc"][:3], [0.81, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(tr["mc"][4:], 0.0)
    np.testing.assert_array_equal(tr["next_obs"]["state"][:, 0], [1, 2, 3, 3, 5, 6, 7, 7])
    np.testing.assert_allclose(tr["discount"], 0.9)


def _actor(action_dim: int = 2):
    return ResidualActor((16,), REPLAN * action_dim, 0, 4, True)


def _perturbed(params, key):
    """A residual whose mean is not zero (a fresh one executes the base)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys, strict=True)])


def _acting_residual(env, seed: int):
    """(actor, params) of a residual whose mean is not zero, for ``env``."""
    actor = _actor(env.spec.action_dim)
    _, obs = env.reset(jax.random.PRNGKey(0))
    params = actor.init(jax.random.PRNGKey(2), residual_obs(obs),
                        jnp.zeros(REPLAN * env.spec.action_dim))["params"]
    return actor, _perturbed(params, jax.random.PRNGKey(seed))


def test_a_fresh_residual_executes_the_base():
    actor = _actor()
    obs = {"state": jnp.ones(3), "time": jnp.float32(0.5)}
    params = actor.init(jax.random.PRNGKey(0), obs, jnp.zeros(REPLAN * 2))["params"]
    chunk = jnp.linspace(-0.9, 0.9, 8).reshape(4, 2)
    out = apply_residual(actor, params, obs, chunk, REPLAN, 0.5, jax.random.PRNGKey(1), 0.0)[0]
    np.testing.assert_array_equal(out, chunk)


def test_the_residual_changes_only_the_executed_steps_and_clips():
    actor = _actor()
    obs = {"state": jnp.ones(3), "time": jnp.float32(0.5)}
    params = _perturbed(actor.init(jax.random.PRNGKey(0), obs, jnp.zeros(REPLAN * 2))["params"],
                        jax.random.PRNGKey(3))
    chunk = jnp.full((4, 2), 0.9)
    key = jax.random.PRNGKey(1)
    out, base, executed = apply_residual(actor, params, obs, chunk, REPLAN, 0.0, key, 1.0)
    np.testing.assert_array_equal(out, chunk)  # xi = 0: the base
    out, base, executed = apply_residual(actor, params, obs, chunk, REPLAN, 2.0, key, 1.0)
    np.testing.assert_array_equal(out[REPLAN:], chunk[REPLAN:])
    np.testing.assert_array_equal(out[:REPLAN].reshape(-1), executed)
    assert float(jnp.max(jnp.abs(executed))) <= 1.0
    np.testing.assert_array_equal(base, chunk[:REPLAN].reshape(-1))
    # noise 0 is the mean: the same action under any key
    a = apply_residual(actor, params, obs, chunk, REPLAN, 0.5, key, 0.0)[2]
    b = apply_residual(actor, params, obs, chunk, REPLAN, 0.5, jax.random.PRNGKey(9), 0.0)[2]
    np.testing.assert_array_equal(a, b)


def _harness(env, policy, adapter, episodes):
    return Setup(env=env, policy=policy, verifier=make_verifier("random"),
                 cfg=EvalConfig(M=1, episodes=episodes, replan=REPLAN, timing_decisions=0,
                                annotate_oracle=False, classify_modes=False), adapter=adapter)


def test_collection_reproduces_the_harness_episodes(tiny):
    env, policy, pparams = tiny
    actor, aparams = _acting_residual(env, 4)
    keys = episode_keys(1000, 6)  # the harness's evaluation seed
    dec = num_decisions(12, REPLAN)
    progress = []
    for xi, adapter in ((0.0, ExecuteChosen()),
                        (0.7, ResidualAdapter(actor, REPLAN, PLDState(aparams, 0.7)))):
        _, valid, stats = collect(env, policy, actor, REPLAN, dec, 0.99, pparams, aparams, xi,
                                  0.0, keys)
        rec = evaluate_compiled(_harness(env, policy, adapter, 6), pparams, None,
                                adapter.state)
        np.testing.assert_array_equal(stats["progress"], rec["progress"])
        np.testing.assert_array_equal(stats["steps"], rec["length"])
        progress.append(np.asarray(stats["progress"]))
    assert not np.array_equal(*progress)  # the residual did act
    assert int(valid.sum()) == int(np.sum(np.ceil(rec["length"] / REPLAN)))


@pytest.mark.slow
def test_a_tiny_fit_is_built_and_evaluated_by_the_harness(tiny, tmp_path):
    env, policy, pparams = tiny
    plugin = get_adapter_plugin("pld")
    sac = SACConfig(hidden=(16,), actor_hidden=(16,), num_critics=2, batch_size=8, utd=2)
    cfg = PLDConfig(sac=sac, offline_episodes=8, pretrain_steps=4, warmup_episodes=4,
                    online_episodes=8, envs_per_round=4, updates_per_episode=1,
                    buffer_capacity=256, eval_episodes=4, eval_every=1, learn_episodes=8,
                    distill_steps=2)
    ctx = BuildContext(env=env, policy=policy, replan=REPLAN)
    plugin.fit(cfg, ctx, pparams, None, jax.random.PRNGKey(0), str(tmp_path))
    learn = load_demos(str(tmp_path / "learn")).manifest
    assert learn["collected"]["episodes"] == 8
    # the untrained base never succeeds: nothing is kept, and distillation says so
    assert learn["counts"]["episodes"] == learn["collected"]["successes"] == 0
    assert "skipped" in json.load(open(tmp_path / "distill.json"))
    # a rerun finds every stage finished; another config is refused
    stamp = os.path.getmtime(tmp_path / "curve.json")
    plugin.fit(cfg, ctx, pparams, None, jax.random.PRNGKey(0), str(tmp_path))
    assert os.path.getmtime(tmp_path / "curve.json") == stamp
    with pytest.raises(ValueError, match="another config"):
        plugin.fit(replace(cfg, xi=0.3), ctx, pparams, None, jax.random.PRNGKey(0),
                   str(tmp_path))
    curve = json.load(open(tmp_path / "curve.json"))["curve"]
    assert [c["episodes"] for c in curve] == [0, 4, 8]
    assert all(0.0 <= c["success"] <= 1.0 for c in curve)
    assert curve[0]["action_shift"] == 0.0  # the fresh residual executes the base
    assert curve[-1]["action_shift"] > 0.0
    assert curve[-1]["env_steps"] > curve[0]["env_steps"]
    adapter = plugin.build(cfg, replace(ctx, fitted_dir=str(tmp_path)))
    assert os.path.isdir(tmp_path / "actor")
    rec = evaluate_compiled(_harness(env, policy, adapter, 4), pparams, None, adapter.state)
    assert float(np.mean(rec["success"])) == pytest.approx(curve[-1]["success"])
    with pytest.raises(ValueError, match="eval.replan"):
        plugin.build(cfg, BuildContext(env=env, policy=policy, replan=REPLAN + 1,
                                       fitted_dir=str(tmp_path)))


def test_probe_lengths_are_uniform_on_zero_to_alpha_T():
    n, T = 33_000, 54  # floor(0.6 T) = 32: 33 values, 1000 draws each expected
    lengths = np.asarray(probe_lengths(jax.random.PRNGKey(0), n, 0.6, T))
    assert lengths.min() == 0 and lengths.max() == 32
    counts = np.bincount(lengths, minlength=33)
    assert np.all(np.abs(counts - 1000) < 160)  # 5 binomial standard deviations
    assert np.all(np.asarray(probe_lengths(jax.random.PRNGKey(1), 100, 0.0, T)) == 0)


def test_takeover_lets_the_base_act_alone_until_then_and_probe_decisions_are_not_replayed(tiny):
    env, policy, pparams = tiny
    actor, aparams = _acting_residual(env, 5)
    keys = episode_keys(7, 4)
    dec = num_decisions(12, REPLAN)
    run = lambda xi, start: collect(env, policy, actor, REPLAN, dec, 0.99, pparams,  # noqa: E731
                                    aparams, xi, 0.0, keys, start, True)
    base, never = run(0.0, None), run(0.7, jnp.full(4, 100, jnp.int32))
    np.testing.assert_array_equal(base[0]["action"], never[0]["action"])
    assert not never[1].any()  # every decision was a probe: none is replayed
    # T_base = 3 rounds up to the decision starting at t = 4: two probe decisions, then the
    # residual (its actions differ from the base's from there)
    mid = run(0.7, jnp.full(4, 3, jnp.int32))
    probing = np.asarray(mid[2]["steps_record"]["probing"])
    np.testing.assert_array_equal(probing[:, :3], [[True, True, False]] * 4)
    a_base = np.asarray(base[2]["steps_record"]["action"])
    a_mid = np.asarray(mid[2]["steps_record"]["action"])
    np.testing.assert_array_equal(a_mid[:, :2], a_base[:, :2])
    assert not np.array_equal(a_mid[:, 2], a_base[:, 2])
    alive = np.asarray(mid[2]["steps_record"]["alive"])
    np.testing.assert_array_equal(np.asarray(mid[1]).reshape(4, -1), alive & ~probing)


def test_hybrid_steps_known_rows():
    # 3 episodes x 2 decisions x 2 steps, 1-D actions: episode 0 succeeds at t = 3 after a
    # probe decision, episode 1 at t = 1 (its second decision is after the end), episode 2
    # fails (time limit) and is dropped
    F, T = False, True
    recs = {
        "alive": np.array([[T, T], [T, F], [T, T]]),
        "probing": np.array([[T, F], [F, F], [F, F]]),
        "step_obs": {"state": np.array([[0, 10], [100, 110], [200, 210]], np.float32)[..., None]},
        "action": np.arange(12, dtype=np.float32).reshape(3, 2, 2),
        "probe": {
            "obs": {"state": np.array([[[1, 2], [11, 12]], [[101, 102], [111, 112]],
                                       [[201, 202], [211, 212]]], np.float32)[..., None]},
            "done": np.array([[[F, F], [F, T]], [[F, T], [T, T]], [[F, F], [F, T]]]),
            "success": np.array([[[F, F], [F, T]], [[F, T], [T, T]], [[F, F], [F, F]]]),
            "progress": np.full((3, 2, 2), 0.5, np.float32),
            "wrong_block": np.array([[[F, F], [F, F]], [[T, F], [F, F]], [[F, F], [F, F]]]),
        },
    }
    steps, eps = hybrid_steps(recs, np.array([T, T, F]), 1, 3)
    np.testing.assert_array_equal(steps["state"][:, 0], [0, 1, 10, 11, 100, 101])
    np.testing.assert_array_equal(steps["action"][:, 0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(steps["episode"], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(steps["t"], [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(steps["decision"], [T, F, T, F, T, F])
    np.testing.assert_array_equal(steps["probe"], [T, T, F, F, F, F])
    np.testing.assert_array_equal(steps["reward"], [0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(steps["done"], [F, F, F, T, F, T])
    np.testing.assert_array_equal(steps["mode"], -1)
    assert steps["mode_label"].shape == (6, 3)
    np.testing.assert_array_equal(eps["length"], [4, 2])
    np.testing.assert_array_equal(eps["wrong_block"], [F, T])


@pytest.fixture(scope="module")
def recorded(tiny, tmp_path_factory):
    """Hybrid episodes of the tiny policy written as a dataset (every episode kept, as if all
    had succeeded: the untrained policy succeeds in none)."""
    env, policy, pparams = tiny
    actor, aparams = _acting_residual(env, 6)
    keys = episode_keys(11, 5)
    starts = jnp.array([0, 3, 5, 12, 2], jnp.int32)
    _, _, stats = collect(env, policy, actor, REPLAN, num_decisions(12, REPLAN), 0.99, pparams,
                          aparams, 0.6, 1.0, keys, starts, True)
    steps, eps = hybrid_steps(stats["steps_record"], np.ones(5, bool), env.spec.action_dim, 2)
    path = str(tmp_path_factory.mktemp("learn") / "learn")
    save_dataset(path, steps, eps, {"task": "reach", "variant": "nominal", "mix": {},
                                    "max_steps": 12, "image": False})
    return path, keys, np.asarray(stats["steps"])


def test_the_learn_dataset_replays_in_the_env(tiny, recorded):
    env, _, _ = tiny
    path, keys, lengths = recorded
    data = load_demos(path)
    np.testing.assert_array_equal(data.episodes["length"], lengths)
    for i, rows in enumerate(data.episode_slices):
        state, obs = env.reset(split_episode_key(keys[i], num_decisions(12, REPLAN))[0])
        for row in range(rows.start, rows.stop):
            np.testing.assert_allclose(obs["state"], data.steps["state"][row], atol=1e-6)
            assert int(state.t) == int(data.steps["t"][row])
            state, obs, _, _, _ = env.step(state, jnp.asarray(data.steps["action"][row]))
        assert bool(state.done)
    assert data.chunks(4)["actions"].shape == (data.num_steps, 4, env.spec.action_dim)
    # the probe marks the steps before each episode's takeover (rounded up to a decision)
    np.testing.assert_array_equal(
        data.steps["probe"], data.steps["t"] < np.array([0, 4, 6, 12, 2])[data.steps["episode"]])


@pytest.mark.slow
def test_distillation_starts_from_the_base(tiny, recorded, tmp_path):
    # at a vanishing learning rate the distilled base is the base: the same M = 1 episodes
    env, policy, pparams = tiny
    cfg = PLDConfig(sac=SACConfig(hidden=(16,), actor_hidden=(16,)), eval_episodes=6,
                    distill_steps=2, distill_lr=1e-12)
    su = _setup(cfg, BuildContext(env=env, policy=policy, replan=REPLAN))
    out = _distill(cfg, su, pparams, None, recorded[0], str(tmp_path / "distill"),
                   jax.random.PRNGKey(0))
    assert out["eval_seed"] == EVAL_SEED and out["mcnemar"]["n"] == 6
    assert out["mcnemar"]["n10"] == out["mcnemar"]["n01"] == 0
    from algos.sft import load_config
    from policies.registry import load_policy

    _, distilled = load_policy(out["run_dir"])
    assert load_config(out["run_dir"]).datasets == (os.path.abspath(recorded[0]),)
    from experiments.reproduction import check_reproduction

    with pytest.raises(ValueError, match="no expert mode shares"):
        check_reproduction(out["run_dir"], recorded[0])
    for a, b in zip(jax.tree.leaves(distilled), jax.tree.leaves(pparams), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

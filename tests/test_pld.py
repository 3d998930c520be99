"""PLD's residual specialist: the xi schedule, the residual's composition on the executed steps,
per-decision transitions from episode records (known rewards, terminals and Monte-Carlo
returns), collection reproducing the harness's M = 1 episodes, and a tiny end-to-end fit that
the harness evaluates through ``adapter.name=pld``."""

import json
import os
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from algos.base import BuildContext, ExecuteChosen
from algos.pld import (
    OBS_KEYS,
    PLDConfig,
    PLDState,
    ResidualAdapter,
    apply_residual,
    collect,
    to_transitions,
    xi_at,
)
from algos.registry import get_adapter_plugin
from algos.sac import ResidualActor, SACConfig
from envs.rollout import episode_keys, num_decisions
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from policies import FlowConfig, example_obs, make_policy
from verifiers.registry import make_verifier

TINY = FlowConfig(width=32, depth=1, heads=2, expert_width=16, expert_heads=2, num_steps=2,
                  horizon=4)
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


def test_the_residual_changes_only_the_executed_steps_and_clips():
    actor = _actor()
    obs = {"state": jnp.ones(3), "time": jnp.float32(0.5)}
    params = actor.init(jax.random.PRNGKey(0), obs, jnp.zeros(REPLAN * 2))["params"]
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


@pytest.fixture(scope="module")
def tiny():
    env = envs.make("reach", max_steps=12)
    cfg = TINY.with_spec(env.spec)
    policy = make_policy("flow", cfg)
    return env, policy, policy.init(jax.random.PRNGKey(0), example_obs(cfg))


def _harness(env, policy, adapter, episodes):
    return Setup(env=env, policy=policy, verifier=make_verifier("random"),
                 cfg=EvalConfig(M=1, episodes=episodes, replan=REPLAN, timing_decisions=0,
                                annotate_oracle=False, classify_modes=False), adapter=adapter)


def test_collection_reproduces_the_harness_episodes(tiny):
    env, policy, pparams = tiny
    a_dim = env.spec.action_dim
    actor = _actor(a_dim)
    _, obs = env.reset(jax.random.PRNGKey(0))
    aparams = actor.init(jax.random.PRNGKey(2), {k: obs[k] for k in OBS_KEYS if k in obs},
                         jnp.zeros(REPLAN * a_dim))["params"]
    keys = episode_keys(1000, 6)  # the harness's evaluation seed
    dec = num_decisions(12, REPLAN)
    for xi, adapter in ((0.0, ExecuteChosen()),
                        (0.7, ResidualAdapter(actor, REPLAN, PLDState(aparams, 0.7)))):
        _, valid, stats = collect(env, policy, actor, REPLAN, dec, 0.99, pparams, aparams, xi,
                                  0.0, keys)
        rec = evaluate_compiled(_harness(env, policy, adapter, 6), pparams, None,
                                adapter.state)
        np.testing.assert_array_equal(stats["progress"], rec["progress"])
        np.testing.assert_array_equal(stats["steps"], rec["length"])
    assert int(valid.sum()) == int(np.sum(np.ceil(rec["length"] / REPLAN)))


@pytest.mark.slow
def test_a_tiny_fit_is_built_and_evaluated_by_the_harness(tiny, tmp_path):
    env, policy, pparams = tiny
    plugin = get_adapter_plugin("pld")
    sac = SACConfig(hidden=(16,), actor_hidden=(16,), num_critics=2, batch_size=8, utd=2)
    cfg = PLDConfig(sac=sac, offline_episodes=8, pretrain_steps=4, warmup_episodes=4,
                    online_episodes=8, envs_per_round=4, updates_per_episode=1,
                    buffer_capacity=256, eval_episodes=4, eval_every=1)
    ctx = BuildContext(env=env, policy=policy, replan=REPLAN)
    plugin.fit(cfg, ctx, pparams, None, jax.random.PRNGKey(0), str(tmp_path))
    curve = json.load(open(tmp_path / "curve.json"))["curve"]
    assert [c["episodes"] for c in curve] == [0, 4, 8]
    assert all(0.0 <= c["success"] <= 1.0 for c in curve)
    assert curve[-1]["env_steps"] > curve[0]["env_steps"]
    adapter = plugin.build(cfg, replace(ctx, fitted_dir=str(tmp_path)))
    assert os.path.isdir(tmp_path / "actor")
    rec = evaluate_compiled(_harness(env, policy, adapter, 4), pparams, None, adapter.state)
    assert float(np.mean(rec["success"])) == pytest.approx(curve[-1]["success"])
    with pytest.raises(ValueError, match="eval.replan"):
        plugin.build(cfg, BuildContext(env=env, policy=policy, replan=REPLAN + 1,
                                       fitted_dir=str(tmp_path)))

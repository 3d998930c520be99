"""Plugin contracts, checked for every registered verifier, adapter, policy and env suite: shapes,
``jit``, same key → same output, no retrace on a second call, and a tiny ``fit`` for learned
verifiers and adapters.
A new plugin is tested here by registering it; only ``TINY_FIT`` names one, with the options that
keep its tiny fit short."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from algos.bradley_terry import BTConfig
from algos.calql import CalQLConfig
from algos.registry import ADAPTERS
from algos.sac import SACConfig
from envs.dataset import load_demos
from envs.demos import write_demos
from policies import ARConfig, FlowConfig, load_policy, make_policy, save_policy
from policies.registry import POLICIES, example_obs
from verifiers.base import BuildContext
from verifiers.bradley_terry import JudgeConfig
from verifiers.registry import PLUGINS

KEY = jax.random.PRNGKey(0)
M = 5
TINY = {"flow": FlowConfig(width=32, depth=1, heads=2, expert_width=16, expert_heads=2,
                           num_steps=2, horizon=4),
        "autoregressive": ARConfig(width=32, depth=1, heads=2, horizon=4)}


def counted_jit(fn):
    """jit(fn) plus the number of times it was traced."""
    traces = []

    def traced(*args):
        traces.append(1)
        return fn(*args)

    return jax.jit(traced), traces


@pytest.fixture(scope="module")
def env():
    return envs.make("reach", image=False, max_steps=12)


@pytest.fixture(scope="module")
def policies(env):
    out = {}
    for name, cfg in TINY.items():
        cfg = cfg.with_spec(env.spec)
        policy = make_policy(name, cfg)
        out[name] = (policy, policy.init(KEY, example_obs(cfg)))
    return out


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "reach"
    write_demos("reach", 3, None, 0, str(path))
    return load_demos(str(path))


def test_every_policy_has_a_contract_config():
    assert set(TINY) == set(POLICIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_contract(name, policies, env, tmp_path):
    policy, params = policies[name]
    _, obs = env.reset(KEY)
    sample, traces = counted_jit(lambda p, o, k: policy.sample(p, policy.encode(p, o), k, M))
    c = sample(params, obs, KEY)
    assert c.actions.shape == (M, policy.horizon, policy.action_dim)
    assert c.features.shape == (M, policy.feature_dim)
    assert (c.log_prob is not None) == policy.has_log_prob
    if policy.has_log_prob:
        assert c.log_prob.shape == (M,)
    assert np.all(np.isfinite(c.actions)) and np.all(np.abs(c.actions) <= 1.0 + 1e-6)
    again = sample(params, obs, KEY)
    np.testing.assert_array_equal(c.actions, again.actions)
    assert len(traces) == 1
    other = sample(params, obs, jax.random.PRNGKey(1))
    assert not np.array_equal(c.actions, other.actions)
    # the artifact round trip: what SFT exports is what evaluation loads
    save_policy(str(tmp_path / "p"), policy, params)
    loaded, loaded_params = load_policy(str(tmp_path / "p"))
    assert loaded.cfg == policy.cfg
    np.testing.assert_array_equal(sample(loaded_params, obs, KEY).actions, c.actions)


@pytest.mark.parametrize("name", sorted(envs.SUITES))
def test_env_suite_contract(name):
    """A pure-JAX suite's functional reset/step, or a host-stepped suite's environments (what
    its ``factory`` makes: gymnasium's signature, reset by the episode key)."""
    suite = envs.get_suite(name)
    try:
        env = suite.make(suite.tasks[0], suite.variants[0], image=False, max_steps=8)
    except ImportError:
        if os.environ.get("CI"):  # CI installs every simulator extra
            raise
        pytest.skip(f"suite {name}'s optional extra is not installed")
    spec = env.spec
    if not suite.jittable:
        one = env.factory()
        try:
            obs, info = one.reset(options={"key": KEY})
            assert obs["state"].shape == (spec.state_dim,)
            assert obs["instruction"].shape == (spec.instruction_len,)
            assert {"success", "progress"} <= set(info)
            obs2, reward, terminated, truncated, info = one.step(np.zeros(spec.action_dim))
            assert {"success", "progress"} <= set(info) and isinstance(terminated, bool)
            np.testing.assert_array_equal(one.reset(options={"key": KEY})[0]["state"],
                                          obs["state"])
        finally:
            one.close()
        return
    reset, traces = counted_jit(env.reset)
    state, obs = reset(KEY)
    assert obs["state"].shape == (spec.state_dim,)
    assert obs["instruction"].shape == (spec.instruction_len,)
    step = jax.jit(env.step)
    action = jnp.zeros((spec.action_dim,))
    state2, obs2, reward, done, info = step(state, action)
    assert reward.shape == () and done.dtype == jnp.bool_
    assert {"success", "progress"} <= set(info)
    jax.tree.map(np.testing.assert_array_equal, reset(KEY), (state, obs))
    assert len(traces) == 1
    with pytest.raises(ValueError, match="task"):
        suite.validate("no-such-task", suite.variants[0])


def _context_and_obs(plugin, env, policy, fitted_dir):
    state, obs = env.reset(KEY)
    vobs = dict(obs)
    if "env_state" in plugin.requires:
        vobs["env_state"] = state
    if "expert_chunk" in plugin.requires:
        vobs["expert_chunk"] = envs.experts.expert_chunk(env, state, 0, KEY, policy.horizon)
    return BuildContext(env=env, policy=policy, replan=2, fitted_dir=fitted_dir), obs, vobs


# Fit options that keep a learner's tiny fit tiny (its defaults train for minutes). Cal-QL's
# fit takes the path the shipped grids use: the base policy's candidates in the conservative
# term (its own actor is covered by tests/test_calql.py).
TINY_FIT = {"calql": {"base_samples": 2, "learner": CalQLConfig(
    hidden=(16,), actor_hidden=(16,), batch_size=8, steps=4, updates_per_call=2, warmup=0,
    policy_samples="base", importance_sampling=False)},
    "bradley_terry": {"samples": 4, "representatives": 2, "states": 16, "heldout": 0.34,
                      "judge": JudgeConfig(width=16, depth=1, heads=2),
                      "learner": BTConfig(steps=4, updates_per_call=2, batch_size=8)},
    "pld": {"sac": SACConfig(hidden=(16,), actor_hidden=(16,), num_critics=2, batch_size=8,
                             utd=2),
            "offline_episodes": 4, "pretrain_steps": 2, "warmup_episodes": 2,
            "online_episodes": 2, "envs_per_round": 2, "updates_per_episode": 1,
            "buffer_capacity": 64, "eval_episodes": 2, "learn_episodes": 0}}


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_verifier_contract(name, policies, env, demos, tmp_path):
    plugin = PLUGINS[name]
    policy, params = policies["autoregressive" if "log_prob" in plugin.requires else "flow"]
    config = dataclasses.replace(plugin.config(), **TINY_FIT.get(name, {}))
    fitted = None
    if plugin.fit is not None:  # a tiny fit on three demonstrations
        fitted = str(tmp_path / "fitted")
        plugin.fit(config, BuildContext(env=env, policy=policy, replan=2), params, demos, KEY,
                   fitted)
    context, obs, vobs = _context_and_obs(plugin, env, policy, fitted)
    v = plugin.build(config, context)
    assert v.name == name and tuple(v.requires) == plugin.requires
    cands = policy.sample(params, policy.encode(params, obs), KEY, M)
    score, traces = counted_jit(lambda s, o, c, k: v.score(s, o, c, k))
    scores = score(v.state, vobs, cands, KEY)
    assert scores.shape == (M,) and scores.dtype == jnp.float32
    assert np.all(np.isfinite(scores))
    np.testing.assert_array_equal(scores, score(v.state, vobs, cands, KEY))
    assert len(traces) == 1
    if plugin.init is not None:  # the unfitted stand-in the benchmarks time has the same shapes
        stand_in = plugin.init(config, context, KEY)
        assert score(stand_in.state, vobs, cands, KEY).shape == (M,)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_contract(name, policies, env, demos, tmp_path):
    plugin = ADAPTERS[name]
    policy, params = policies["flow"]
    context = BuildContext(env=env, policy=policy, replan=2)
    config = dataclasses.replace(plugin.config(), **TINY_FIT.get(name, {}))
    if plugin.fit is not None:  # a tiny fit on three demonstrations
        plugin.fit(config, context, params, demos, KEY, str(tmp_path / "fitted"))
        context = BuildContext(env=env, policy=policy, replan=2,
                               fitted_dir=str(tmp_path / "fitted"))
    a = plugin.build(config, context)
    assert a.name == name
    _, obs = env.reset(KEY)
    encoded = policy.encode(params, obs)
    cands = policy.sample(params, encoded, KEY, M)
    act, traces = counted_jit(lambda s, o, c, x, i, k: a.act(s, o, c, x, i, k))
    chunk = act(a.state, obs, encoded, cands, jnp.int32(2), KEY)
    assert chunk.shape == (policy.horizon, policy.action_dim) and chunk.dtype == jnp.float32
    assert np.all(np.isfinite(chunk))
    np.testing.assert_array_equal(chunk, act(a.state, obs, encoded, cands, jnp.int32(2), KEY))
    act(a.state, obs, encoded, cands, jnp.int32(3), jax.random.PRNGKey(1))
    assert len(traces) == 1

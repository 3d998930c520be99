"""The batched host driver and host-loop evaluation: agreement with the compiled path, masking,
and worker failures surfacing as errors."""

import dataclasses
import functools
import time

import jax
import numpy as np
import pytest
from host_fixtures import CountingEnv, EarlyEndReach, RolloutReach

import envs
from algos.base import BuildContext
from envs.host import HostDriver
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from experiments.host_loop import evaluate_gym, evaluate_host
from policies import FlowConfig, example_obs, make_policy
from verifiers.registry import make_verifier

TINY = FlowConfig(width=32, depth=1, heads=2, expert_width=16, expert_heads=2, num_steps=2,
                  horizon=4)
REACH = functools.partial(envs.TabletopGymEnv, task="reach", variant="nominal", image=False,
                          max_steps=12)


@pytest.fixture(scope="module")
def setup_and_params():
    env = envs.make("reach", "nominal", image=False, max_steps=12)
    cfg = TINY.with_spec(env.spec)
    policy = make_policy("flow", cfg)
    params = policy.init(jax.random.PRNGKey(0), example_obs(cfg))
    eval_cfg = EvalConfig(M=2, episodes=6, replan=3, timing_decisions=0, annotate_oracle=False,
                          classify_modes=False)
    setup = Setup(env=env, policy=policy, verifier=make_verifier("random"), cfg=eval_cfg)
    return setup, params


@pytest.fixture(scope="module")
def compiled(setup_and_params):
    """The compiled evaluation, classifying modes so that it records the progress at every
    decision too (the host loop records it always)."""
    setup, params = setup_and_params
    classifying = dataclasses.replace(setup, expert=envs.experts,
                                      cfg=dataclasses.replace(setup.cfg, classify_modes=True))
    return evaluate_compiled(classifying, params, None)


def _assert_same(expected, got):
    if "decisions/progress" in expected:  # a learner's run, or one that classifies modes
        assert expected["decisions/progress"].shape == got["decisions/progress"].shape
        np.testing.assert_allclose(expected["decisions/progress"], got["decisions/progress"],
                                   atol=1e-5)
    np.testing.assert_array_equal(expected["success"], got["success"])
    np.testing.assert_array_equal(expected["length"], got["length"])
    np.testing.assert_array_equal(expected["nonfinite_actions"], got["nonfinite_actions"])
    np.testing.assert_allclose(expected["progress"], got["progress"], atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_host_loop_equals_compiled(setup_and_params, compiled, workers):
    """6 episodes through 4 envs (one full batch, one padded one) match the compiled path."""
    setup, params = setup_and_params
    with HostDriver(REACH, num_envs=4, workers=workers) as driver:
        got = evaluate_host(setup, driver, params, None)
    assert got["success"].shape == got["length"].shape == (6,)
    _assert_same(compiled, got)


def test_episodes_ending_mid_chunk_match_the_single_env_loop(setup_and_params):
    """Envs in one batch that stop at different steps (masked while the rest go on) give what
    ``evaluate_gym`` gives stepping one env at a time."""
    setup, params = setup_and_params
    factory = functools.partial(EarlyEndReach, image=False, max_steps=12)
    with HostDriver(factory, num_envs=4, workers=0) as driver:
        got = evaluate_host(setup, driver, params, None)
    expected = evaluate_gym(setup, factory(), params, None)
    assert len(set(expected["length"].tolist())) > 1
    _assert_same(expected, got)


def test_a_simulator_oracle_rolled_out_on_the_host_equals_the_compiled_one(setup_and_params):
    """oracle_sim on envs that keep their state to themselves: each env executes the
    decision's candidates from its state and restores it (``rollout_chunks``), and the episodes
    are the compiled oracle's, which copies the functional state."""
    setup, params = setup_and_params
    env = setup.env
    oracle = make_verifier("oracle_sim", BuildContext(env=env, replan=setup.cfg.replan))
    cfg = dataclasses.replace(setup.cfg, M=4)
    with_oracle = dataclasses.replace(setup, verifier=oracle, cfg=cfg)
    expected = evaluate_compiled(with_oracle, params, None)
    with HostDriver(functools.partial(RolloutReach, image=False, max_steps=12), num_envs=4,
                    workers=2) as driver:
        _assert_same(expected, evaluate_host(with_oracle, driver, params, None))
    random = evaluate_compiled(dataclasses.replace(setup, cfg=cfg), params, None)
    assert expected["progress"].mean() > random["progress"].mean()  # it did choose


def test_inactive_envs_are_not_stepped():
    with HostDriver(functools.partial(CountingEnv, length=5), num_envs=3, workers=0) as d:
        obs, infos = d.reset([10, 20, 30], [None] * 3)
        np.testing.assert_array_equal(obs["seed"], [10, 20, 30])
        active = np.array([True, False, True])
        for _ in range(2):
            obs, reward, term, trunc, infos = d.step(np.ones((3, 2)), active)
        np.testing.assert_array_equal(obs["count"], [2, 0, 2])
        np.testing.assert_array_equal(reward, [2.0, 0.0, 2.0])
        assert infos[1] == {"success": False, "progress": 0.0}  # last info repeated
        with pytest.raises(ValueError, match="expected actions"):
            d.step(np.ones((2, 2)), active)


def test_worker_exception_is_a_runtime_error():
    factory = functools.partial(CountingEnv, fail_at=2)
    driver = HostDriver(factory, num_envs=2, workers=2)
    driver.reset([0, 1], [None, None])
    driver.step(np.zeros((2, 1)), np.ones(2, bool))
    with pytest.raises(RuntimeError, match=r"host worker 0 .*raised ValueError: boom at step 2"):
        driver.step(np.zeros((2, 1)), np.ones(2, bool))
    assert not driver._procs  # closed on failure


def test_dead_worker_is_a_runtime_error_not_a_hang():
    t0 = time.perf_counter()
    with HostDriver(functools.partial(CountingEnv, die_at=1), num_envs=1, workers=1) as driver:
        driver.reset([0], [None])
        with pytest.raises(RuntimeError, match=r"host worker 0 .*died with exit code 3"):
            driver.step(np.zeros((1, 1)), np.ones(1, bool))
    assert time.perf_counter() - t0 < 60

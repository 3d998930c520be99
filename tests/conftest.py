"""Suite-wide test settings."""

import gc

import jax
import pytest

import envs
from policies import FlowConfig, example_obs, make_policy


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module. The whole suite runs in one
    process; without this it holds the executables of every module at once."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def tiny():
    """(env, policy, params): an untrained tiny flow policy on a 12-step reach task."""
    env = envs.make("reach", max_steps=12)
    cfg = FlowConfig(width=32, depth=1, heads=2, expert_width=16, expert_heads=2, num_steps=2,
                     horizon=4).with_spec(env.spec)
    policy = make_policy("flow", cfg)
    return env, policy, policy.init(jax.random.PRNGKey(0), example_obs(cfg))

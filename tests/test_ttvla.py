"""TT-VLA (``algos.ttvla``): the known answers of the published recipe's pieces, and the test-time
learner inside the harness (per-episode reset, continual streams, pairing with the frozen base)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from algos.base import BuildContext, ExecuteChosen
from algos.registry import make_adapter
from algos.ttvla import (
    TTVLAConfig,
    clipped_surrogate,
    gaussian_log_prob,
    kl_to_frozen,
    noise_mean,
    progress_advantages,
)
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from experiments.host_loop import evaluate_gym
from policies import ARConfig, make_policy
from verifiers.registry import make_verifier

SHAPE = (4, 3)


def test_advantage_is_the_progress_increment():
    """gamma 0: A_j = p_{j+1} - p_j, the last one against the progress after it."""
    p = jnp.asarray([0.1, 0.3, 0.3, 0.6])
    np.testing.assert_allclose(progress_advantages(p, jnp.float32(0.65)),
                               [0.2, 0.0, 0.3, 0.05], atol=1e-6)


def _batch(key, n=5, f=6, rank=2):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = {"down": jax.random.normal(k1, (f, rank)),
              "up": 0.3 * jax.random.normal(k2, (rank, SHAPE[0] * SHAPE[1]))}
    feats = jax.random.normal(k3, (n, f))
    z = jax.random.normal(k4, (n, *SHAPE))
    adv = jax.random.normal(k5, (n,))
    valid = jnp.asarray([True, True, False, True, True])
    return params, feats, z, adv, valid


def test_clipped_surrogate_gradient_at_ratio_one_is_the_policy_gradient():
    params, feats, z, adv, valid = _batch(jax.random.PRNGKey(0))
    logp = lambda p: gaussian_log_prob(z, noise_mean(p, feats, SHAPE))  # noqa: E731
    old = jax.lax.stop_gradient(logp(params))
    g_ppo = jax.grad(lambda p: clipped_surrogate(logp(p), old, adv, valid, 0.2))(params)
    # REINFORCE: -mean over valid transitions of A log pi
    w = valid.astype(jnp.float32)
    g_pg = jax.grad(lambda p: -jnp.sum(w * adv * logp(p)) / w.sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 g_ppo, g_pg)


def test_the_clip_stops_the_gradient_outside_the_trust_region():
    """A > 0 and rho > 1 + eps (or A < 0 and rho < 1 - eps): the objective is flat."""
    params, feats, z, _, _ = _batch(jax.random.PRNGKey(1), n=2)
    logp = lambda p: gaussian_log_prob(z, noise_mean(p, feats, SHAPE))  # noqa: E731
    now = logp(params)
    adv, valid = jnp.asarray([1.0, -1.0]), jnp.asarray([True, True])
    old = jax.lax.stop_gradient(now - jnp.asarray([0.5, -0.5]))  # rho = e^0.5, e^-0.5
    g = jax.grad(lambda p: clipped_surrogate(logp(p), old, adv, valid, 0.2))(params)
    for leaf in jax.tree.leaves(g):
        np.testing.assert_array_equal(leaf, 0.0)


def test_gaussian_log_prob_and_kl_known_values():
    z, mean = jnp.zeros(SHAPE), jnp.ones(SHAPE)
    d = SHAPE[0] * SHAPE[1]
    np.testing.assert_allclose(gaussian_log_prob(z, mean), -0.5 * d - 0.5 * d * np.log(2 * np.pi),
                               rtol=1e-6)
    np.testing.assert_allclose(kl_to_frozen(jnp.zeros(SHAPE)), 0.0)  # identical policies
    np.testing.assert_allclose(kl_to_frozen(mean), 0.5 * d, rtol=1e-6)


@pytest.fixture(scope="module")
def learner_env(tiny):
    env, policy, params = tiny
    return env, policy, params, BuildContext(env=env, policy=policy, replan=2)


def _setup(env, policy, adapter, episodes=8):
    return Setup(env=env, policy=policy, verifier=make_verifier("random"),
                 cfg=EvalConfig(M=1, episodes=episodes, replan=2, timing_decisions=0,
                                annotate_oracle=False, classify_modes=False),
                 adapter=adapter)


def test_the_adapter_at_its_start_is_the_base(learner_env):
    """U = 0: the mean is zero, and with no update due within the episode every episode is the
    frozen base's, exactly (same keys, same noise)."""
    env, policy, params, ctx = learner_env
    a = make_adapter("ttvla", ctx, TTVLAConfig(interval=100))
    np.testing.assert_array_equal(noise_mean(a.state, jnp.ones(policy.feature_dim),
                                             (policy.horizon, policy.action_dim)), 0.0)
    base = evaluate_compiled(_setup(env, policy, ExecuteChosen()), params, None)
    frozen = evaluate_compiled(_setup(env, policy, a), params, None, a.state)
    np.testing.assert_array_equal(frozen["learner/updates"], 0)
    for k in base:
        np.testing.assert_array_equal(base[k], frozen[k], err_msg=k)


def test_one_update_moves_the_mean_toward_noise_that_made_progress():
    cfg = TTVLAConfig(interval=1, lr=0.05)
    policy = _Stub(feature_dim=6)
    a = make_adapter("ttvla", BuildContext(policy=policy), cfg)
    carry = a.begin(a.state)
    feats = jnp.linspace(-1.0, 1.0, 6)
    z = jnp.ones(SHAPE)
    carry = carry.replace(feats=feats[None], noise=z[None], progress=jnp.zeros(1),
                          valid=jnp.ones(1, bool), old_log_prob=gaussian_log_prob(
                              z, noise_mean(a.state, feats, SHAPE))[None])
    toward = noise_mean(a.update(carry, jnp.float32(0.5)).params, feats, SHAPE)
    away = noise_mean(a.update(carry, jnp.float32(-0.5)).params, feats, SHAPE)
    assert float(jnp.sum(toward * z)) > 0 > float(jnp.sum(away * z))


class _Stub:
    """The shape of a flow policy, for the learner alone."""

    def __init__(self, feature_dim):
        self.feature_dim, self.horizon, self.action_dim = feature_dim, *SHAPE

    def make_noise(self, key, M):
        raise NotImplementedError


def test_learning_within_the_episode(learner_env):
    """12 steps, replan 2: 6 decisions; interval 2 updates before decisions 2 and 4. The adapted
    episodes leave the base's; the adapter restarts with every episode."""
    env, policy, params, ctx = learner_env
    base = evaluate_compiled(_setup(env, policy, ExecuteChosen()), params, None)
    a = make_adapter("ttvla", ctx, TTVLAConfig(interval=2, lr=0.05))
    rec = evaluate_compiled(_setup(env, policy, a), params, None, a.state)
    np.testing.assert_array_equal(rec["learner/updates"], 2)
    assert not np.array_equal(rec["progress"], base["progress"])
    # per-episode reset: an episode's result does not depend on the others in the batch
    few = evaluate_compiled(_setup(env, policy, a, episodes=3), params, None, a.state)
    for k in few:
        np.testing.assert_allclose(few[k], rec[k][:3], rtol=1e-6, atol=1e-7, err_msg=k)


def test_continual_streams_carry_the_adapter_and_keep_the_pairing(learner_env):
    """streams 4 over 8 episodes: episodes 0-3 open the streams and equal the per-episode arm's;
    episodes 4-7 start from their stream's adapted parameters."""
    env, policy, params, ctx = learner_env
    fresh = make_adapter("ttvla", ctx, TTVLAConfig(interval=2, lr=0.05))
    cont = make_adapter("ttvla", ctx, TTVLAConfig(interval=2, lr=0.05, reset="continual",
                                                   streams=4))
    a = evaluate_compiled(_setup(env, policy, fresh), params, None, fresh.state)
    b = evaluate_compiled(_setup(env, policy, cont), params, None, cont.state)
    for k in a:
        np.testing.assert_allclose(a[k][:4], b[k][:4], rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_array_equal(b["learner/updates"], 2)  # the update clock is per episode
    assert not np.allclose(b["learner/up_norm"][4:], a["learner/up_norm"][4:], rtol=1e-3)
    with pytest.raises(ValueError, match="multiple of the continual learner's streams"):
        evaluate_compiled(_setup(env, policy, cont, episodes=6), params, None, cont.state)


def test_bad_input_is_named(learner_env):
    env, policy, params, ctx = learner_env
    with pytest.raises(ValueError, match="adapter.ttvla.reset must be one of"):
        make_adapter("ttvla", ctx, TTVLAConfig(reset="sometimes"))
    with pytest.raises(ValueError, match="adapter.ttvla.interval must be a positive int"):
        make_adapter("ttvla", ctx, TTVLAConfig(interval=0))
    ar = make_policy("autoregressive", ARConfig(width=16, depth=1, heads=2, horizon=4)
                     .with_spec(env.spec))
    with pytest.raises(ValueError, match="steers a flow policy's initial noise"):
        make_adapter("ttvla", BuildContext(env=env, policy=ar, replan=2), TTVLAConfig())
    a = make_adapter("ttvla", ctx, TTVLAConfig())
    with pytest.raises(ValueError, match="learns during the episode"):
        evaluate_gym(_setup(env, policy, a), envs.TabletopGymEnv(task="reach", max_steps=12),
                     params, None, a.state)

"""TT-VLA (``algos.ttvla``): the known answers of the published recipe's pieces, and the test-time
learner inside the harness (per-episode reset, continual streams, pairing with the frozen base)."""

import functools

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
    gae_advantages,
    gaussian_log_prob,
    kl_to_frozen,
    noise_mean,
    progress_advantages,
    token_kl,
)
from envs.host import HostDriver
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from experiments.host_loop import evaluate_gym, evaluate_host
from policies import ARConfig, make_policy
from verifiers.registry import make_verifier

SHAPE = (4, 3)


def test_advantage_is_the_progress_increment():
    """gamma 0: A_j = p_{j+1} - p_j, the last one against the progress after it."""
    p = jnp.asarray([0.1, 0.3, 0.3, 0.6])
    np.testing.assert_allclose(progress_advantages(p, jnp.float32(0.65)),
                               [0.2, 0.0, 0.3, 0.05], atol=1e-6)


def test_gae_known_values():
    """gamma = lam = 0.5 by hand: deltas (0.2, -0.05, 0); the episode ends after the last
    transition, so its bootstrap value 0.4 is not used."""
    r, v = jnp.asarray([0.2, 0.0, 0.3]), jnp.asarray([0.1, 0.2, 0.3])
    adv = gae_advantages(r, v, jnp.float32(0.4), jnp.asarray([1.0, 1.0, 0.0]), 0.5, 0.5)
    np.testing.assert_allclose(adv, [0.1875, -0.05, 0.0], atol=1e-6)
    np.testing.assert_allclose(  # gamma 0: the reward less the value
        gae_advantages(r, v, jnp.float32(0.4), jnp.ones(3), 0.0, 0.95), r - v, atol=1e-7)


def test_gae_at_gamma_zero_with_a_fresh_value_is_the_published_update():
    """V = 0 at the start, so GAE with gamma 0 gives the increments: the first update's policy
    step is the published one's; the value head then moves toward the rewards."""
    feats, z = jnp.linspace(-1.0, 1.0, 6), jnp.ones(SHAPE)
    ups = {}
    for adv in ("increment", "gae"):
        a = make_adapter("ttvla", BuildContext(policy=_Stub(feature_dim=6)),
                         TTVLAConfig(interval=1, lr=0.05, advantage=adv, gamma=0.0))
        carry = a.begin(a.state).replace(
            feats=feats[None], chosen={"noise": z[None]}, progress=jnp.zeros(1),
            valid=jnp.ones(1, bool),
            old_log_prob=gaussian_log_prob(z, noise_mean(a.state, feats, SHAPE))[None],
            next_feats=feats, next_alive=jnp.bool_(True))
        params = a.update(carry, jnp.float32(0.5)).params
        ups[adv] = params["up"]
    np.testing.assert_allclose(ups["gae"], ups["increment"], rtol=1e-6)
    from algos.ttvla import value
    assert float(value(params, feats)) > 0  # toward the return 0.5


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
    carry = carry.replace(feats=feats[None], chosen={"noise": z[None]}, progress=jnp.zeros(1),
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

    def sample_steered(self, params, context, key, M, steer):
        raise NotImplementedError

    def state_features(self, context):
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


def test_continual_adapters_are_saved_and_deployed_frozen(learner_env, tmp_path):
    """A continual run's per-episode parameters (``adapters.npz``): ``init_from`` starts each
    stream from the adapter it ended with, and ``learn=false`` deploys it without updates."""
    from core.io import write_npz

    env, policy, params, ctx = learner_env
    cfg = TTVLAConfig(interval=2, lr=0.05, reset="continual", streams=4)
    a = make_adapter("ttvla", ctx, cfg)
    rec = evaluate_compiled(_setup(env, policy, a), params, None, a.state)
    write_npz(tmp_path / "adapters.npz", {k.removeprefix("learner/params/"): v
                                          for k, v in rec.items() if "/params/" in k})
    kept = make_adapter("ttvla", ctx, TTVLAConfig(interval=2, reset="continual", streams=4,
                                                   init_from=str(tmp_path), learn=False))
    np.testing.assert_array_equal(kept.state["up"], rec["learner/params/up"][4:])
    again = evaluate_compiled(_setup(env, policy, kept), params, None, kept.state)
    np.testing.assert_array_equal(again["learner/updates"], 0)
    # episode i runs on stream i mod 4, whose adapter is the one that stream ended with
    np.testing.assert_allclose(again["learner/up_norm"], np.tile(rec["learner/up_norm"][4:], 2),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="same rank"):
        make_adapter("ttvla", ctx, TTVLAConfig(reset="continual", streams=4,
                                               init_from=str(tmp_path), advantage="gae"))


def test_bad_input_is_named(learner_env):
    env, policy, params, ctx = learner_env
    with pytest.raises(ValueError, match="adapter.ttvla.reset must be one of"):
        make_adapter("ttvla", ctx, TTVLAConfig(reset="sometimes"))
    with pytest.raises(ValueError, match="adapter.ttvla.interval must be a positive int"):
        make_adapter("ttvla", ctx, TTVLAConfig(interval=0))
    with pytest.raises(ValueError, match="adapter.ttvla.advantage must be one of"):
        make_adapter("ttvla", ctx, TTVLAConfig(advantage="td"))
    with pytest.raises(ValueError, match="adapter.ttvla.gamma must be in"):
        make_adapter("ttvla", ctx, TTVLAConfig(gamma=1.5))
    with pytest.raises(ValueError, match="progress_dir is needed by progress=learned"):
        make_adapter("ttvla", ctx, TTVLAConfig(progress="learned"))
    with pytest.raises(ValueError, match="init_from continues continual streams"):
        make_adapter("ttvla", ctx, TTVLAConfig(init_from="somewhere"))
    with pytest.raises(FileNotFoundError, match="adapter.ttvla.init_from names"):
        make_adapter("ttvla", ctx, TTVLAConfig(reset="continual", init_from="/nonexistent"))
    with pytest.raises(ValueError, match="offers neither"):
        make_adapter("ttvla", BuildContext(env=env, policy=object(), replan=2), TTVLAConfig())
    cont = make_adapter("ttvla", ctx, TTVLAConfig(reset="continual", streams=4))
    with pytest.raises(ValueError, match="set eval.host_envs to its streams"):
        evaluate_gym(_setup(env, policy, cont), envs.TabletopGymEnv(task="reach", max_steps=12),
                     params, None, cont.state)


@pytest.mark.parametrize("reset", ["episode", "continual"])
def test_learning_on_host_stepped_envs_equals_the_compiled_path(learner_env, reset):
    """The learner's carry threaded through the host driver (4 envs; continual: stream j on
    env j) gives the compiled evaluation's episodes and learner records."""
    env, policy, params, ctx = learner_env
    a = make_adapter("ttvla", ctx, TTVLAConfig(interval=2, lr=0.05, reset=reset, streams=4))
    setup = _setup(env, policy, a)
    expected = evaluate_compiled(setup, params, None, a.state)
    factory = functools.partial(envs.TabletopGymEnv, task="reach", max_steps=12)
    with HostDriver(factory, num_envs=4) as driver:
        got = evaluate_host(setup, driver, params, None, a.state)
    assert set(got) >= {"learner/updates", "learner/up_norm"}
    for k in ("success", "length", "learner/updates"):
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    close = ["progress", "decisions/progress", "learner/up_norm"]
    if reset == "continual":
        close.append("learner/params/up")
    for k in close:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert np.asarray(expected["learner/up_norm"]).max() > 0  # it did learn


# ---------------------------------------------------------------------------------------------
# the autoregressive policy: a low-rank update of its output head


@pytest.fixture(scope="module")
def ar_env(learner_env):
    env = learner_env[0]
    cfg = ARConfig(width=16, depth=1, heads=2, horizon=4, bins=32).with_spec(env.spec)
    policy = make_policy("autoregressive", cfg)
    obs = env.reset(jax.random.PRNGKey(3))[1]
    return env, policy, policy.init(jax.random.PRNGKey(0), obs), obs


def test_the_head_adapter_at_its_start_is_the_base_and_its_log_prob_is_the_policy_s(ar_env):
    """U = 0 samples the base's tokens exactly; with U moved, the learner's recomputed
    log-probability of a chosen chunk equals the policy's own (temperature 1)."""
    env, policy, params, obs = ar_env
    a = make_adapter("ttvla", BuildContext(env=env, policy=policy), TTVLAConfig(rank=2))
    context, key = policy.encode(params, obs), jax.random.PRNGKey(5)
    base = policy.sample(params, context, key, 3)
    steered = policy.sample_steered(params, context, key, 3, a.head.steer(a.state, None))
    np.testing.assert_array_equal(base.extras["tokens"], steered.extras["tokens"])
    np.testing.assert_allclose(base.log_prob, steered.log_prob, rtol=1e-6)
    moved = {**a.state, "up": 0.5 * jax.random.normal(jax.random.PRNGKey(1), a.state["up"].shape)}
    cands = policy.sample_steered(params, context, key, 3, a.head.steer(moved, None))
    chosen = a.head.chosen(moved, cands, 1)
    np.testing.assert_allclose(a.head.log_prob(moved, None, chosen), cands.log_prob[1],
                               rtol=1e-5)
    np.testing.assert_allclose(a.head.kl(a.state, None, chosen), 0.0, atol=1e-6)  # identical
    assert float(a.head.kl(moved, None, chosen)) > 0
    logits = jax.random.normal(jax.random.PRNGKey(2), (4, 32))
    np.testing.assert_allclose(token_kl(logits, logits), 0.0, atol=1e-6)


def test_the_head_adapter_learns_inside_the_harness(ar_env):
    """6 decisions, interval 2: two updates per episode; a positive advantage raises the
    chosen chunk's log-probability."""
    env, policy, params, obs = ar_env
    ctx = BuildContext(env=env, policy=policy, replan=2)
    a = make_adapter("ttvla", ctx, TTVLAConfig(interval=2, lr=0.05, rank=2))
    rec = evaluate_compiled(_setup(env, policy, a, episodes=4), params, None, a.state)
    np.testing.assert_array_equal(rec["learner/updates"], 2)
    assert np.all(rec["learner/up_norm"] > 0)
    a = make_adapter("ttvla", ctx, TTVLAConfig(interval=1, lr=0.05, rank=2))
    context = policy.encode(params, obs)
    cands = policy.sample_steered(params, context, jax.random.PRNGKey(7), 1,
                                  a.head.steer(a.state, None))
    carry = a.after(a.before(a.begin(a.state), obs, context, jnp.float32(0.0),
                             jnp.bool_(True))[0], context, cands, 0)
    chosen = jax.tree.map(lambda x: x[0], carry.chosen)
    after = a.update(carry, jnp.float32(0.3)).params
    assert float(a.head.log_prob(after, None, chosen)) > float(cands.log_prob[0])


def test_a_learned_progress_estimator_replaces_the_env_s(learner_env, tmp_path):
    """progress=learned: the learner's progress (and so its advantages) is the estimator's at the
    observation, not the env's."""
    from algos.progress import (
        ProgressConfig,
        ProgressEstimator,
        make_net,
        predict_progress,
        save_progress,
    )

    env, policy, params, ctx = learner_env
    obs = env.reset(jax.random.PRNGKey(2))[1]
    cfg = ProgressConfig(width=8, depth=1, embed_dim=4)
    net = make_net(cfg, int(obs["instruction"].max()) + 1, len(envs.tabletop.TASKS))
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None],
                         {k: obs[k] for k in ("state", "instruction", "task_id")})
    est = ProgressEstimator(params=net.init(jax.random.PRNGKey(0), batch), net=net, config=cfg,
                            state_dim=int(obs["state"].shape[-1]))
    save_progress(est, str(tmp_path / "est"))
    a = make_adapter("ttvla", ctx, TTVLAConfig(progress="learned",
                                               progress_dir=str(tmp_path / "est")))
    carry, _ = a.before(a.begin(a.state), obs, policy.encode(params, obs), jnp.float32(0.9),
                        jnp.bool_(True))
    np.testing.assert_allclose(carry.progress[0], predict_progress(est, obs), rtol=1e-6)
    assert abs(float(carry.progress[0]) - 0.9) > 1e-3

"""Base policies: flow-matching chunk policy and autoregressive token policy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from policies import ARConfig, FlowConfig, example_obs, make_policy
from policies.autoregressive import detokenize_actions, tokenize_actions
from policies.flow import PI0_PROPORTIONS, flow_matching_loss, flow_path
from policies.layers import fourier_features

SIZES = dict(state_dim=5, instruction_len=6, vocab_size=20, num_tasks=3, horizon=4, image=True)
TINY_FLOW = FlowConfig(**SIZES, patch_size=16, width=32, depth=1, heads=2, expert_width=16,
                       expert_depth=1, expert_heads=2, num_steps=4)
TINY_AR = ARConfig(**SIZES, patch_size=16, width=32, depth=2, heads=2)


def make_obs(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "state": rng.normal(size=5).astype(np.float32),
        "image": rng.integers(0, 256, (64, 64, 3)).astype(np.uint8),
        "instruction": np.array([3, 7, 2, 0, 0, 0], np.int32),
        "task_id": np.int32(1),
    }


def batch_of(obs, b):
    return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], b, 0), obs)


@pytest.fixture(scope="module")
def flow():
    pol = make_policy("flow", TINY_FLOW)
    return pol, pol.init(jax.random.PRNGKey(0), make_obs())


@pytest.fixture(scope="module")
def ar():
    pol = make_policy("autoregressive", TINY_AR)
    return pol, pol.init(jax.random.PRNGKey(0), make_obs())


# ---------------------------------------------------------------- flow


def test_flow_path_and_loss_known_answer():
    a = jnp.array([[[0.5], [-1.0]]])  # [B=1, H=2, A=1]
    noise = jnp.ones_like(a)
    x_t, target = flow_path(a, noise, jnp.array([0.25]))
    np.testing.assert_allclose(x_t[0, :, 0], [0.625, -0.5])
    np.testing.assert_allclose(target[0, :, 0], [0.5, 2.0])
    pred = jnp.zeros_like(a)
    valid = jnp.array([[True, False]])
    assert float(flow_matching_loss(pred, target, valid)) == pytest.approx(0.25)
    valid = jnp.array([[True, True]])
    assert float(flow_matching_loss(pred, target, valid)) == pytest.approx(2.125)


def test_flow_policy_loss_with_zero_head_is_target_mse(flow):
    pol, params = flow
    # zero output layer -> predicted velocity 0 -> loss = mean((noise - a)^2) over valid steps
    params = jax.tree.map(lambda x: x, params)
    params["params"]["action_out"] = jax.tree.map(jnp.zeros_like, params["params"]["action_out"])
    b = 3
    actions = jax.random.uniform(jax.random.PRNGKey(5), (b, 4, 3), minval=-1, maxval=1)
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    batch = {"obs": batch_of(make_obs(), b), "actions": actions, "valid": valid}
    key = jax.random.PRNGKey(9)
    loss, _ = jax.jit(pol.loss)(params, batch, key)
    _, k_n = jax.random.split(key)
    n = pol.cfg.loss_samples  # draws per observation, repeated along the batch
    rep = np.repeat(np.asarray(actions), n, 0)
    noise = np.asarray(jax.random.normal(k_n, rep.shape))
    err = (noise - rep) ** 2
    vrep = np.repeat(np.asarray(valid), n, 0)
    expected = err[vrep].sum() / (vrep.sum() * 3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("noise_mode", ["fresh", "bank"])
def test_flow_cached_equals_naive(flow, noise_mode):
    # the noise mode does not change the parameter tree
    pol = make_policy("flow", FlowConfig(**{**TINY_FLOW.__dict__, "noise": noise_mode}))
    params = flow[1]
    obs, key = make_obs(1), jax.random.PRNGKey(3)
    cached = jax.jit(lambda p, o, k: pol.sample(p, pol.encode(p, o), k, 6))(params, obs, key)
    naive = jax.jit(lambda p, o, k: pol.sample_naive(p, o, k, 6))(params, obs, key)
    assert cached.actions.shape == (6, 4, 3) and cached.features.shape == (6, 16)
    assert float(jnp.abs(cached.actions - naive.actions).max()) <= 1e-4
    assert float(jnp.abs(cached.features - naive.features).max()) <= 1e-4
    assert bool(jnp.all(jnp.abs(cached.actions) <= 1.0))
    np.testing.assert_array_equal(cached.extras["noise"], naive.extras["noise"])


def test_flow_determinism_and_noise_modes(flow):
    pol, params = flow
    ctx = pol.encode(params, make_obs())
    sample = jax.jit(pol.sample, static_argnums=3)
    a = sample(params, ctx, jax.random.PRNGKey(1), 4)
    b = sample(params, ctx, jax.random.PRNGKey(1), 4)
    c = sample(params, ctx, jax.random.PRNGKey(2), 4)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert float(jnp.abs(a.actions - c.actions).max()) > 1e-3
    # candidate m's noise depends only on (key, m): the first 4 of 8 are the 4
    big = pol.make_noise(jax.random.PRNGKey(1), 8)
    np.testing.assert_array_equal(big[:4], a.extras["noise"])
    bank = make_policy("flow", FlowConfig(**{**TINY_FLOW.__dict__, "noise": "bank"}))
    n1, n2 = bank.make_noise(jax.random.PRNGKey(1), 4), bank.make_noise(jax.random.PRNGKey(2), 4)
    np.testing.assert_array_equal(n1, n2)
    # an explicit noise argument is used as given
    d = sample(params, ctx, jax.random.PRNGKey(7), 4, noise=a.extras["noise"])
    np.testing.assert_array_equal(a.actions, d.actions)


def test_flow_one_step_features(flow):
    pol, params = flow
    ctx = pol.encode(params, make_obs())
    clean = jnp.zeros((5, 4, 3))
    osf = jax.jit(pol.one_step_features)
    f1 = osf(params, ctx, clean, jax.random.PRNGKey(0))
    f2 = osf(params, ctx, clean, jax.random.PRNGKey(0))
    assert f1.shape == (5, 16)
    np.testing.assert_array_equal(f1, f2)
    assert bool(jnp.all(jnp.isfinite(f1)))


def test_fourier_features_known_answer():
    x = jnp.array([[0.25, -0.5]])
    out = np.asarray(fourier_features(x, 2))
    s2 = np.sqrt(0.5)
    # per entry: x, sin(pi x), sin(2 pi x), cos(pi x), cos(2 pi x)
    np.testing.assert_allclose(out[0], [0.25, s2, 1.0, s2, 0.0, -0.5, -1.0, 0.0, 0.0, -1.0],
                               atol=1e-6)
    assert fourier_features(jnp.zeros((3, 7)), 6).shape == (3, 7 * 13)


def test_flow_flop_proportions_pi0_sizes():
    # The benchmark's pi0-proportioned policy on the built-in suite: 16 patches + 16 instruction
    # tokens + 8 entity tokens. pi0's prefix costs about ten times the K expert passes of one
    # candidate.
    cfg = FlowConfig(**PI0_PROPORTIONS).with_spec(envs.make("pick_place").spec)
    pol = make_policy("flow", cfg)
    f = pol.flop_counts()
    p, s = f["prefix"], f["expert_per_candidate"]
    assert 8 <= p / s <= 12
    bound = 1 - (p + 32 * s) / (32 * (p + s))
    assert bound >= 0.87
    assert pol.flops_per_decision(32, cached=False) == 32 * (p + s)


def test_registry_and_config_errors():
    with pytest.raises(ValueError, match="known policies"):
        make_policy("diffusion", TINY_FLOW)
    with pytest.raises(ValueError, match="state_dim"):
        make_policy("flow", FlowConfig())
    with pytest.raises(ValueError, match="FlowConfig"):
        make_policy("autoregressive", TINY_FLOW)
    pol = make_policy("flow", TINY_FLOW)
    with pytest.raises(ValueError, match="image"):
        pol.encode({}, {k: v for k, v in make_obs().items() if k != "image"})
    assert hash(pol) == hash(make_policy("flow", TINY_FLOW))


def test_example_obs_matches_real_obs(flow, ar):
    for pol, params in (flow, ar):
        shapes = jax.eval_shape(pol.init, jax.random.PRNGKey(0), example_obs(pol.cfg))
        assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(jnp.shape, params)


# ---------------------------------------------------------------- autoregressive


def test_tokenize_round_trip():
    ids = jnp.arange(256)
    centres = detokenize_actions(ids)
    np.testing.assert_array_equal(tokenize_actions(centres), ids)
    np.testing.assert_allclose(centres[jnp.array([0, 255])], [-1 + 1 / 256, 1 - 1 / 256], atol=1e-7)
    a = jax.random.uniform(jax.random.PRNGKey(0), (1000, 3), minval=-1, maxval=1)
    assert float(jnp.abs(detokenize_actions(tokenize_actions(a)) - a).max()) <= 1 / 256 + 1e-6
    np.testing.assert_array_equal(tokenize_actions(jnp.array([-1.0, 1.0, -3.0, 3.0])),
                                  [0, 255, 0, 255])


def test_ar_cached_decoding_equals_full_recompute(ar):
    pol, params = ar
    obs = make_obs(2)
    cand = jax.jit(lambda p, o, k: pol.sample(p, pol.encode(p, o), k, 5))(
        params, obs, jax.random.PRNGKey(4))
    assert cand.actions.shape == (5, 4, 3) and cand.features.shape == (5, 32)
    logits, feat = pol.full_logits(params, obs, cand.extras["tokens"])
    assert float(jnp.abs(logits - cand.extras["token_logits"]).max()) <= 1e-4
    assert float(jnp.abs(feat - cand.features).max()) <= 1e-4
    logp = jax.nn.log_softmax(logits)
    expected = jnp.take_along_axis(logp, cand.extras["tokens"][..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(cand.log_prob, expected, rtol=1e-5)
    np.testing.assert_allclose(
        cand.actions.reshape(5, -1), detokenize_actions(cand.extras["tokens"]))


def test_ar_zero_head_loss_is_log_bins(ar):
    pol, params = ar
    params = jax.tree.map(lambda x: x, params)
    params["params"]["head"] = jax.tree.map(jnp.zeros_like, params["params"]["head"])
    batch = {"obs": batch_of(make_obs(), 2), "actions": jnp.zeros((2, 4, 3)),
             "valid": jnp.ones((2, 4), bool)}
    loss, _ = jax.jit(pol.loss)(params, batch, jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(np.log(256), rel=1e-6)


def test_ar_determinism_and_temperature(ar):
    pol, params = ar
    ctx = pol.encode(params, make_obs())
    sample = jax.jit(pol.sample, static_argnums=3)
    a = sample(params, ctx, jax.random.PRNGKey(1), 3)
    b = sample(params, ctx, jax.random.PRNGKey(1), 3)
    np.testing.assert_array_equal(a.actions, b.actions)
    # near-zero temperature is greedy: all candidates agree
    g = sample(params, ctx, jax.random.PRNGKey(1), 3, temperature=1e-4)
    np.testing.assert_array_equal(g.extras["tokens"][0], g.extras["tokens"][1])


def test_flow_normalisation_is_an_affine_change_of_coordinates(flow):
    """A policy with state/action statistics is the raw policy (same weights) run on
    standardised states and actions: the same loss on standardised data, and its samples are
    the raw policy's mapped back (then clipped to [-1, 1])."""
    pol, params = flow
    rng = np.random.default_rng(1)
    s_mean, s_std = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
    a_mean, a_std = np.array([0.1, -0.2, 0.0]), np.array([0.2, 0.1, 0.5])
    normed = make_policy("flow", dataclasses.replace(
        TINY_FLOW, state_mean=tuple(s_mean), state_std=tuple(s_std),
        action_mean=tuple(a_mean), action_std=tuple(a_std)))
    obs = make_obs(2)
    raw_obs = {**obs, "state": ((obs["state"] - s_mean) / s_std).astype(np.float32)}
    actions = rng.uniform(-0.3, 0.3, (2, 4, 3)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    batch = {"obs": batch_of(obs, 2), "actions": jnp.asarray(actions),
             "valid": jnp.ones((2, 4), bool)}
    raw_batch = {"obs": batch_of(raw_obs, 2),
                 "actions": jnp.asarray(((actions - a_mean) / a_std).astype(np.float32)),
                 "valid": jnp.ones((2, 4), bool)}
    np.testing.assert_allclose(normed.loss(params, batch, key)[0],
                               pol.loss(params, raw_batch, key)[0], rtol=1e-5)
    noise = pol.make_noise(key, 3)
    ours = normed.sample(params, normed.encode(params, obs), key, 3, noise=noise).actions
    x, _ = pol._integrate(params, pol.encode(params, raw_obs), noise)
    np.testing.assert_allclose(ours, np.clip(np.asarray(x) * a_std + a_mean, -1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="action_mean and action_std"):
        dataclasses.replace(TINY_FLOW, action_mean=(0.0,), action_std=(1.0,)).validate()
    with pytest.raises(ValueError, match="state_std entries must be > 0"):
        dataclasses.replace(TINY_FLOW, state_mean=(0.0,) * 5, state_std=(0.0,) * 5).validate()


def test_flow_statistics_floor_a_constant_entry():
    cfg = TINY_FLOW.with_statistics(np.array([[1.0] * 5, [1.0, 2, 3, 4, 5]]),
                                    np.array([[0.5, 0.0, 1.0], [0.5, 0.2, -1.0]]))
    np.testing.assert_allclose(cfg.state_std, [1e-2, 0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(cfg.action_mean, [0.5, 0.1, 0.0])
    np.testing.assert_allclose(cfg.action_std, [1e-2, 0.1, 1.0])

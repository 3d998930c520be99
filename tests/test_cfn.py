"""CFN pseudo-count verifier: known-answer pieces, calibration of counts, feature collection."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from policies.base import Candidates
from verifiers.base import BuildContext
from verifiers.cfn_model import (
    CFNConfig,
    cfn_loss,
    cfn_output,
    init_cfn,
    load_cfn,
    make_optimizer,
    one_cycle_lr,
    pseudo_counts,
    rademacher_targets,
    save_cfn,
    train_cfn,
    update_running_stats,
)
from verifiers.features import CollectConfig
from verifiers.registry import make_verifier

KEY = jax.random.PRNGKey(0)
SMALL = CFNConfig(hidden_dim=32, depth=1, output_dim=8, batch_size=64, epochs=2)


# --------------------------------------------------------------------------- known answers


def test_loss_hand_computed():
    f = jnp.array([[0.5, -1.0], [2.0, 0.0]])
    t = jnp.array([[1.0, -1.0], [1.0, 1.0]])
    # ((-0.5)^2 + 0 + 1^2 + (-1)^2) / 4
    assert float(cfn_loss(f, t)) == pytest.approx(0.5625)


def test_rademacher_targets_deterministic_per_index():
    tk = jax.random.PRNGKey(3)
    a = np.asarray(rademacher_targets(tk, jnp.array([5, 9, 2]), 20))
    b = np.asarray(rademacher_targets(tk, jnp.array([2, 5]), 20))
    assert a.shape == (3, 20) and set(np.unique(a)) == {-1.0, 1.0}
    np.testing.assert_array_equal(a[0], b[1])  # index 5, whatever the batch
    np.testing.assert_array_equal(a[2], b[0])  # index 2
    assert not np.array_equal(a[0], a[1])
    assert rademacher_targets(tk, jnp.arange(4), 7).shape == (4, 7)  # d follows the config
    big = np.asarray(rademacher_targets(tk, jnp.arange(2000), 20))
    assert abs(big.mean()) < 0.02  # fair coins


def test_running_stats_match_welford_loop():
    rng = np.random.default_rng(1)
    batches = [rng.normal(2.0, 3.0, (n, 4)) for n in (5, 1, 7)]
    mean, var, cnt = jnp.zeros(4), jnp.full(4, 0.01), jnp.zeros(())
    for b in batches:
        mean, var, cnt = update_running_stats(mean, var, cnt, jnp.asarray(b, jnp.float32))
    # Reference: CFN/TACO's per-row rule.
    m, v, n = np.zeros(4), np.full(4, 0.01), 0
    for row in np.concatenate(batches):
        delta = row - m
        m = m + delta / (n + 1)
        v = (v * n + delta**2 * n / (n + 1)) / (n + 1)
        n += 1
    np.testing.assert_allclose(mean, m, rtol=1e-5)
    np.testing.assert_allclose(var, v, rtol=1e-4)
    assert float(cnt) == 13
    np.testing.assert_allclose(var, np.concatenate(batches).var(0), rtol=1e-4)


def test_one_cycle_schedule_values():
    total = 1000
    lr = lambda s: float(one_cycle_lr(s, total, 1e-3))
    assert lr(0) == pytest.approx(4e-5, rel=1e-5)
    assert lr(299) == pytest.approx(1e-3, rel=1e-5)  # peak at pct_start * total - 1
    assert lr(999) == pytest.approx(4e-9, rel=1e-3)
    # Half-way down the cosine: (max + min) / 2.
    assert lr(299 + 350) == pytest.approx((1e-3 + 4e-9) / 2, rel=1e-4)
    assert lr(150) < lr(200) < lr(299) and lr(400) > lr(800)


def test_optimizer_lr_advances_per_minibatch():
    # With accumulation k=2, update j uses the lr of mini-batch 2j+1 (as TACO's loop does).
    cfg = CFNConfig(grad_accum=2, max_lr=1.0)
    opt = make_optimizer(cfg, total_minibatches=100)
    p = {"w": jnp.zeros(())}
    st = opt.init(p)
    steps = []
    for _ in range(4):
        u, st = opt.update({"w": jnp.ones(())}, st, p)
        steps.append(float(u["w"]))
    assert steps[0] == 0.0 and steps[2] == 0.0  # accumulating
    # Adam's first step is -lr * sign(g) (bias-corrected); second also ~ -lr.
    assert steps[1] == pytest.approx(-float(one_cycle_lr(1, 100, 1.0)), rel=1e-3)
    assert steps[3] == pytest.approx(-float(one_cycle_lr(3, 100, 1.0)), rel=1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_dim"):
        CFNConfig(hidden_dim=0)
    with pytest.raises(ValueError, match="feature_noise"):
        CFNConfig(feature_noise=-0.5)
    with pytest.raises(ValueError, match="mode"):
        CollectConfig(mode="best")


def test_init_prior_and_shapes():
    st = init_cfn(SMALL, 6, KEY)
    assert st.config.input_dim == 6
    x = jax.random.normal(KEY, (5, 6))
    f = cfn_output(st, x)
    assert f.shape == (5, 8)
    assert pseudo_counts(st, x).shape == (5,)
    # Without training data the prior is raw/sqrt(0.01 + eps): the output is 11x the net's.
    no_prior = cfn_output(st.replace(config=replace(st.config, use_prior=False)), x)
    np.testing.assert_allclose(f, no_prior * (1 + 1 / np.sqrt(0.01 + 1e-6)), rtol=1e-4)


TRAIN_X = np.random.default_rng(0).normal(size=(100, 6)).astype(np.float32)
TRAIN_CFG = CFNConfig(hidden_dim=32, depth=1, output_dim=8, batch_size=32, epochs=4)


@pytest.fixture(scope="module")
def trained():
    return train_cfn(TRAIN_X, TRAIN_CFG)


def test_training_deterministic_and_reduces_loss(trained):
    s1, h1 = trained
    s2, _ = train_cfn(TRAIN_X, TRAIN_CFG)  # same config and shapes: no new compilation
    jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
    other = init_cfn(TRAIN_CFG, 6, jax.random.split(jax.random.PRNGKey(1))[0])
    assert not np.array_equal(s1.params["Dense_0"]["kernel"], other.params["Dense_0"]["kernel"])
    assert h1[-1]["loss"] < h1[0]["loss"]
    # Running stats saw every mini-batch: 4 batches (wrapped to 32 rows each) x 4 epochs.
    assert float(s1.prior_count) == 4 * 32 * 4
    # Training noise of std 0 is exact training; any other std changes the fit.
    s0, _ = train_cfn(TRAIN_X, TRAIN_CFG, noise_std=np.zeros(6, np.float32))
    jax.tree.map(np.testing.assert_array_equal, s1.params, s0.params)
    s3, _ = train_cfn(TRAIN_X, TRAIN_CFG, noise_std=0.3)
    assert not np.array_equal(s1.params["Dense_0"]["kernel"], s3.params["Dense_0"]["kernel"])


def test_save_load_round_trip_and_registry(tmp_path, trained):
    x = TRAIN_X
    st, _ = trained
    out = save_cfn(st, str(tmp_path / "cfn"), extra={"note": 1})
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["input_dim"] == 6 and cfg["output_dim"] == 8 and cfg["epochs"] == 4
    back = load_cfn(out)
    q = jnp.asarray(x[:5])
    np.testing.assert_allclose(pseudo_counts(back, q), pseudo_counts(st, q), rtol=1e-6)
    v = make_verifier("cfn", BuildContext(fitted_dir=out))
    c = Candidates(actions=jnp.zeros((5, 2, 3)), features=q)
    s = jax.jit(lambda vs, c: v.score(vs, {}, c, KEY))(v.state, c)
    np.testing.assert_allclose(s, pseudo_counts(st, q), rtol=1e-6)
    with pytest.raises(ValueError, match="F=3"):
        v.score(v.state, {}, Candidates(jnp.zeros((5, 2, 3)), jnp.zeros((5, 3))), KEY)
    with pytest.raises(ValueError, match="fitted"):
        make_verifier("cfn")

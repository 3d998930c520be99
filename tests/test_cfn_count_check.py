"""The CFN count check: duplicating a stored feature k times must shrink ||f||^2/d like 1/k,
and the head's output energy must be the coin flips' (E[f.c] = E[||f||^2])."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from policies.base import Candidates
from verifiers.cfn import (
    coin_flip_stats,
    count_check,
    count_check_split,
    duplicated_set,
    fit_cfn,
    log_log_slope,
)
from verifiers.cfn_model import CFNConfig, init_cfn, rademacher_targets
from verifiers.features import CollectConfig, feature_spread

KEY = jax.random.PRNGKey(0)


# --------------------------------------------------------------------------- pieces


def test_split_is_disjoint_and_covers():
    held, rest = count_check_split(KEY, 50, 6, 3)
    assert held.shape == (6, 3) and rest.shape == (32,)
    assert sorted(np.concatenate([held.ravel(), rest]).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="more than"):
        count_check_split(KEY, 18, 6, 3)


def test_duplicated_set_rows_are_separate_visits():
    x = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
    rest, src = jnp.array([0, 1, 2]), jnp.array([4, 4, 4, 5])
    exact = np.asarray(duplicated_set(x, rest, src, jnp.zeros((4, 2)), KEY, num_dup=4))
    np.testing.assert_array_equal(exact, np.asarray(x)[[0, 1, 2, 4, 4, 4, 5]])
    # Each copy is its own row, so it gets its own coin-flip vector (train_cfn: row i -> c_i):
    # the three copies of feature 4 have three different targets.
    c = np.asarray(rademacher_targets(KEY, jnp.arange(3, 6), 20))
    assert not np.array_equal(c[0], c[1]) and not np.array_equal(c[1], c[2])
    big = jnp.zeros((1, 3))
    std = jnp.broadcast_to(jnp.array([0.0, 0.5, 2.0]), (4000, 3))
    noisy = np.asarray(duplicated_set(big, jnp.zeros((0,), int), jnp.zeros((4000,), int), std,
                                      KEY, num_dup=4000))
    np.testing.assert_allclose(noisy.std(0), [0.0, 0.5, 2.0], rtol=0.05)


def test_log_log_slope_and_coin_flip_stats_known_answers():
    ks = np.array([1, 2, 4, 8, 16, 32])
    assert log_log_slope(ks, 3.0 / ks) == pytest.approx(-1.0)
    assert log_log_slope(ks, 1.0 / np.sqrt(ks)) == pytest.approx(-0.5)
    # An untrained head without prior data: f = 11 x the raw net, unrelated to the coin flips.
    st = init_cfn(CFNConfig(hidden_dim=16, depth=1, output_dim=20), 4, KEY)
    x = jax.random.normal(KEY, (500, 4))
    m = {k: float(v) for k, v in coin_flip_stats(st, x).items()}
    assert m["loss"] == pytest.approx(m["ff"] - 2 * m["fc"] + 1, rel=1e-4)
    assert abs(m["fc"]) < 0.1 * m["ff"]


# --------------------------------------------------------------------------- the check

# Well-separated random features (pairwise distance ~ sqrt(2 F) = 5.7, x10 input scale) that a
# small dropout-free head trained with enough updates can memorise one by one: the known
# answer is a count estimator, ||f||^2/d ~ 1/k.
SYN = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
SYN_CFG = CFNConfig(hidden_dim=32, depth=1, output_dim=20, dropout=0.0, batch_size=32,
                    grad_accum=1, epochs=150, max_lr=3e-3, count_check=False)
SYN_KW = dict(ks=(1, 2, 4, 8), groups_per_k=4, perturb_std=0.02)


def test_count_check_passes_on_separated_features():
    r = count_check(SYN, SYN_CFG, KEY, **SYN_KW)
    print(json.dumps(r))
    json.dumps(r)  # plain JSON
    assert r["num_train_rows"] == 100 - 2 * 4 * 4 + 2 * 4 * (1 + 2 + 4 + 8)
    q = np.asarray(r["exact"]["sq_norm_per_k"])
    assert np.all(np.diff(q) < 0)  # more copies, smaller ||f||
    assert r["exact"]["slope"] <= -0.5 and r["exact"]["slope_pass"]
    # Noise far below the spacing of the features: still counted as one state.
    assert r["perturbed"]["slope"] <= -0.5 and r["perturbed_passed"]
    assert abs(r["fc"] - r["ff"]) <= 0.2 * r["ff"] and r["energy_pass"]
    assert r["passed"]
    assert r["loss"] == pytest.approx(r["ff"] - 2 * r["fc"] + 1, abs=1e-4)


@pytest.mark.parametrize("broken", [
    dict(epochs=1),  # the head is still the random prior: energy unrelated to the coin flips
    dict(max_lr=1e-6, div_factor=1.0),  # cannot move from its initialisation
])
def test_count_check_fails_on_a_head_that_does_not_count(broken):
    r = count_check(SYN, replace(SYN_CFG, **broken), KEY, **SYN_KW)
    print(broken, r["exact"]["slope"], r["fc"], r["ff"])
    assert not r["passed"] and not r["energy_pass"] and not r["exact"]["slope_pass"]
    assert r["perturbed_passed"] is False
    # Measured: slope -0.17 (epochs=1) and -0.10 (lr 1e-6), fc/ff -0.01 in both.
    assert r["exact"]["slope"] > -0.4 and abs(r["fc"]) < 0.1 * r["ff"]


def test_count_check_validates():
    with pytest.raises(ValueError, match="perturb_std"):
        count_check(SYN, SYN_CFG, KEY, perturb_std=np.ones(3))
    with pytest.raises(ValueError, match="ks"):
        count_check(SYN, SYN_CFG, KEY, ks=(1,))
    with pytest.raises(ValueError, match="more than"):
        count_check(SYN[:40], SYN_CFG, KEY, groups_per_k=7)  # 6 x 7 > 40


# --------------------------------------------------------------------------- in fit_cfn


class StandIn:
    """actions = tanh(noise + state[0]); feature = [state (4), first 4 action values] x 2."""

    horizon, action_dim, feature_dim, has_log_prob = 4, 3, 8, False

    def encode(self, params, obs):
        return obs["state"]

    def sample(self, params, ctx, key, M, noise=None):
        noise = jax.random.normal(key, (M, 4, 3)) if noise is None else noise
        acts = jnp.tanh(noise + ctx[0])
        return Candidates(acts, jnp.concatenate([jnp.broadcast_to(ctx, (M, 4)),
                                                 0.1 * acts.reshape(M, -1)[:, :4]], -1))


def stand_in_data(n):
    rng = np.random.default_rng(1)
    return {"obs": {"state": rng.normal(size=(n, 4)).astype(np.float32)},
            "actions": rng.uniform(-1, 1, (n, 4, 3)).astype(np.float32),
            "valid": np.ones((n, 4), bool)}


def test_feature_spread_is_the_sampling_std():
    data = stand_in_data(20)
    s = feature_spread(StandIn(), None, data, KEY, num_states=8, num_samples=64)
    assert s.shape == (8,)
    np.testing.assert_allclose(s[:4], 0.0, atol=1e-6)  # the state part does not vary
    assert np.all((s[4:] > 0.02) & (s[4:] < 0.1))  # 0.1 tanh(N(mu, 1)): std below 0.1


def test_fit_cfn_writes_count_check(tmp_path):
    data = stand_in_data(120)
    cfg = CFNConfig(hidden_dim=16, depth=1, output_dim=8, batch_size=32, epochs=2,
                    collect=CollectConfig(num_search=4, batch_states=40))
    fit_cfn(StandIn(), None, data, cfg, KEY, out_dir=str(tmp_path / "v"))
    info = json.load(open(tmp_path / "v" / "fit_info.json"))
    check = json.load(open(tmp_path / "v" / "count_check.json"))
    assert info["eval_loss"] == pytest.approx(info["eval_ff"] - 2 * info["eval_fc"] + 1,
                                              abs=1e-4)
    assert info["count_check_passed"] == check["passed"]
    # 120 features: 2 variants x 6 ks x 5 groups held out (at most half).
    assert check["groups_per_k"] == 5 and check["num_features"] == 120
    assert check["perturbed"]["perturb_std_rms"] > 0
    fit_cfn(StandIn(), None, data, replace(cfg, count_check=False), KEY,
            out_dir=str(tmp_path / "w"))
    assert not (tmp_path / "w" / "count_check.json").exists()
    assert "count_check_passed" not in json.load(open(tmp_path / "w" / "fit_info.json"))

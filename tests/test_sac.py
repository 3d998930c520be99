"""SAC with the RLPD ingredients: the subset-min target's law on a known ensemble, symmetric
sampling's composition, the device buffer's writes (mask, wrap-around), the residual
composition, Q on tiny MDPs with known values, the actor's optimum on a bandit, Cal-QL's
conservative term, determinism."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algos.sac import (
    SACConfig,
    act,
    buffer_add,
    buffer_init,
    buffer_sample,
    compose,
    init_sac,
    offline_count,
    q_values,
    subset_min,
    symmetric_batch,
    train_steps,
)

SMALL = SACConfig(hidden=(64, 64), actor_hidden=(64, 64), num_critics=4, batch_size=64, utd=4,
                  critic_lr=1e-3, actor_lr=1e-3, temperature_lr=1e-3, init_temperature=0.1)


def transitions(state, action, reward, next_state, done, discount=0.9, base=None, mc=None):
    """Rows in ``algos.sac``'s batch layout; base actions zero unless given."""
    state = np.asarray(state, np.float32)
    action = np.asarray(action, np.float32).reshape(len(state), -1)
    base = np.zeros_like(action) if base is None else np.asarray(base, np.float32)
    n = len(state)
    return {"obs": {"state": state}, "next_obs": {"state": np.asarray(next_state, np.float32)},
            "base": base, "next_base": np.zeros_like(base), "action": action,
            "reward": np.asarray(reward, np.float32),
            "discount": np.full(n, discount, np.float32),
            "done": np.asarray(done, np.float32),
            "mc": np.full(n, -1e9, np.float32) if mc is None else np.asarray(mc, np.float32)}


def filled(rows: dict):
    n = len(jax.tree.leaves(rows)[0])
    return buffer_add(buffer_init(jax.tree.map(lambda x: x[0], rows), n), rows,
                      jnp.ones(n, bool))


def test_subset_min_has_the_law_of_the_minimum_of_a_random_pair():
    # critics valued 0..9; the minimum of 2 drawn without replacement is j with probability
    # (9 - j) / 45 (the other one is any of the 9 - j larger values)
    qs = jnp.arange(10.0)[:, None]
    draws = jax.vmap(lambda k: subset_min(qs, k, 2)[0])(
        jax.random.split(jax.random.key(0), 20000))
    freq = np.bincount(np.asarray(draws, int), minlength=10) / 20000
    expected = np.array([(9 - j) / 45 for j in range(10)])
    np.testing.assert_allclose(freq, expected, atol=0.012)
    assert freq[9] == 0.0
    # k = num_critics is the plain ensemble minimum; k = 1 the mean in expectation
    assert float(subset_min(qs, jax.random.key(1), 10)[0]) == 0.0
    ones = jax.vmap(lambda k: subset_min(qs, k, 1)[0])(jax.random.split(jax.random.key(2), 20000))
    assert abs(float(ones.mean()) - 4.5) < 0.1


def test_buffer_writes_valid_rows_in_order_and_wraps():
    buf = buffer_init({"x": jnp.zeros(2), "i": jnp.zeros((), jnp.int32)}, 5)
    rows = {"x": jnp.arange(8.0).reshape(4, 2), "i": jnp.arange(4)}
    buf = jax.jit(buffer_add)(buf, rows, jnp.array([True, False, True, True]))
    assert int(buf.size) == 3 and int(buf.insert_at) == 3
    np.testing.assert_array_equal(buf.data["i"][:3], [0, 2, 3])
    np.testing.assert_array_equal(buf.data["x"][1], [4.0, 5.0])
    # four more: two fill the tail, two overwrite the oldest rows
    buf = buffer_add(buf, {"x": jnp.zeros((4, 2)), "i": jnp.arange(10, 14)}, jnp.ones(4, bool))
    assert int(buf.size) == 5 and int(buf.insert_at) == 2
    np.testing.assert_array_equal(buf.data["i"], [12, 13, 3, 10, 11])
    # nothing valid changes nothing
    same = buffer_add(buf, {"x": jnp.ones((4, 2)), "i": jnp.arange(4)}, jnp.zeros(4, bool))
    np.testing.assert_array_equal(same.data["i"], buf.data["i"])
    assert int(same.size) == 5 and int(same.insert_at) == 2


def test_buffer_samples_only_filled_rows():
    buf = buffer_init({"i": jnp.zeros((), jnp.int32)}, 100)
    buf = buffer_add(buf, {"i": jnp.arange(1, 4)}, jnp.ones(3, bool))
    got = np.asarray(buffer_sample(buf, jax.random.key(0), 3000)["i"])
    assert set(got) == {1, 2, 3}
    assert np.all(np.abs(np.bincount(got)[1:] / 3000 - 1 / 3) < 0.04)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_symmetric_batch_takes_the_offline_share(ratio):
    off = filled({"src": jnp.zeros(10)})
    on = filled({"src": jnp.ones(10)})
    batch = symmetric_batch(off if ratio else None, on if ratio < 1 else None,
                            jax.random.key(0), 64, ratio)
    n_off = offline_count(64, ratio)
    assert n_off == round(64 * ratio)
    np.testing.assert_array_equal(batch["src"], [0.0] * n_off + [1.0] * (64 - n_off))


def test_compose_adds_the_scaled_residual_and_clips():
    base = jnp.array([0.0, 0.9, -0.9])
    delta = jnp.array([1.0, 1.0, -1.0])
    np.testing.assert_allclose(compose(base, delta, 0.5), [0.5, 1.0, -1.0])
    np.testing.assert_allclose(compose(base, delta, 0.0), base)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sac.num_min_critics"):
        SACConfig(num_critics=2, num_min_critics=3).validate()
    with pytest.raises(ValueError, match="pld.sac.offline_ratio"):
        SACConfig(offline_ratio=1.5).validate("pld.sac")
    with pytest.raises(ValueError, match="sac.hidden"):
        SACConfig(hidden=()).validate()
    with pytest.raises(ValueError, match="buffer capacity"):
        buffer_init({"x": jnp.zeros(1)}, 0)


def test_q_on_a_two_step_chain_matches_the_discounted_return():
    # s0 -> s1 -> end; reward 1 only on leaving s1, whatever the action; gamma 0.9 per
    # transition: Q(s0, .) = 0.9, Q(s1, .) = 1 for every action (no entropy in the backup)
    rng = np.random.default_rng(0)
    n = 512
    at_s1 = rng.random(n) < 0.5
    state = np.where(at_s1[:, None], [[0.0, 1.0]], [[1.0, 0.0]])
    next_state = np.where(at_s1[:, None], [[0.0, 0.0]], [[0.0, 1.0]])
    rows = transitions(state, rng.uniform(-1, 1, (n, 1)), at_s1.astype(float), next_state,
                       at_s1.astype(float), discount=0.9)
    cfg = replace(SMALL, backup_entropy=False, offline_ratio=1.0)
    st = init_sac(cfg, jax.tree.map(lambda x: x[0], rows["obs"]), 1, jax.random.key(0))
    st, info = train_steps(st, filled(rows), None, jax.random.key(1), 600, 1.0)
    probe = {"state": jnp.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)}
    q = q_values(st, probe, jnp.array([[-0.8], [0.0], [0.8]] * 2)).mean(0)
    np.testing.assert_allclose(q, [0.9] * 3 + [1.0] * 3, atol=0.05)


def test_the_actor_finds_the_bandit_optimum_through_the_residual():
    # one step, reward -(a - 0.5)^2 with a = clip(b + xi a_delta); b = -0.2, xi = 1: the best
    # residual is 0.7, so the deterministic executed action should come near 0.5
    rng = np.random.default_rng(0)
    n = 2048
    a = rng.uniform(-1, 1, (n, 1))
    rows = transitions(np.ones((n, 1)), a, -(a[:, 0] - 0.5) ** 2, np.ones((n, 1)), np.ones(n),
                       base=np.full((n, 1), -0.2))
    st = init_sac(SMALL, {"state": jnp.ones(1)}, 1, jax.random.key(0))
    st, info = train_steps(st, filled(rows), None, jax.random.key(1), 800, 1.0, offline_ratio=1.0)
    got = act(st, {"state": jnp.ones((1, 1))}, jnp.full((1, 1), -0.2), jax.random.key(2), 1.0,
              deterministic=True)
    assert abs(float(got[0, 0]) - 0.5) < 0.1, float(got[0, 0])
    q = q_values(st, {"state": jnp.ones((3, 1))}, jnp.array([[-0.5], [0.5], [1.0]])).mean(0)
    np.testing.assert_allclose(q, [-1.0, 0.0, -0.25], atol=0.1)


def test_the_conservative_term_lowers_q_away_from_the_data():
    # data only at a = 0.5 with reward 0: plain TD leaves Q near 0 everywhere it generalises;
    # Cal-QL's term (no calibration floor: mc far below) pushes Q at other actions below Q(0.5)
    n = 512
    rows = transitions(np.ones((n, 1)), np.full((n, 1), 0.5), np.zeros(n), np.ones((n, 1)),
                       np.ones(n), mc=np.full(n, -100.0))
    obs = {"state": jnp.ones(1)}
    q_at = {}
    for alpha in (0.0, 1.0):
        cfg = replace(SMALL, cql_alpha=alpha, offline_ratio=1.0)
        st, _ = train_steps(init_sac(cfg, obs, 1, jax.random.key(0)), filled(rows), None,
                            jax.random.key(1), 300, 1.0, train_actor=False)
        q = q_values(st, {"state": jnp.ones((2, 1))}, jnp.array([[0.5], [-0.9]])).mean(0)
        q_at[alpha] = np.asarray(q)
    assert q_at[1.0][1] < q_at[1.0][0] - 0.2, q_at
    assert abs(q_at[1.0][0]) < 0.1  # the data's value stays where TD puts it


def test_training_is_deterministic_under_a_fixed_key():
    rows = transitions(np.ones((64, 1)), np.zeros((64, 1)), np.ones(64), np.ones((64, 1)),
                       np.ones(64))
    runs = []
    for _ in range(2):
        st = init_sac(SMALL, {"state": jnp.ones(1)}, 1, jax.random.key(3))
        st, _ = train_steps(st, filled(rows), filled(rows), jax.random.key(4), 5, 0.5)
        runs.append(jax.tree.leaves((st.critic.params, st.actor.params, st.log_temperature)))
    for x, y in zip(*runs, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

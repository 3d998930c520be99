"""Cal-QL over chunks: the calibration floor on hand-made episodes, the tanh-Gaussian density,
Q on tiny MDPs with known values, the calibration property against plain CQL, determinism."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algos.calql import (
    CalQLConfig,
    init_calql,
    mc_returns,
    pi_samples,
    prepare,
    q_values,
    sample_actions,
    tanh_gaussian,
    train_calql,
)

SMALL = CalQLConfig(hidden=(64, 64), actor_hidden=(64, 64), batch_size=64, warmup=0,
                    critic_lr=1e-3, actor_lr=1e-3, steps=2000, updates_per_call=500)


def rows(state, action, reward, next_state, done, discount=0.9, episode=None, decision=None):
    """Transitions (the ``envs.transitions`` layout) from per-row arrays; one decision per
    episode unless ``episode``/``decision`` say otherwise."""
    n = len(reward)
    episode = np.arange(n) if episode is None else np.asarray(episode)
    decision = np.zeros(n, int) if decision is None else np.asarray(decision)
    reward = np.asarray(reward, np.float32)
    return {"obs": {"state": np.asarray(state, np.float32)},
            "next_obs": {"state": np.asarray(next_state, np.float32)},
            "chunk": np.asarray(action, np.float32).reshape(n, 1, -1),
            "reward": reward, "discount": np.full(n, discount, np.float32),
            "done": np.asarray(done, bool), "truncated": ~np.asarray(done, bool),
            "return_to_go": reward.copy(), "episode": episode, "decision_index": decision}


def test_mc_returns_known_answer():
    # episode 0 succeeds at its 3rd decision (rewards 0, 0, 1), episode 1 never succeeds
    tr = {"episode": np.array([0, 0, 0, 1, 1]), "decision_index": np.array([0, 1, 2, 0, 1]),
          "done": np.array([0, 0, 1, 0, 0], bool), "discount": np.full(5, 0.5, np.float32),
          "return_to_go": np.array([0.25, 0.5, 1.0, 0.0, 0.0], np.float32)}
    np.testing.assert_allclose(mc_returns(tr, 1.0, 0.0), [0.25, 0.5, 1.0, 0.0, 0.0])
    # r' = 10 r - 1: episode 0 rewards -1, -1, 9 -> G = -1 - 0.5 + 9 * 0.25, ...; episode 1
    # rewards -1 forever -> -1 / (1 - 0.5)
    np.testing.assert_allclose(mc_returns(tr, 10.0, -1.0),
                               [-1.5 + 2.25, -1 + 4.5, 9.0, -2.0, -2.0], rtol=1e-6)


def test_tanh_gaussian_log_density_by_change_of_variables():
    mean, log_std = jnp.array([[0.3, -1.0]]), jnp.array([[-0.5, 0.2]])
    a, logp = tanh_gaussian(mean, log_std, jax.random.PRNGKey(0))
    u, std = np.arctanh(np.asarray(a, np.float64)), np.exp(np.asarray(log_std, np.float64))
    normal = -0.5 * ((u - np.asarray(mean)) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi))
    expected = np.sum(normal - np.log(1 - np.tanh(u) ** 2), -1)
    np.testing.assert_allclose(logp, expected, rtol=1e-4)
    assert np.all(np.abs(np.asarray(a)) < 1)


def test_bandit_q_without_conservatism_is_the_reward():
    """One state, one step: Q*(a) = r(a) = a on data actions uniform in [-0.9, 0.9]. With
    alpha = 0 the learned Q is within 5% of the return range of Q*."""
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.9, 0.9, (2000, 1))
    tr = rows(np.ones((2000, 1)), a, a[:, 0], np.ones((2000, 1)), np.ones(2000))
    state, _ = train_calql(tr, replace(SMALL, alpha=0.0), jax.random.PRNGKey(0))
    grid = jnp.linspace(-0.8, 0.8, 9)[:, None]
    q = np.asarray(q_values(state, {"state": jnp.ones((9, 1))}, grid))  # [critics, 9]
    assert np.max(np.abs(q - np.asarray(grid[:, 0]))) <= 0.05 * 1.8, q


def test_chain_q_bootstraps_through_the_next_decision():
    """s0 -> s1 -> end, reward 0 then 1, per-decision discount 0.9: Q*(s0, .) = 0.9 and
    Q*(s1, .) = 1 for every action (alpha = 0; within 5% of the return range)."""
    rng = np.random.default_rng(1)
    n = 2000
    s0, s1 = np.tile([1.0, 0.0], (n, 1)), np.tile([0.0, 1.0], (n, 1))
    a = rng.uniform(-1, 1, (2 * n, 1))
    tr = rows(np.concatenate([s0, s1]), a, np.r_[np.zeros(n), np.ones(n)],
              np.concatenate([s1, s1]), np.r_[np.zeros(n), np.ones(n)],
              episode=np.r_[np.arange(n), np.arange(n)], decision=np.r_[np.zeros(n), np.ones(n)])
    state, _ = train_calql(tr, replace(SMALL, alpha=0.0, steps=3000), jax.random.PRNGKey(0))
    grid = jnp.linspace(-0.9, 0.9, 7)[:, None]
    for s, want in (([1.0, 0.0], 0.9), ([0.0, 1.0], 1.0)):
        q = np.asarray(q_values(state, {"state": jnp.tile(jnp.array(s), (7, 1))}, grid))
        assert np.max(np.abs(q - want)) <= 0.05, (s, q)


def calibration_data(n=2000, low=0.0, high=0.8, dim=1):
    """One state; the behaviour's actions uniform in [low, high]^dim and every episode a
    success (reward 1 at its one decision), so the MC return-to-go is 1 everywhere."""
    a = np.random.default_rng(2).uniform(low, high, (n, dim))
    return rows(np.ones((n, 1)), a, np.ones(n), np.ones((n, 1)), np.ones(n))


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", [True, False])
def test_calibrated_q_at_policy_actions_stays_above_the_mc_return_and_cql_does_not(calibrated):
    """alpha = 5: Cal-QL keeps the mean Q at its actor's own actions at or above the MC return
    (1) and the share of floored values (bound_rate) falls from the first training call to the
    last; plain CQL ends below the MC return at the same actions."""
    cfg = replace(SMALL, alpha=5.0, calibrated=calibrated, steps=3000)
    state, hist = train_calql(calibration_data(), cfg, jax.random.PRNGKey(0))
    obs = {"state": jnp.ones((256, 1))}
    a, _ = sample_actions(state, obs, jax.random.PRNGKey(5), 8)
    q_pi = float(jnp.mean(jax.vmap(lambda x: q_values(state, obs, x))(a)))
    print(calibrated, q_pi, [(h["step"], h["bound_rate"]) for h in hist])
    if calibrated:  # measured: 1.008, bound_rate 0.133 -> 0.100
        assert q_pi >= 1.0 and hist[-1]["bound_rate"] < hist[0]["bound_rate"]
    else:  # measured: 0.809, bound_rate 0.307 -> 0.842
        assert q_pi < 0.95 and hist[-1]["bound_rate"] > hist[0]["bound_rate"]


def with_bank(tr, bank_action):
    """The base policy's candidates: the same fixed chunk, 4 copies, at every s and s'."""
    n = len(tr["reward"])
    bank = np.broadcast_to(np.float32(bank_action), (n, 4, 1, len(bank_action))).copy()
    return {**tr, "base_chunks": bank, "base_next_chunks": bank}


def test_base_samples_are_drawn_from_each_rows_own_bank():
    tr = calibration_data(8, dim=2)
    tr["base_chunks"] = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 1, 2)
    tr["base_next_chunks"] = -tr["base_chunks"]
    cfg = replace(SMALL, policy_samples="base", importance_sampling=False)
    data = prepare(tr, cfg)
    state = init_calql(cfg, data, jax.random.PRNGKey(0))
    a, logp = pi_samples(state, data, "obs", jax.random.PRNGKey(1), 5)
    assert a.shape == (5, 8, 2) and logp is None
    for j in range(5):
        for b in range(8):  # every draw is one of its own row's candidates
            assert any(np.array_equal(a[j, b], c) for c in data["base"][b]), (j, b)
    a_next, _ = pi_samples(state, data, "next_obs", jax.random.PRNGKey(1), 5)
    np.testing.assert_array_equal(a_next, -a)


def test_conservatism_on_base_samples_lowers_q_at_those_chunks_only():
    """Bandit r(a) = a with data actions uniform in [-0.9, 0.9]; the base policy proposes only
    a = 0.5. Plain CQL (alpha = 1) on the base's samples lowers Q(0.5) relative to Q(-0.5)
    by more than the fitted-Q baseline (alpha = 0) does, and trains no actor."""
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.9, 0.9, (2000, 1))
    tr = with_bank(rows(np.ones((2000, 1)), a, a[:, 0], np.ones((2000, 1)), np.ones(2000)),
                   [0.5])
    base = replace(SMALL, policy_samples="base", importance_sampling=False, calibrated=False)
    grid = jnp.array([[0.5], [-0.5]])
    gaps = {}
    for alpha in (0.0, 1.0):
        state, _ = train_calql(tr, replace(base, alpha=alpha), jax.random.PRNGKey(0))
        q = np.asarray(q_values(state, {"state": jnp.ones((2, 1))}, grid)).mean(0)
        gaps[alpha] = q[0] - q[1]
        assert int(state.actor.step) == 0 and int(state.critic.step) == base.steps
    print(gaps)
    assert gaps[0.0] > 0.8  # the reward difference 1.0, within the fit's error
    assert gaps[1.0] < gaps[0.0] - 0.2  # measured: 1.00 -> -1.23


def test_same_seed_same_learner_and_config_validation():
    tr = calibration_data(256, dim=4)
    cfg = replace(SMALL, steps=20, updates_per_call=10)
    s1, h1 = train_calql(tr, cfg, jax.random.PRNGKey(3))
    s2, h2 = train_calql(tr, cfg, jax.random.PRNGKey(3))
    jax.tree.map(np.testing.assert_array_equal, s1.critic.params, s2.critic.params)
    assert h1 == h2
    data = prepare(tr, cfg)
    assert init_calql(cfg, data, jax.random.PRNGKey(0)).action_dim == 4
    for bad, field in [(dict(num_critics=0), "num_critics"), (dict(gamma=1.0), "gamma"),
                       (dict(alpha=-1.0), "alpha"), (dict(hidden=()), "hidden")]:
        with pytest.raises(ValueError, match=field):
            CalQLConfig(**bad)
    with pytest.raises(ValueError, match="policy_samples"):
        CalQLConfig(policy_samples="prior")
    with pytest.raises(ValueError, match="importance_sampling=false"):
        CalQLConfig(policy_samples="base")
    with pytest.raises(ValueError, match="base_chunks"):
        prepare(tr, replace(cfg, policy_samples="base", importance_sampling=False))

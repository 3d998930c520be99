"""The rollout harness: compiled vs Python-loop agreement, metrics, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from core.config import ConfigError
from core.stats import spearman
from envs import experts
from experiments.config import load_run_config
from experiments.harness import (
    EvalConfig,
    Setup,
    evaluate_compiled,
    rank_correlation,
    summarize,
)
from experiments.host_loop import evaluate_gym
from policies import ARConfig, make_policy
from policies.proposals import GRIP, check_proposal, propose
from verifiers.base import BuildContext
from verifiers.registry import make_verifier


def _setup(env, policy, verifier, **eval_kw):
    cfg = EvalConfig(timing_decisions=0, **eval_kw)
    oracle = make_verifier("oracle_sim", BuildContext(env=env, replan=cfg.replan))
    return Setup(env=env, policy=policy, verifier=verifier, cfg=cfg, oracle=oracle,
                 expert=experts)


def test_compiled_equals_python_loop(tiny):
    """Same seeds → same episodes, whether compiled (vmap+scan) or stepped in Python."""
    env, policy, params = tiny
    verifier = make_verifier("oracle_sim", BuildContext(env=env, replan=2))
    setup = _setup(env, policy, verifier, M=3, episodes=4, replan=2)
    compiled = evaluate_compiled(setup, params, None)
    gym_env = envs.TabletopGymEnv(task="reach", max_steps=12)
    looped = evaluate_gym(setup, gym_env, params, None)
    np.testing.assert_array_equal(compiled["success"], looped["success"])
    np.testing.assert_array_equal(compiled["length"], looped["length"])
    np.testing.assert_allclose(compiled["progress"], looped["progress"], atol=1e-5)


def test_records_and_summary(tiny):
    env, policy, params = tiny
    setup = _setup(env, policy, make_verifier("random"), M=2, episodes=3, replan=4)
    rec = evaluate_compiled(setup, params, None)
    n_dec = setup.num_decisions
    n_modes = len(experts.MODES["reach"])
    assert rec["success"].shape == (3,)
    assert rec["decisions/mode_weights"].shape == (3, n_dec, n_modes)
    np.testing.assert_allclose(rec["decisions/mode_weights"].sum(-1), 1.0, atol=1e-6)
    assert np.all(rec["decisions/oracle_gap"] >= -1e-6)  # the oracle's best is never beaten
    assert np.all((rec["length"] >= 1) & (rec["length"] <= 12))
    m = summarize(rec, experts.MODES["reach"])
    assert 0.0 <= m["success_ci_low"] <= m["success_rate"] <= m["success_ci_high"] <= 1.0
    assert abs(sum(m["mode_fraction"].values()) - 1.0) < 1e-6
    assert 0.0 <= m["wrong_block_rate"] <= 1.0
    assert sum(m["mode_shares_by_bin"]["decisions"]) == int(rec["decisions/alive"].sum())
    # Determinism: the same seed gives the same records.
    again = evaluate_compiled(setup, params, None)
    jax.tree.map(np.testing.assert_array_equal, rec, again)


def test_oracle_sim_beats_random_on_progress(tiny):
    """An oracle that simulates each candidate picks higher-progress chunks than chance."""
    env, policy, params = tiny
    out = {}
    for name in ("random", "oracle_sim"):
        v = make_verifier(name, BuildContext(env=env, replan=4))
        out[name] = evaluate_compiled(_setup(env, policy, v, M=8, episodes=16, replan=4),
                                      params, None)
    assert out["oracle_sim"]["progress"].mean() > out["random"]["progress"].mean()
    assert out["oracle_sim"]["decisions/oracle_gap"].max() < 1e-5


def test_rank_correlation_known_answers():
    x = np.array([0.3, -1.0, 2.0, 0.5, 0.1], np.float32)
    assert float(rank_correlation(x, 2 * x + 1)) == pytest.approx(1.0)
    assert float(rank_correlation(x, -(x**3))) == pytest.approx(-1.0)
    assert float(rank_correlation(x, np.ones(5, np.float32))) == 0.0
    y = np.random.default_rng(0).normal(size=(2, 40)).astype(np.float32)
    assert float(rank_correlation(y[0], y[1])) == pytest.approx(spearman(y[0], y[1]), abs=1e-5)


def test_score_distance_rho_is_minus_one_for_the_expert_distance_oracle(tiny):
    """oracle_action scores by -distance to the pi* chunk, the very distance the harness ranks
    against, so its rho is exactly -1 at every decision; random's is near 0 on average."""
    env, policy, params = tiny
    rho = {}
    for name in ("oracle_action", "random"):
        rec = evaluate_compiled(_setup(env, policy, make_verifier(name), M=6, episodes=8),
                                params, None)
        rho[name] = summarize(rec)["score_distance_rho"]
    assert rho["oracle_action"] == pytest.approx(-1.0, abs=1e-5)
    assert abs(rho["random"]) < 0.25


@pytest.mark.parametrize("override, match", [
    ("verifier.name=best", "unknown verifier 'best'; known:"),
    ("eval.M=0", "eval.M must be >= 1"),
    ("eval.replan=-2", "eval.replan must be >= 1"),
    ("eval.replan=99", "eval.replan must be <= the policy's chunk length"),
    ("eval.selection=top", "eval.selection must be one of"),
    ("eval.proposal=beam", r"eval.proposal must be one of \('policy', 'gaussian'\)"),
    ("task=stack", "task must be one of"),
])
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(None, [override])


def test_unknown_config_field_names_it():
    with pytest.raises(ConfigError, match=r"unknown field eval\.horizon.*allowed"):
        load_run_config(None, ["eval.horizon=3"])


def test_sft_eval_is_the_harness_m1(tiny):
    """SFT's in-training success is measured on the harness's initial states and decision keys,
    so the two "M = 1 success" figures are the same number, episode for episode."""
    from algos.sft import rollout_success

    env, policy, params = tiny
    setup = _setup(env, policy, make_verifier("random"), M=1, episodes=16, replan=2, seed=7)
    harness = evaluate_compiled(setup, params, None)
    sft = rollout_success(env, policy, params, seed=7, episodes=16, replan=2)
    assert float(sft["success_rate"]) == pytest.approx(harness["success"].mean())
    assert float(sft["progress"]) == pytest.approx(harness["progress"].mean(), abs=1e-6)
    # a different seed draws other states: the figure is not seed-blind
    other = rollout_success(env, policy, params, seed=8, episodes=16, replan=2)
    assert float(other["progress"]) != pytest.approx(float(sft["progress"]), abs=1e-6)


@dataclasses.dataclass(frozen=True)
class NaNFirstCandidate:
    """A broken policy: candidate 0 of every decision is all NaN."""

    base: object

    def __getattr__(self, name):
        return getattr(self.base, name)

    def sample(self, params, context, key, M):
        cands = self.base.sample(params, context, key, M)
        return cands.replace(actions=cands.actions.at[0].set(jnp.nan))


def test_nan_candidates_are_executed_safely_and_counted(tiny):
    """The compiled evaluation cannot raise: a NaN chunk is executed as the env's safe value
    (no motion, grip unchanged), the episodes finish with finite states, and the count of
    NaN steps is exactly the steps executed from candidate 0."""
    env, policy, params = tiny
    setup = _setup(env, NaNFirstCandidate(policy), make_verifier("random"), M=2, episodes=8,
                   replan=4)
    rec = evaluate_compiled(setup, params, None)
    assert np.all(np.isfinite(rec["progress"])) and np.all(rec["length"] >= 1)
    start = np.arange(setup.num_decisions) * 4  # first step of each decision
    executed = np.clip(rec["length"][:, None] - start[None], 0, 4) * rec["decisions/alive"]
    expected = (executed * (rec["decisions/index"] == 0)).sum(1)
    np.testing.assert_array_equal(rec["nonfinite_actions"], expected)
    assert 0 < summarize(rec)["nonfinite_actions"] == expected.sum()


def test_plain_proposal_is_the_policy_sample_and_gaussian_draws_follow_the_fit(tiny):
    env, policy, params = tiny
    _, obs = env.reset(jax.random.PRNGKey(3))
    ctx, key = policy.encode(params, obs), jax.random.PRNGKey(4)
    plain = propose(policy, params, ctx, key, 5)
    np.testing.assert_array_equal(plain.actions, policy.sample(params, ctx, key, 5).actions)
    g = propose(policy, params, ctx, key, 64, "gaussian", samples=3)
    k_base, _, k_feat = jax.random.split(key, 3)
    base = policy.sample(params, ctx, k_base, 3).actions
    assert g.actions.shape == (64, policy.horizon, policy.action_dim) and g.log_prob is None
    vote = np.where((np.asarray(base[..., GRIP]) > 0).mean(0) >= 0.5, 1.0, -1.0)
    np.testing.assert_array_equal(g.actions[..., GRIP], np.broadcast_to(vote, (64, 4)))
    # the draws spread around the base samples' mean, within the clip
    assert float(jnp.abs(g.actions[..., :GRIP].mean(0) - base[..., :GRIP].mean(0)).max()) < 0.3
    np.testing.assert_allclose(g.features,
                               policy.one_step_features(params, ctx, g.actions, k_feat),
                               rtol=1e-5, atol=1e-6)
    off = propose(policy, params, ctx, key, 64, "gaussian", samples=3, features=False)
    np.testing.assert_array_equal(off.actions, g.actions)
    assert not np.any(off.features)


def test_gaussian_proposal_runs_in_the_harness_and_refuses_what_cannot_work(tiny):
    env, policy, params = tiny
    verifier = make_verifier("random")
    setup = _setup(env, policy, verifier, M=4, episodes=3, proposal="gaussian",
                   proposal_samples=2)
    rec = evaluate_compiled(setup, params, None)
    assert rec["success"].shape == (3,)
    with pytest.raises(ValueError, match="no log-probability"):
        check_proposal("gaussian", policy, ("log_prob",))
    with pytest.raises(ValueError, match="proposal_samples must be an int >= 2"):
        EvalConfig(proposal="gaussian", proposal_samples=1).validate()
    ar = make_policy("autoregressive", ARConfig(width=16, depth=1, heads=2, horizon=4)
                     .with_spec(env.spec))
    with pytest.raises(ValueError, match="one_step_features"):
        check_proposal("gaussian", ar, ("features",))
    check_proposal("gaussian", ar, ())  # a verifier that reads no features is fine

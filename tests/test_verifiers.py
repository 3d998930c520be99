"""Registry, selection and the baseline verifiers, on hand-made candidate sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from policies.base import Candidates
from verifiers.base import BuildContext
from verifiers.registry import PLUGINS, known_verifiers, make_verifier, select

KEY = jax.random.PRNGKey(0)


def cands(actions, features=None, log_prob=None):
    actions = jnp.asarray(actions, jnp.float32)
    m = actions.shape[0]
    features = jnp.zeros((m, 4)) if features is None else jnp.asarray(features, jnp.float32)
    return Candidates(actions=actions, features=features, log_prob=log_prob)


def test_registry_round_trip():
    names = known_verifiers()
    for n in ["random", "consensus", "likelihood", "oracle_action", "oracle_sim", "cfn"]:
        assert n in names
    for n in ["random", "consensus", "likelihood", "oracle_action"]:
        v = make_verifier(n)
        assert v.name == n and isinstance(v.requires, tuple)
        assert type(v) is PLUGINS[n].verifier


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known:.*consensus"):
        make_verifier("nope")


def test_select_argmax_and_validation():
    s = jnp.array([0.1, 3.0, -2.0, 0.5])
    assert int(select(s, KEY)) == 1
    assert int(select(jnp.array([jnp.nan, 1.0, 0.0]), KEY)) == 1
    with pytest.raises(ValueError, match="mode"):
        select(s, KEY, mode="max")
    with pytest.raises(ValueError, match="temperature"):
        select(s, KEY, mode="softmax", temperature=0.0)


def test_select_ties_are_random_among_maxima():
    s = jnp.array([1.0, 0.0, 1.0, 1.0, -1.0])
    keys = jax.random.split(KEY, 600)
    picks = np.asarray(jax.vmap(lambda k: select(s, k))(keys))
    assert set(np.unique(picks)) == {0, 2, 3}
    counts = np.bincount(picks, minlength=5)[[0, 2, 3]]
    assert counts.min() > 150  # each ~200 of 600


def test_select_softmax_frequencies():
    s = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    keys = jax.random.split(KEY, 4000)
    picks = np.asarray(jax.jit(jax.vmap(lambda k: select(s, k, "softmax")))(keys))
    freq = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


def test_random_verifier_uniformish():
    v = make_verifier("random")
    c = cands(np.zeros((5, 2, 3)))
    keys = jax.random.split(KEY, 2000)
    picks = np.asarray(jax.vmap(lambda k: select(v.score(None, {}, c, k), k))(keys))
    freq = np.bincount(picks, minlength=5) / len(picks)
    assert np.all(np.abs(freq - 0.2) < 0.04), freq
    s1 = v.score(None, {}, c, KEY)
    assert s1.shape == (5,) and np.array_equal(s1, v.score(None, {}, c, KEY))


def test_consensus_picks_medoid():
    # Chunks at scalar offsets 0, 1, 2, 10 (all steps/dims): the medoid is offset 1.
    offsets = np.array([0.0, 1.0, 2.0, 10.0])
    acts = np.ones((4, 2, 3)) * offsets[:, None, None]
    v = make_verifier("consensus")
    s = np.asarray(v.score(None, {}, cands(acts), KEY))
    # Known answer: distance between offsets a, b is |a-b|*sqrt(6); score = -mean over others.
    ref = -np.array([np.mean([abs(a - b) for b in offsets if b != a]) for a in offsets])
    np.testing.assert_allclose(s, ref * np.sqrt(6), rtol=1e-5)
    assert int(select(jnp.asarray(s), KEY)) == 1


def test_oracle_action_picks_nearest_to_expert():
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, (6, 4, 3))
    expert = acts[4] + 0.01
    v = make_verifier("oracle_action")
    s = v.score(None, {"expert_chunk": jnp.asarray(expert, jnp.float32)}, cands(acts), KEY)
    assert int(select(s, KEY)) == 4
    np.testing.assert_allclose(float(s[4]), -0.01 * np.sqrt(12), rtol=1e-3)
    with pytest.raises(ValueError, match="expert_chunk"):
        v.score(None, {}, cands(acts), KEY)


def test_likelihood():
    v = make_verifier("likelihood")
    lp = jnp.array([-3.0, -1.0, -2.0])
    assert int(select(v.score(None, {}, cands(np.zeros((3, 2, 3)), log_prob=lp), KEY), KEY)) == 1
    with pytest.raises(ValueError, match="log_prob"):
        v.score(None, {}, cands(np.zeros((3, 2, 3))), KEY)

    class NoLogProb:
        has_log_prob = False

    with pytest.raises(ValueError, match="has_log_prob"):
        make_verifier("likelihood", BuildContext(policy=NoLogProb()))


class LineEnv:
    """1-D functional stand-in: position += action[0]; success at pos >= 1; frozen after."""

    def step(self, state, action):
        done = state["done"]
        pos = jnp.where(done, state["pos"], state["pos"] + action[0])
        succ = pos >= 1.0
        new = {"pos": pos, "done": jnp.logical_or(done, succ)}
        info = {"success": new["done"], "progress": jnp.clip(pos, 0.0, 1.0)}
        return new, {"state": pos[None]}, succ.astype(jnp.float32), new["done"], info


def test_oracle_sim_ranks_success_then_progress():
    env = LineEnv()
    state = {"pos": jnp.asarray(0.0), "done": jnp.asarray(False)}
    # Per-step x-moves for 4 candidates over H=4 steps (actions [M, H, A=3]).
    moves = np.array([
        [0.1, 0.1, 0.1, 0.1],  # progress 0.4
        [0.5, 0.6, -1.0, -1.0],  # succeeds at step 2, then frozen -> success
        [0.2, 0.2, 0.2, 0.2],  # progress 0.8
        [0.0, 0.0, 0.0, 0.9],  # progress 0.9 only at step 4
    ])
    acts = np.zeros((4, 4, 3))
    acts[..., 0] = moves
    v = make_verifier("oracle_sim", BuildContext(env=env))
    s = np.asarray(jax.jit(lambda o, c: v.score(None, o, c, KEY))({"env_state": state},
                                                                  cands(acts)))
    np.testing.assert_allclose(s, [0.4, 2.0, 0.8, 0.9], atol=1e-5)
    # With a replan horizon of 2 steps only the first two moves count.
    v2 = make_verifier("oracle_sim", BuildContext(env=env, replan=2))
    s2 = np.asarray(v2.score(None, {"env_state": state}, cands(acts), KEY))
    np.testing.assert_allclose(s2, [0.2, 2.0, 0.4, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="env"):
        make_verifier("oracle_sim")


def test_baselines_vmap_over_envs():
    v = make_verifier("consensus")
    acts = jax.random.normal(KEY, (3, 5, 2, 3))  # [B, M, H, A]
    feats = jnp.zeros((3, 5, 4))
    out = jax.jit(jax.vmap(lambda a, f: v.score(None, {}, Candidates(a, f), KEY)))(acts, feats)
    assert out.shape == (3, 5)

"""RoboMonkey's Bradley–Terry pieces: the margin loss and its gradient on hand-computed pairs,
the metrics, k-means and its representatives, the grip majority vote, the normalised RMSE, the
preference pairs, a linear judge learning a known score, the scan against a loop, determinism."""

import math
import os
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algos.bradley_terry import (
    BTConfig,
    evaluate,
    gap_correlation,
    init_bt,
    pair_losses,
    pairwise_accuracy,
    preference_loss,
    train_bt,
    train_steps,
    update,
)
from policies.base import Candidates
from policies.proposals import GRIP, gaussian_proposals, majority_vote
from verifiers.base import BuildContext
from verifiers.bradley_terry import (
    BradleyTerryConfig,
    BradleyTerryVerifier,
    JudgeConfig,
    heldout_metrics,
    make_judge,
)
from verifiers.preferences import (
    dataset_scale,
    kmeans,
    kmeans_representatives,
    label_predictability,
    normalised_rmse,
    preference_pairs,
    synthetic_preferences,
)

sigmoid = lambda z: 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("r_w, r_l, e_w, e_l, alpha, logit, dlogit", [
    # right order: gap d = 0.5, Δ* = 0.8; logit = 0.5 - 0.1 (0.8 - 0.5)^2 = 0.491;
    # d logit / d r_W = 1 + 2 α (Δ* - |d|) sign(d) = 1 + 0.2 * 0.3 = 1.06
    (1.0, 0.5, 0.2, 1.0, 0.1, 0.491, 1.06),
    (1.0, 0.5, 0.2, 1.0, 0.0, 0.5, 1.0),
    # wrong order: d = -0.4, Δ* = 0.2; logit = -0.4 - 0.1 (0.2 - 0.4)^2 = -0.404;
    # d logit / d r_W = 1 + 2 * 0.1 * (0.2 - 0.4) * (-1) = 1.04
    (0.0, 0.4, 0.1, 0.3, 0.1, -0.404, 1.04),
    (0.0, 0.4, 0.1, 0.3, 0.0, -0.4, 1.0),
])
def test_loss_and_gradient_on_hand_computed_pairs(r_w, r_l, e_w, e_l, alpha, logit, dlogit):
    # loss = -log σ(z) = log(1 + e^-z); d loss / d z = -σ(-z); d z / d r_L = -d z / d r_W
    want = math.log1p(math.exp(-logit))
    args = [jnp.array([v], jnp.float32) for v in (r_w, r_l, e_w, e_l)]
    loss = preference_loss(*args, alpha)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    g_w, g_l = jax.grad(lambda a, b: preference_loss(a, b, *args[2:], alpha), (0, 1))(*args[:2])
    np.testing.assert_allclose(float(g_w[0]), -sigmoid(-logit) * dlogit, rtol=1e-5)
    np.testing.assert_allclose(float(g_l[0]), sigmoid(-logit) * dlogit, rtol=1e-5)


def test_alpha_zero_is_plain_bradley_terry_and_mean_weighs_valid_pairs():
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    r_w, r_l, e_w, e_l = (jax.random.normal(k, (32,)) * 3 for k in key)
    np.testing.assert_allclose(pair_losses(r_w, r_l, e_w, e_l, 0.0),
                               np.log1p(np.exp(-np.asarray(r_w - r_l, np.float64))), rtol=1e-5)
    valid = jnp.arange(32) < 10
    np.testing.assert_allclose(preference_loss(r_w, r_l, e_w, e_l, 0.1, valid),
                               pair_losses(r_w, r_l, e_w, e_l, 0.1)[:10].mean(), rtol=1e-6)
    # log_sigmoid keeps a hopelessly wrong pair finite (naive log(σ(-200)) is -inf in f32)
    assert np.isfinite(float(preference_loss(jnp.array([-200.0]), jnp.array([0.0]),
                                             jnp.array([0.0]), jnp.array([1.0]))))


def test_the_margin_loss_is_minimised_at_the_rmse_gap_plus_one_over_two_alpha():
    """d loss / d d = 0 where 1 - 2 α (d - Δ*) = 0: the per-pair optimum gap is Δ* + 1/(2α),
    so α = 0.1 asks for gaps of Δ* + 5 (a target dominated by its offset when Δ* << 5)."""
    for alpha, dstar in ((0.1, 0.3), (1.0, 0.3), (0.5, 2.0)):
        grad = jax.grad(lambda d, a=alpha, s=dstar: preference_loss(
            d, jnp.zeros(1), jnp.zeros(1), jnp.full(1, s), a))
        d_opt = dstar + 1 / (2 * alpha)
        at = lambda d, g=grad: float(g(jnp.array([d]))[0])
        assert abs(at(d_opt)) < 1e-6
        assert at(d_opt - 0.1) < 0 < at(d_opt + 0.1)


def test_accuracy_and_gap_correlation_known_answers():
    r_w, r_l = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 1.0])
    e_w, e_l = jnp.array([0.0, 0.0, 0.0]), jnp.array([2.0, 0.0, 5.0])  # RMSE gaps 2, 0, 5
    assert float(pairwise_accuracy(r_w, r_l)) == pytest.approx(2 / 3)
    valid = jnp.array([True, True, False])
    assert float(pairwise_accuracy(r_w, r_l, valid)) == pytest.approx(0.5)
    # gaps (1, -1, 1) against (2, 0, 5); on the first two, both are exactly linear: corr 1
    want = np.corrcoef([1, -1, 1], [2, 0, 5])[0, 1]
    assert float(gap_correlation(r_w, r_l, e_w, e_l)) == pytest.approx(want, rel=1e-5)
    assert float(gap_correlation(r_w, r_l, e_w, e_l, valid)) == pytest.approx(1.0, rel=1e-5)
    assert float(gap_correlation(r_w, r_w + 1.0, e_w, e_l)) == 0.0  # no spread in the gaps


@pytest.mark.parametrize("field, value", [("alpha", -0.1), ("alpha", float("nan")), ("lr", 0.0),
                                          ("steps", 0), ("batch_size", 0), ("warmup", -1),
                                          ("updates_per_call", 1.5), ("weight_decay", -1.0)])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"BTConfig.{field}"):
        BTConfig(**{field: value})


@pytest.mark.parametrize("field, value, match", [
    ("reference", "expert", r"reference must be one of \('dataset', 'pi_star'\)"),
    ("predictability_samples", -1, "predictability_samples must be an int >= 0"),
    ("representatives", 17, r"representatives must be in \[2, samples=16\]"),
    ("heldout", 1.0, r"heldout must be in \[0, 1\)")])
def test_verifier_config_rejects_bad_values_by_name(field, value, match):
    with pytest.raises(ValueError, match=f"verifier bradley_terry: {match}"):
        BradleyTerryConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# preference construction


def blobs(key, centres, n=20, std=0.3):
    """n points around each centre [C, D] -> (points [C n, D], true cluster [C n])."""
    centres = jnp.asarray(centres, jnp.float32)
    noise = std * jax.random.normal(key, (len(centres), n, centres.shape[1]))
    truth = np.repeat(np.arange(len(centres)), n)
    return (centres[:, None] + noise).reshape(-1, centres.shape[1]), truth


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_well_separated_centres_and_assignments(seed):
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points, truth = blobs(jax.random.PRNGKey(100 + seed), centres)
    c, assign = kmeans(points, 3, jax.random.PRNGKey(seed))
    # each true centre has exactly one recovered centroid within 0.3, and the labels agree up
    # to that permutation
    perm = np.argmin(((centres[:, None] - np.asarray(c)[None]) ** 2).sum(-1), 1)
    assert sorted(perm) == [0, 1, 2]
    np.testing.assert_allclose(np.asarray(c)[perm], centres, atol=0.3)
    np.testing.assert_array_equal(np.asarray(assign), perm[truth])
    # the centroids are the means of their members (a Lloyd fixed point)
    for k in range(3):
        np.testing.assert_allclose(c[k], points[np.asarray(assign) == k].mean(0), atol=1e-5)


def test_representatives_are_the_members_nearest_their_centroids():
    points, _ = blobs(jax.random.PRNGKey(7), [[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], n=12, std=1.0)
    key = jax.random.PRNGKey(3)  # overlapping blobs (std 1, 4 apart) and the random init
    rep, assign = kmeans_representatives(points, 3, key, init="random")
    c, _ = kmeans(points, 3, key, init="random")
    rep, assign, p, c = (np.asarray(x) for x in (rep, assign, points, c))
    for k in range(3):
        members = np.flatnonzero(assign == k)
        assert assign[rep[k]] == k
        assert rep[k] == members[np.argmin(((p[members] - c[k]) ** 2).sum(-1))]


def test_duplicate_samples_give_an_empty_cluster_its_old_centroid_and_tied_pairs():
    """Two distinct chunks, each sampled 3 times, clustered to K = 3: no NaN, one cluster is
    empty and keeps a centroid on a sample, its representative duplicates another, and the
    pair of the two duplicates is flagged a tie."""
    a, b = jnp.full((1, 2), 0.2), jnp.full((1, 2), 0.9)  # chunks [H=1, A=2]
    samples = jnp.stack([a, a, a, b, b, b])  # [6, 1, 2]
    flat = samples.reshape(6, -1)
    c, assign = kmeans(flat, 3, jax.random.PRNGKey(0))
    assert np.all(np.isfinite(np.asarray(c)))
    assert {tuple(round(float(v), 5) for v in x) for x in c} == {(0.2, 0.2), (0.9, 0.9)}
    assert len(set(np.asarray(assign).tolist())) == 2
    pairs = synthetic_preferences(samples, jnp.zeros((1, 2)), jnp.ones(2), jax.random.PRNGKey(0),
                                  K=3)
    assert int((~pairs["valid"]).sum()) == 1  # the duplicated pair; the other two are real
    ok = np.asarray(pairs["valid"])
    np.testing.assert_allclose(np.asarray(pairs["e_w"])[ok], 0.2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pairs["e_l"])[ok], 0.9, rtol=1e-6)


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(ValueError, match="K must be"):
        kmeans(jnp.zeros((3, 2)), 4, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans(jnp.zeros((3, 2)), 2, jax.random.PRNGKey(0), init="forgy")
    with pytest.raises(ValueError, match="iters must be"):
        kmeans(jnp.zeros((3, 2)), 2, jax.random.PRNGKey(0), iters=-1)


def test_majority_vote_small_cases_and_tie_rule():
    votes = jnp.array([[1, -1, 1], [1, 1, -1], [-1, -1, 1]])  # on-counts 2, 1, 2 of 3
    np.testing.assert_array_equal(majority_vote(votes), [True, False, True])
    # tie rule: exactly half on -> on (closed)
    np.testing.assert_array_equal(majority_vote(jnp.array([[1, -1], [-1, -1]])), [True, False])
    np.testing.assert_array_equal(majority_vote(jnp.array([[True], [False], [False]])), [False])
    np.testing.assert_array_equal(majority_vote(jnp.array([[0, 1], [1, 1]])), [True, True])
    # the Gaussian proposal's grip is that vote, at every step of every draw, ties included
    samples = jnp.sign(jax.random.normal(jax.random.PRNGKey(2), (4, 16, 3)))  # N̂ = 4: ties
    drawn = gaussian_proposals(samples, jax.random.PRNGKey(3), 5)
    want = np.where(majority_vote(samples[..., GRIP]), 1.0, -1.0)
    np.testing.assert_array_equal(drawn[..., GRIP], np.broadcast_to(want, (5, 16)))


def test_gaussian_proposal_recovers_a_known_mean_and_std():
    """N̂ samples from N(μ, σ²) per dim: the proposal's draws have μ and σ (within sampling
    error) on the continuous dims and the voted grip."""
    mu = jnp.array([[0.3, -0.2, 0.0], [-0.4, 0.1, 0.0]])  # [H = 2, A = 3]
    sigma = jnp.array([[0.05, 0.10, 1.0], [0.02, 0.20, 1.0]])
    k_s, k_d = jax.random.split(jax.random.PRNGKey(0))
    samples = mu + sigma * jax.random.normal(k_s, (4000, 2, 3))
    samples = samples.at[..., GRIP].set(jnp.where(jnp.arange(4000)[:, None] % 3 == 0, 1.0, -1.0))
    drawn = gaussian_proposals(samples, k_d, 4000)
    cont = slice(0, GRIP)
    np.testing.assert_allclose(drawn[..., cont].mean(0), mu[:, cont], atol=0.02)
    np.testing.assert_allclose(drawn[..., cont].std(0), sigma[:, cont], rtol=0.08)
    np.testing.assert_array_equal(drawn[..., GRIP], -1.0)  # one in three closed: open wins


def test_normalised_rmse_hand_case():
    chunk, ref = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros((2, 2))
    # scaled differences (1, 1), (3, 2): per-step mean squares 1 and 6.5
    assert float(normalised_rmse(chunk, ref, jnp.array([1.0, 2.0]))) == pytest.approx(
        math.sqrt(3.75))
    assert float(normalised_rmse(chunk, ref, jnp.array([1.0, 2.0]),
                                 jnp.array([True, False]))) == pytest.approx(1.0)
    # per-dim std over valid steps only: dim 0 values (0, 2) -> std 1; dim 1 constant -> eps
    acts = jnp.array([[[0.0, 5.0], [2.0, 5.0], [100.0, 5.0]]])
    np.testing.assert_allclose(dataset_scale(acts, jnp.array([[True, True, False]]), 1e-3),
                               [1.0, 1e-3])


def test_preference_pairs_on_three_candidates():
    ref, scale = jnp.zeros((1, 1)), jnp.ones(1)
    out = preference_pairs(jnp.array([0.5, -0.2, 1.0])[:, None, None], ref, scale)
    # errors 0.5, 0.2, 1.0; pairs (0, 1), (0, 2), (1, 2)
    np.testing.assert_array_equal(out["win"], [1, 0, 1])
    np.testing.assert_array_equal(out["lose"], [0, 2, 2])
    np.testing.assert_allclose(out["e_w"], [0.2, 0.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(out["e_l"], [0.5, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(out["valid"], [True, True, True])
    tie = preference_pairs(jnp.array([0.3, -0.3, 0.1])[:, None, None], ref, scale)
    np.testing.assert_array_equal(tie["valid"], [False, True, True])  # |0.3| == |-0.3|
    np.testing.assert_array_equal(tie["win"], [0, 2, 2])  # a tie keeps the lower index first


def test_label_predictability_counts_references_closer_to_the_winner():
    win, lose, scale = jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones(1)
    refs = jnp.array([0.1, 0.9, 0.5, 0.2])[:, None, None]  # 0.5 is equidistant: half a win
    assert float(label_predictability(win, lose, refs, scale)) == pytest.approx(2.5 / 4)
    # the reference's invalid steps are ignored, as in the errors that label the pair
    win2, lose2 = jnp.array([[0.0], [9.0]]), jnp.array([[1.0], [-9.0]])
    refs2 = jnp.concatenate([refs, jnp.full((4, 1, 1), -9.0)], 1)
    assert float(label_predictability(win2, lose2, refs2, scale, jnp.array([True, False]))
                 ) == pytest.approx(2.5 / 4)
    assert float(label_predictability(win2, lose2, refs2, scale)) == pytest.approx(0.0)


def test_heldout_ceiling_is_mean_max_p_over_valid_pairs():
    pairs = {"e_w": np.array([0.1, 0.1, 0.1]), "e_l": np.array([0.2, 0.5, 0.1]),
             "valid": np.array([True, True, False])}
    out = heldout_metrics(np.array([1.0, 1.0, 1.0]), np.array([0.0, 2.0, 0.0]), pairs, bins=1,
                          p_win=np.array([0.9, 0.2, 0.5]))
    assert out["accuracy"] == pytest.approx(0.5)  # the judge's score is x: right, wrong
    assert out["ceiling"] == pytest.approx((0.9 + 0.8) / 2)
    assert out["by_gap"][0]["ceiling"] == pytest.approx(0.85)


def test_synthetic_preferences_vmap_over_states_equals_a_loop():
    key = jax.random.PRNGKey(5)
    samples = jax.random.normal(key, (2, 16, 4, 3))  # [states, N, H, A]
    refs = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 3))
    keys = jax.random.split(key, 2)
    scale = jnp.array([1.0, 2.0, 0.5])
    batched = jax.vmap(lambda s, r, k: synthetic_preferences(s, r, scale, k, K=4))(
        samples, refs, keys)
    assert batched["win"].shape == (2, 6)
    for i in range(2):
        one = synthetic_preferences(samples[i], refs[i], scale, keys[i], K=4)
        for name in one:
            np.testing.assert_allclose(batched[name][i], one[name], rtol=1e-6)
        e = normalised_rmse(samples[i], refs[i], scale)
        np.testing.assert_allclose(one["e_w"], e[one["win"]], rtol=1e-6)
        assert np.all(np.asarray(one["e_w"]) <= np.asarray(one["e_l"]))
        assert len(set(np.asarray(one["rep"]).tolist())) == 4


# ---------------------------------------------------------------------------------------------
# learning


D = 8
linear = lambda p, x: x @ p["w"] + p["b"]


def score_pairs(key, n_items=400, n_pairs=2000):
    """Items x ~ N(0, I_8) with a known score s = u.x (u = 1/sqrt(8)), labelled by s; the RMSE
    e = exp(-s) falls with s, so its gaps vary (convex in s). The judge is linear in the
    feature (x, e): it can rank by x alone, or match the RMSE gaps exactly through e."""
    k_x, k_a, k_b = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (n_items, D))
    s = x @ jnp.full(D, 1 / math.sqrt(D))
    e = jnp.exp(-s)
    a, b = (jax.random.randint(k, (n_pairs,), 0, n_items) for k in (k_a, k_b))
    first = s[a] > s[b]
    win, lose = jnp.where(first, a, b), jnp.where(first, b, a)
    f = jnp.concatenate([x, e[:, None]], 1)
    return {"win": f[win], "lose": f[lose], "e_w": e[win], "e_l": e[lose], "valid": s[a] != s[b]}


def fresh():
    return {"w": jnp.zeros(D + 1), "b": jnp.zeros(())}


FAST = BTConfig(lr=1e-2, steps=1000, updates_per_call=500, batch_size=256)


@pytest.fixture(scope="module")
def held_out_metrics():
    train, test = score_pairs(jax.random.PRNGKey(0)), score_pairs(jax.random.PRNGKey(1))
    out = {}
    for alpha in (0.0, 0.1, 1.0):
        cfg = replace(FAST, alpha=alpha)
        state, _ = train_bt(linear, fresh(), train, cfg, jax.random.PRNGKey(0))
        out[alpha] = {k: float(v) for k, v in evaluate(state, test).items()}
    return out


def test_linear_judge_learns_the_known_order(held_out_metrics):
    for alpha, m in held_out_metrics.items():  # measured: 0.991, 0.990, 0.996
        assert m["accuracy"] > 0.9, (alpha, m)


def test_a_strong_margin_term_calibrates_the_gaps(held_out_metrics):
    """α = 1 (target gap Δ* + 0.5) correlates the predicted gaps with the RMSE gaps far better
    than plain BT (measured 0.982 against 0.879) and shrinks the gap scale. The released
    α = 0.1 does not, on this toy (0.855 against 0.879; over 3 data seeds and 2 error scales it
    won 2 of 6, by <= 0.015): its per-pair optimum, gap = Δ* + 1/(2α) = Δ* + 5, is dominated by
    the offset when RMSE gaps are much smaller than 5, so it mostly caps the score scale."""
    m0, m1 = held_out_metrics[0.0], held_out_metrics[1.0]
    assert m1["gap_corr"] > m0["gap_corr"] + 0.05, (m0, m1)
    assert m1["gap"] < m0["gap"]


SMALL = BTConfig(lr=1e-2, batch_size=32, steps=20, updates_per_call=10)


def test_train_steps_scan_equals_a_loop_of_updates():
    data = score_pairs(jax.random.PRNGKey(2), n_pairs=300)
    state = init_bt(linear, fresh(), SMALL)
    key = jax.random.PRNGKey(4)
    scanned, metrics = train_steps(state, data, key, 10)
    looped, losses, step = state, [], jax.jit(update)
    for k in jax.random.split(key, 10):
        idx = jax.random.randint(k, (32,), 0, 300)
        looped, info = step(looped, jax.tree.map(lambda x, idx=idx: x[idx], data))
        losses.append(info["loss"])
    for a, b in zip(jax.tree.leaves(scanned.train.params), jax.tree.leaves(looped.train.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
    assert int(scanned.train.step) == 10


def test_fixed_seed_training_is_deterministic():
    data = score_pairs(jax.random.PRNGKey(3), n_pairs=300)
    compiled = train_steps._cache_size()
    (s1, h1), (s2, h2) = (train_bt(linear, fresh(), data, SMALL) for _ in range(2))
    assert h1 == h2
    np.testing.assert_array_equal(s1.train.params["w"], s2.train.params["w"])
    s3, _ = train_bt(linear, fresh(), data, SMALL, jax.random.PRNGKey(99))
    assert train_steps._cache_size() <= compiled + 1  # three fits of one config: one trace
    assert not np.array_equal(s1.train.params["w"], s3.train.params["w"])


# ---------------------------------------------------------------------------------------------
# the judge


@dataclass(frozen=True)
class _PrefixFields:  # the observation fields of a policy config that the judge copies
    vocab_size: int = 10
    num_tasks: int = 2
    instruction_len: int = 4
    image: bool = False
    image_size: int = 64
    patch_size: int = 16
    state_groups: tuple = ()
    state_fourier: int = 0


def test_judge_scores_from_one_shared_prefix_equal_the_full_pass_per_candidate():
    """The verifier encodes the observation once and scores all M candidates against that
    cache; it must equal the uncached pass on the observation tiled M times."""
    net = make_judge(JudgeConfig(width=16, depth=2, heads=2), _PrefixFields(), 3)
    k_p, k_c = jax.random.split(jax.random.PRNGKey(0))
    obs = {"state": jnp.linspace(-1, 1, 5), "instruction": jnp.array([3, 7, 0, 0]),
           "task_id": jnp.array(1)}
    chunks = jax.random.normal(k_c, (6, 3, 2))
    tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (6, *x.shape)), obs)
    params = net.init(k_p, tiled, chunks)["params"]
    v = BradleyTerryVerifier(params, net)
    cands = Candidates(actions=chunks, features=jnp.zeros((6, 1)))
    cached = v.score(v.state, obs, cands, k_p)
    np.testing.assert_allclose(cached, net.apply({"params": params}, tiled, chunks), rtol=1e-5,
                               atol=1e-6)
    assert np.unique(np.asarray(cached)).size == 6  # the chunk reaches the readout


def test_pi_star_reference_ranks_pairs_by_closeness_to_the_expert_chunk(tmp_path):
    """A tiny fit with reference=pi_star: every pair's errors are the normalised RMSE of its
    chunks to pi*'s chunk from the pair's state (all H steps real), and no label ceiling is
    estimated (pi*'s chunk is not a random draw)."""
    import envs
    from core.io import read_json, read_npz
    from envs.dataset import load_demos
    from envs.demos import pi_star_chunks, write_demos
    from policies import FlowConfig, example_obs, make_policy
    from verifiers.registry import PLUGINS

    env = envs.make("reach", image=False, max_steps=12)
    cfg = FlowConfig(width=16, depth=1, heads=2, expert_width=16, expert_heads=2, num_steps=2,
                     horizon=4).with_spec(env.spec)
    policy = make_policy("flow", cfg)
    params = policy.init(jax.random.PRNGKey(0), example_obs(cfg))
    write_demos("reach", 3, None, 0, str(tmp_path / "demos"))
    demos = load_demos(str(tmp_path / "demos"))
    config = BradleyTerryConfig(
        samples=4, representatives=3, states=8, heldout=0.34, reference="pi_star",
        judge=JudgeConfig(width=16, depth=1, heads=2),
        learner=BTConfig(steps=4, updates_per_call=2, batch_size=8))
    out = str(tmp_path / "fit")
    PLUGINS["bradley_terry"].fit(config, BuildContext(env=env, policy=policy, replan=2), params,
                                 demos, jax.random.PRNGKey(1), out)
    prefs = read_npz(os.path.join(out, "preferences.npz"))
    assert read_json(os.path.join(out, "preferences.json"))["reference"] == "pi_star"
    assert "p_win" not in prefs and "ceiling" not in read_json(
        os.path.join(out, "fit_info.json")).get("heldout", {})
    ref = jnp.asarray(pi_star_chunks(demos, 4)[prefs["state"]])
    err = jax.vmap(lambda c, r: normalised_rmse(c, r, jnp.asarray(prefs["scale"])))
    np.testing.assert_allclose(err(jnp.asarray(prefs["win"]), ref), prefs["e_w"], rtol=1e-5)
    np.testing.assert_allclose(err(jnp.asarray(prefs["lose"]), ref), prefs["e_l"], rtol=1e-5)
    assert np.all(prefs["e_w"] <= prefs["e_l"])

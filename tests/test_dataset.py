"""Demonstration datasets: mix parsing, atomic writes, round trip, validation, chunking."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import STATE_DIM, mixture
from envs import dataset as ds
from envs.dataset import Dataset, combine, load_demos, summarize
from envs.demos import pi_star_chunks, write_demos
from envs.experts import mode_index
from envs.mixture import (
    DEFAULT_MIX,
    MIXTURE_MAX_STEPS,
    MIXTURES,
    parse_mix,
    time_limit,
    validate_mix,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "pick_place"
    mix = {"optimal": 0.5, "wrong_object": 0.5}
    # one mode per episode (segment 0), so each episode's outcome is its mode's
    manifest = write_demos("pick_place", 6, mix, seed=3, out_dir=str(out), segment=0)
    return out, manifest


def test_parse_and_validate_mix():
    assert parse_mix("optimal=0.6, hesitant=0.4") == {"optimal": 0.6, "hesitant": 0.4}
    for task in ("reach", "push", "pick_place", "sort"):
        for name, mix in MIXTURES.items():
            assert validate_mix(task, name) == mix
    premise, counter = MIXTURES[DEFAULT_MIX], MIXTURES["counter_premise"]
    assert max(premise, key=premise.get) == "optimal"
    assert max(counter, key=counter.get) != "optimal"
    assert validate_mix("push", "optimal=0.5,sloppy=0.5") == {"optimal": 0.5, "sloppy": 0.5}
    # a named mixture may set its own time limit; weights given inline never do
    assert time_limit("pick_place", "counter_premise") == 92
    assert time_limit("pick_place", "premise") is None
    assert time_limit("pick_place", "optimal=1") is None and time_limit("pick_place", None) is None


@pytest.mark.parametrize(
    "task, mix, match",
    [
        ("pick_place", "optimal0.6", "unknown mixture"),
        ("pick_place", "optimal=0.6,=0.4", "malformed"),
        ("pick_place", "optimal=abc", "not a number"),
        ("pick_place", "optimal=0.5,optimal=0.5", "twice"),
        ("pick_place", "", "unknown mixture"),
        ("pick_place", "premis", "unknown mixture"),
        ("pick_place", "optimal=0.6,hesitant=0.3", "sum to 1"),
        ("pick_place", "optimal=1.2,hesitant=-0.2", ">= 0"),
        ("push", "optimal=0.5,wrong_object=0.5", "allowed"),
        ("stack", "optimal=1", "task"),
    ],
)
def test_bad_mix_raises(task, mix, match):
    with pytest.raises(ValueError, match=match):
        validate_mix(task, mix)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "stack"}, "task"),
        ({"variant": "night"}, "variant"),
        ({"mix": "optimal=0.7"}, "sum to 1"),
        ({"mix": {"flying": 1.0}}, "allowed"),
        ({"episodes": 0}, "episodes"),
    ],
)
def test_write_errors_leave_nothing(tmp_path, kwargs, match):
    args = {"task": "pick_place", "episodes": 2, "mix": None, "seed": 0, "variant": "nominal"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        write_demos(out_dir=str(tmp_path / "d"), **args)
    assert os.listdir(tmp_path) == []


def test_failure_while_writing_is_atomic(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ds.np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        write_demos("reach", 2, "optimal=1", 0, str(tmp_path / "d"), image=False)
    assert os.listdir(tmp_path) == []


def test_round_trip(demo_dir):
    out, manifest = demo_dir
    d = load_demos(str(out))
    assert sorted(os.listdir(out)) == ["episodes.npz", "manifest.json", "steps.npz"]
    assert d.manifest == json.loads(json.dumps(manifest))
    assert d.num_episodes == 6 and manifest["counts"]["episodes"] == 6
    assert d.num_steps == int(d.episodes["length"].sum()) == manifest["counts"]["steps"]
    assert d["image"].dtype == np.uint8 and d["image"].shape[1:] == (64, 64, 3)
    assert d["state"].shape[1:] == (STATE_DIM,) and d["instruction"].dtype == np.int32
    assert set(np.unique(d.episodes["mode"])) <= {0, 4}
    # pi* episodes succeed, wrong_object ones fail and hold the wrong block; the per-step mode
    # is the episode's; the manifest agrees with the arrays
    assert np.all(d.episodes["success"][d.episodes["mode"] == 0])
    assert not np.any(d.episodes["success"][d.episodes["mode"] == 4])
    np.testing.assert_array_equal(d.episodes["wrong_block"], d.episodes["mode"] == 4)
    assert manifest["success_rate"] == float(d.episodes["success"].mean())
    assert manifest["wrong_block_rate"] == float(d.episodes["wrong_block"].mean())
    np.testing.assert_array_equal(d["mode"], d.episodes["mode"][d["episode"]])
    # decision steps every 4 steps, each with a label that sums to 1
    np.testing.assert_array_equal(d["decision"], d["t"] % 4 == 0)
    np.testing.assert_allclose(d["mode_label"][d["decision"]].sum(1), 1.0, atol=1e-6)
    assert not d["mode_label"][~d["decision"]].any()
    for i, sl in enumerate(d.episode_slices):
        assert np.all(d["episode"][sl] == i)
        np.testing.assert_array_equal(d["t"][sl], np.arange(sl.stop - sl.start))
        # only the last stored step of an episode can be done; a successful episode ends done
        # (a failing one may end earlier: recording stops once the expert stands still)
        assert not d["done"][sl][:-1].any()
        assert d["done"][sl][-1] or not d.episodes["success"][i]
        moves = np.abs(d["action"][sl][:, :2]).max(-1) > 1e-6
        assert d["done"][sl][-1] or moves[:-1].any()
    assert "pick_place" in summarize(manifest) and "wrong_object" in summarize(manifest)


def test_mode_shares_by_bin_known_answer():
    progress = np.array([0.05, 0.1, 0.5, 0.99, 1.0])
    bins = mixture.progress_bins(progress)
    np.testing.assert_array_equal(bins, [0, 0, 2, 4, 4])
    weights = np.array([[1, 0], [0.5, 0.5], [0, 1], [1, 0], [1, 0]], float)
    shares, counts = mixture.mode_shares_by_bin(bins, weights)
    np.testing.assert_array_equal(counts, [2, 0, 1, 0, 2])
    np.testing.assert_allclose(shares[[0, 2, 4]], [[0.75, 0.25], [0, 1], [1, 0]])
    assert np.isnan(shares[1]).all() and np.isnan(shares[3]).all()


def test_premise_check_known_answer():
    counts = np.array([100, 100, 10])
    ok = np.array([[0.6, 0.2, 0.2], [0.55, 0.25, 0.2], [0.1, 0.9, 0.0]])  # bin 2 too small
    assert mixture.premise_check(ok, counts)["passed"]
    low = ok.copy()
    low[1] = [0.45, 0.3, 0.25]
    res = mixture.premise_check(low, counts)
    assert not res["passed"] and res["pi_star_min"] == 0.45 and res["failure_max"] == 0.3


def test_label_accuracy_known_answer():
    true = np.array([0, 0, 1])
    labels = np.array([[1, 0], [0.5, 0.5], [0, 1]], float)
    acc = mixture.label_accuracy(true, labels, ("optimal", "hesitant"))
    assert acc["optimal"]["accuracy"] == 0.75 and acc["hesitant"]["accuracy"] == 1.0
    assert acc["optimal"]["labelled_as"]["hesitant"] == 0.25


@pytest.mark.slow
def test_default_mixture_is_pi_star_dominant_per_step_and_counter_premise_is_not(tmp_path):
    """The premise, decided from the data alone: at decision steps, in every progress bin, pi*
    holds 50-70% of the steps and no failure mode more than 25%; the counter-premise mixture
    has a failure mode densest in every bin. The data's success leaves the policy room."""
    premise = write_demos("pick_place", 1000, None, 0, str(tmp_path / "p"), image=False)
    assert premise["premise"]["passed"], premise["premise"]
    assert 0.4 <= premise["success_rate"] <= 0.8
    counter = write_demos("pick_place", 1000, "counter_premise", 0, str(tmp_path / "c"),
                          image=False)
    shares = np.array(counter["mode_shares"]["true"])
    assert not counter["premise"]["passed"]
    assert np.all(shares[:, 1] > shares[:, 0] + 0.15)  # hesitant well above pi* in every bin
    assert counter["max_steps"] == MIXTURE_MAX_STEPS["counter_premise"]["pick_place"]
    assert 0.4 <= counter["success_rate"] <= 0.7
    # the classifier recognises the slow modes it is asked to tell apart
    for p in (premise, counter):
        for mode in ("hesitant", "detour"):
            assert p["label_accuracy"][mode]["accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("task", ["reach", "push", "pick_place", "sort"])
def test_counter_premise_time_limit_is_fatal_only_to_the_dominant_mode_followed(task):
    """Under the counter-premise's time limit, from the experts alone: pi* always finishes,
    always hesitating (its dominant failure mode) never does, and the mixture drawn per segment
    finishes in about half of its episodes, so a verifier that follows the density has room to
    do worse than random."""
    from envs.experts import rollout
    from envs.tabletop import make

    env = make(task, max_steps=time_limit(task, "counter_premise"))
    n, segments = 256, env.max_steps // 4 + 1
    fn = jax.jit(jax.vmap(lambda k, m: rollout(env, k, m, 4)))
    keys = jax.random.split(jax.random.PRNGKey(5), n)
    names = list(MIXTURES["counter_premise"])
    drawn = np.random.default_rng(5).choice(len(names), size=(n, segments),
                                            p=list(MIXTURES["counter_premise"].values()))
    mixed = np.array([mode_index(task, m) for m in names], np.int32)[drawn]
    for modes, lo, hi in [(np.zeros((n, 1), np.int32), 1.0, 1.0),
                          (np.full((n, 1), mode_index(task, "hesitant"), np.int32), 0.0, 0.0),
                          (mixed, 0.35, 0.7)]:
        success = np.asarray(fn(keys, jnp.asarray(modes))["success"]).any(1).mean()
        assert lo <= success <= hi, (task, modes[0, :3], success)


def test_same_seed_same_data(demo_dir, tmp_path):
    out, _ = demo_dir
    write_demos("pick_place", 6, {"optimal": 0.5, "wrong_object": 0.5}, 3, str(tmp_path / "b"),
                segment=0)
    a, b = load_demos(str(out)), load_demos(str(tmp_path / "b"))
    for k in a.steps:
        np.testing.assert_array_equal(a.steps[k], b.steps[k])


def test_chunks_known_answer():
    # two episodes of lengths 3 and 2; action value = 10 * episode + t
    act = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [10, 10, 10], [11, 11, 11]], np.float32)
    steps = {
        "action": act,
        "state": np.zeros((5, STATE_DIM), np.float32),
        "episode": np.array([0, 0, 0, 1, 1], np.int32),
        "t": np.array([0, 1, 2, 0, 1], np.int32),
        "mode": np.array([0, 0, 0, 3, 3], np.int32),
        "decision": np.array([1, 0, 0, 1, 0], bool),
    }
    eps = {
        "mode": np.array([0, 3], np.int32),
        "length": np.array([3, 2], np.int32),
        "success": np.array([True, False]),
    }
    d = Dataset(steps=steps, episodes=eps, manifest={})
    c = d.chunks(3)
    assert c["actions"].shape == (5, 3, 3)
    np.testing.assert_array_equal(
        c["actions"][:, :, 0], [[0, 1, 2], [1, 2, 2], [2, 2, 2], [10, 11, 11], [11, 11, 11]]
    )
    np.testing.assert_array_equal(
        c["valid"], [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    )
    np.testing.assert_array_equal(c["mode"], [0, 0, 0, 3, 3])
    assert c["obs"]["state"].shape == (5, STATE_DIM)
    with pytest.raises(ValueError, match="H"):
        d.chunks(0)


def test_combine(demo_dir):
    d = load_demos(str(demo_dir[0]))
    both = combine([d, d])
    assert both.num_episodes == 12 and both.num_steps == 2 * d.num_steps
    assert both["episode"][-1] == 11
    assert [s.stop - s.start for s in both.episode_slices] == 2 * [
        s.stop - s.start for s in d.episode_slices
    ]
    with pytest.raises(ValueError, match="datasets"):
        combine([])


def _corrupt(src, dst, steps_update=None, manifest_update=None, drop=None):
    os.makedirs(dst)
    with np.load(os.path.join(src, "steps.npz")) as z:
        steps = {k: z[k] for k in z.files}
    steps.update(steps_update or {})
    if drop:
        steps.pop(drop)
    np.savez(os.path.join(dst, "steps.npz"), **steps)
    with np.load(os.path.join(src, "episodes.npz")) as z:
        np.savez(os.path.join(dst, "episodes.npz"), **{k: z[k] for k in z.files})
    with open(os.path.join(src, "manifest.json")) as f:
        m = json.load(f)
    m.update(manifest_update or {})
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(m, f)


def test_load_validation(demo_dir, tmp_path):
    src = str(demo_dir[0])
    with pytest.raises(ValueError, match="manifest.json not found"):
        load_demos(str(tmp_path))
    _corrupt(src, tmp_path / "v", manifest_update={"schema_version": 99})
    with pytest.raises(ValueError, match="schema_version"):
        load_demos(str(tmp_path / "v"))
    _corrupt(src, tmp_path / "k", drop="action")
    with pytest.raises(ValueError, match="'action'"):
        load_demos(str(tmp_path / "k"))
    n = len(load_demos(src)["state"])
    _corrupt(src, tmp_path / "t", steps_update={"state": np.zeros((n, STATE_DIM), np.float64)})
    with pytest.raises(ValueError, match="dtype"):
        load_demos(str(tmp_path / "t"))
    _corrupt(src, tmp_path / "s", steps_update={"state": np.zeros((n, 55), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_demos(str(tmp_path / "s"))


def test_recording_stops_when_the_expert_stands_still():
    from envs.demos import _recorded

    valid = np.ones((2, 6), bool)
    action = np.zeros((2, 6, 3), np.float32)
    action[0, :3, 0] = 0.5  # moves for 3 steps, then idles
    action[1, :, 1] = -0.2  # moves throughout
    kept = _recorded(valid, action)
    np.testing.assert_array_equal(kept[0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(kept[1], [1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("mix", [{"optimal": 0.5, "hesitant": 0.5}, "counter_premise"])
def test_pi_star_chunks_replay_the_dataset_and_match_its_optimal_steps(tmp_path, mix):
    """pi*'s chunk from a recorded state starts with the recorded action wherever pi* took
    that step, and rarely elsewhere; a dataset that its manifest does not reproduce is refused.
    A named mixture's own time limit (the counter-premise's is longer) is replayed too."""
    out = tmp_path / "d"
    write_demos("pick_place", 8, mix, seed=5, out_dir=str(out))
    data = load_demos(str(out))
    chunks = pi_star_chunks(data, 3)
    assert chunks.shape == (data.num_steps, 3, 3)
    first_is_taken = np.all(chunks[:, 0] == data.steps["action"], -1)
    optimal = data.steps["mode"] == 0
    assert optimal.any() and (~optimal).any()
    assert first_is_taken[optimal].all()
    assert first_is_taken[~optimal].mean() < 0.5
    data.steps["action"] = data.steps["action"] + np.float32(1e-3)
    with pytest.raises(ValueError, match="does not give its stored steps"):
        pi_star_chunks(data, 3)
    data.manifest = {**data.manifest, "seed": "x"}
    with pytest.raises(ValueError, match="manifest cannot be replayed"):
        pi_star_chunks(data, 3)

"""Demonstration datasets: mix parsing, atomic writes, round trip, validation, chunking."""

import json
import os

import numpy as np
import pytest

from envs import STATE_DIM
from envs import dataset as ds
from envs.dataset import (
    DEFAULT_MIX,
    Dataset,
    combine,
    load_demos,
    parse_mix,
    summarize,
    validate_mix,
    write_demos,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "pick_place"
    mix = {"optimal": 0.5, "wrong_object": 0.5}
    manifest = write_demos("pick_place", 6, mix, seed=3, out_dir=str(out))
    return out, manifest


def test_parse_and_validate_mix():
    assert parse_mix("optimal=0.6, hesitant=0.4") == {"optimal": 0.6, "hesitant": 0.4}
    for task, mix in DEFAULT_MIX.items():
        assert max(mix, key=mix.get) == "optimal"
        assert validate_mix(task, mix) == mix
    assert validate_mix("push", "optimal=0.5,sloppy=0.5") == {"optimal": 0.5, "sloppy": 0.5}


@pytest.mark.parametrize(
    "task, mix, match",
    [
        ("pick_place", "optimal0.6", "malformed"),
        ("pick_place", "optimal=abc", "not a number"),
        ("pick_place", "optimal=0.5,optimal=0.5", "twice"),
        ("pick_place", "", "empty"),
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
    # pi* episodes succeed, wrong_object ones fail; the manifest agrees with the arrays
    for mode, name in ((0, "optimal"), (4, "wrong_object")):
        sel = d.episodes["mode"] == mode
        assert manifest["per_mode"][name]["episodes"] == int(sel.sum())
        if sel.any():
            rate = float(d.episodes["success"][sel].mean())
            assert manifest["per_mode"][name]["success_rate"] == rate
    assert np.all(d.episodes["success"][d.episodes["mode"] == 0])
    assert not np.any(d.episodes["success"][d.episodes["mode"] == 4])
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


def test_same_seed_same_data(demo_dir, tmp_path):
    out, _ = demo_dir
    write_demos("pick_place", 6, {"optimal": 0.5, "wrong_object": 0.5}, 3, str(tmp_path / "b"))
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
    from envs.dataset import _recorded

    valid = np.ones((2, 6), bool)
    action = np.zeros((2, 6, 3), np.float32)
    action[0, :3, 0] = 0.5  # moves for 3 steps, then idles
    action[1, :, 1] = -0.2  # moves throughout
    kept = _recorded(valid, action)
    np.testing.assert_array_equal(kept[0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(kept[1], [1, 1, 1, 1, 1, 1])

"""Per-decision transitions: known answers on a hand-made dataset, argument checks, and a
reference loop on a small written dataset."""

import math

import numpy as np
import pytest

from envs.dataset import Dataset, load_demos
from envs.demos import write_demos
from envs.transitions import transitions


def _dataset(rewards, success_last, done_last):
    """Episodes with the given per-step rewards; state[:, 0] and action[:, 0] hold the global
    row, so alignment can be read off the values."""
    lengths = [len(r) for r in rewards]
    n = sum(lengths)
    row = np.arange(n, dtype=np.float32)
    state = np.zeros((n, 5), np.float32)
    state[:, 0] = row
    action = np.zeros((n, 3), np.float32)
    action[:, 0] = row
    ends = np.cumsum(lengths) - 1
    success = np.zeros(n, bool)
    success[ends[np.asarray(success_last)]] = True
    done = np.zeros(n, bool)
    done[ends[np.asarray(done_last)]] = True
    steps = {
        "state": state,
        "time": np.concatenate([np.arange(k) for k in lengths]).astype(np.float32),
        "action": action,
        "reward": np.concatenate(rewards).astype(np.float32),
        "success": success,
        "done": done,
        "episode": np.repeat(np.arange(len(lengths)), lengths).astype(np.int32),
        "mode": np.zeros(n, np.int32),
        "decision": np.zeros(n, bool),
    }
    eps = {"length": np.array(lengths, np.int32), "success": np.array(success_last)}
    return Dataset(steps=steps, episodes=eps, manifest={})


@pytest.fixture()
def tiny():
    # 0: 7 steps, succeeds; 1: 4 steps, hits the time limit; 2: 2 steps, recording stopped
    return _dataset(
        [[0, 0, 1, 0, 0, 0, 1], [0, 2, 0, 3], [0.5, 0.25]],
        success_last=[True, False, False],
        done_last=[True, True, False],
    )


def test_known_answer(tiny):
    tr = transitions(tiny, H=4, replan=3, gamma=0.5)
    # decisions: episode 0 at rows 0, 3, 6; episode 1 at rows 7, 10; episode 2 at row 11
    np.testing.assert_array_equal(tr["obs"]["state"][:, 0], [0, 3, 6, 7, 10, 11])
    np.testing.assert_array_equal(tr["episode"], [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(tr["decision_index"], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(tr["t"], [0, 3, 6, 0, 3, 0])
    np.testing.assert_array_equal(tr["reward"], [1, 0, 1, 2, 3, 0.75])
    np.testing.assert_array_equal(tr["discount"], np.full(6, 0.125))
    # G = R + 0.125 * G_next within each episode, 0 after the last decision
    np.testing.assert_allclose(
        tr["return_to_go"], [1 + 0.125 * 0.125, 0.125, 1, 2 + 0.125 * 3, 3, 0.75]
    )
    # next decision's observation; at an episode's last decision its last stored one
    np.testing.assert_array_equal(tr["next_obs"]["state"][:, 0], [3, 6, 6, 10, 10, 12])
    np.testing.assert_array_equal(tr["next_obs"]["time"], [3, 6, 6, 3, 3, 1])
    np.testing.assert_array_equal(tr["done"], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(tr["truncated"], [0, 0, 0, 0, 1, 1])
    # chunks run past the executed prefix and repeat the episode's last action at its end
    np.testing.assert_array_equal(
        tr["chunk"][:, :, 0],
        [[0, 1, 2, 3], [3, 4, 5, 6], [6, 6, 6, 6], [7, 8, 9, 10], [10, 10, 10, 10],
         [11, 12, 12, 12]],
    )
    np.testing.assert_array_equal(
        tr["chunk_valid"],
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]],
    )
    assert tr["chunk"].dtype == np.float32 and tr["chunk"].shape == (6, 4, 3)
    assert tr["reward"].dtype == tr["return_to_go"].dtype == np.float32
    # the method on the dataset is the same view
    via_method = tiny.transitions(4, 3, 0.5)
    for k in ("reward", "return_to_go", "chunk", "done"):
        np.testing.assert_array_equal(via_method[k], tr[k])


def test_replan_one_is_the_per_step_view(tiny):
    tr = transitions(tiny, H=2, replan=1, gamma=0.9)
    np.testing.assert_array_equal(tr["reward"], tiny.steps["reward"])
    np.testing.assert_allclose(tr["discount"], 0.9)
    np.testing.assert_array_equal(tr["chunk"], tiny.chunks(2)["actions"])
    r = tiny.steps["reward"][:7].astype(np.float64)
    want = [sum(0.9**k * x for k, x in enumerate(r[i:])) for i in range(7)]
    np.testing.assert_allclose(tr["return_to_go"][:7], want, rtol=1e-6)


@pytest.mark.parametrize("gamma, first", [(0.0, 1.0), (1.0, 2.0)])
def test_gamma_edges(tiny, gamma, first):
    tr = transitions(tiny, H=3, replan=3, gamma=gamma)
    assert tr["return_to_go"][0] == first  # 0: own reward only; 1: the episode's total
    assert tr["discount"][0] == gamma**3


@pytest.mark.parametrize(
    "H, replan, gamma, field",
    [
        (0, 1, 0.9, "H"),
        (2.0, 1, 0.9, "H"),
        (True, 1, 0.9, "H"),
        (4, 0, 0.9, "replan"),
        (4, 5, 0.9, "replan"),
        (4, 2.0, 0.9, "replan"),
        (4, 2, -0.1, "gamma"),
        (4, 2, 1.5, "gamma"),
        (4, 2, math.nan, "gamma"),
        (4, 2, "0.9", "gamma"),
    ],
)
def test_bad_arguments_name_the_field(tiny, H, replan, gamma, field):
    with pytest.raises(ValueError, match=rf"^{field}: must be"):
        transitions(tiny, H, replan, gamma)


def _reference(d, H, replan, gamma):
    """Row by row, episode by episode: (obs row, next obs row, reward, G, done, truncated)."""
    out = []
    for sl in d.episode_slices:
        rows = list(range(sl.start, sl.stop, replan))
        rew = [float(d["reward"][r : min(r + replan, sl.stop)].sum()) for r in rows]
        g, gs = 0.0, []
        for x in reversed(rew):
            g = x + gamma**replan * g
            gs.append(g)
        terminal = bool(d["success"][sl.stop - 1])
        for i, r in enumerate(rows):
            last = i == len(rows) - 1
            nxt = sl.stop - 1 if last else r + replan
            out.append((r, nxt, rew[i], gs[::-1][i], last and terminal, last and not terminal))
    return out


def test_written_dataset(tmp_path):
    # one mode per episode: successes, time-limit ends (hesitant) and recordings that stop
    # when the expert stands still on the wrong block (wrong_object)
    mix = "optimal=0.4,hesitant=0.3,wrong_object=0.3"
    write_demos("reach", 6, mix, seed=0, out_dir=str(tmp_path / "d"), image=False, segment=0)
    d = load_demos(str(tmp_path / "d"))
    last = np.array([s.stop - 1 for s in d.episode_slices])
    ends = set(zip(d["done"][last].tolist(), d["success"][last].tolist(), strict=True))
    assert ends == {(True, True), (True, False), (False, False)}
    H, replan, gamma = 5, 3, 0.95
    tr = d.transitions(H, replan, gamma)
    D = int(sum(-(-n // replan) for n in d.episodes["length"]))
    A = d["action"].shape[1]
    assert tr["chunk"].shape == (D, H, A) and tr["chunk_valid"].shape == (D, H)
    assert set(tr["obs"]) == set(tr["next_obs"]) == set(d.obs)
    for k, v in d.obs.items():
        assert tr["obs"][k].shape == tr["next_obs"][k].shape == (D,) + v.shape[1:]
    for k in ("reward", "discount", "done", "truncated", "return_to_go", "episode"):
        assert tr[k].shape == (D,)
    # no reward is lost or counted twice; every episode ends exactly once, done iff it succeeded
    per_episode = np.bincount(tr["episode"], tr["reward"], minlength=d.num_episodes)
    per_step = np.bincount(d["episode"], d["reward"], minlength=d.num_episodes)
    np.testing.assert_allclose(per_episode, per_step, atol=1e-6)
    ends = np.bincount(tr["episode"], tr["done"] | tr["truncated"], minlength=d.num_episodes)
    np.testing.assert_array_equal(ends, 1)
    np.testing.assert_array_equal(
        np.bincount(tr["episode"], tr["done"], minlength=d.num_episodes) > 0,
        d.episodes["success"],
    )
    ref = _reference(d, H, replan, gamma)
    rows, nxt, rew, g, done, trunc = (np.array(c) for c in zip(*ref, strict=True))
    np.testing.assert_array_equal(tr["obs"]["state"], d["state"][rows])
    np.testing.assert_array_equal(tr["next_obs"]["state"], d["state"][nxt])
    np.testing.assert_allclose(tr["reward"], rew, atol=1e-6)
    np.testing.assert_allclose(tr["return_to_go"], g, rtol=1e-6)
    np.testing.assert_array_equal(tr["done"], done)
    np.testing.assert_array_equal(tr["truncated"], trunc)
    np.testing.assert_array_equal(tr["chunk"], d.chunks(H)["actions"][rows])
    np.testing.assert_array_equal(tr["chunk_valid"], d.chunks(H)["valid"][rows])

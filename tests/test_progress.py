"""The learned progress estimator (algos/progress.py) and ``steerlab fit-progress``."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algos.progress import (
    ProgressConfig,
    evaluate_progress,
    fit_progress,
    load_progress,
    mae,
    predict_progress,
    save_progress,
    split_episodes,
    state_progress,
)
from core.io import BadFileError, MissingFileError, write_json
from core.stats import rankdata, spearman
from envs.dataset import Dataset, save_dataset

SMALL = dict(width=64, depth=2, embed_dim=8, steps=1000, batch_size=128, lr=3e-3,
             updates_per_call=250, holdout=0.2)


# --------------------------------------------------------------------------- known answers


def test_rank_average_shares_ranks_between_ties():
    np.testing.assert_array_equal(rankdata(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])
    np.testing.assert_array_equal(rankdata(np.array([7, 7, 7])), [2, 2, 2])


def test_spearman_known_values():
    x = np.arange(6.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: sum of centred products 4.5 over sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / np.sqrt(10))
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no rank order


def test_spearman_matches_scipy_on_tied_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 200), rng.integers(0, 7, 200)  # many ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_mae_known_value():
    assert mae(np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.5, 1.0])) == pytest.approx(0.2 / 3)


def test_labels_are_the_progress_of_the_observed_state():
    # rows store progress *after* their step; the state's own is the previous row's
    steps = {"progress": np.array([0.1, 0.2, 0.3, 0.5, 0.6], np.float32),
             "episode": np.array([0, 0, 0, 1, 1]), "t": np.array([0, 1, 2, 0, 1])}
    labels, valid = state_progress(types.SimpleNamespace(steps=steps))
    np.testing.assert_array_equal(valid, [False, True, True, False, True])
    np.testing.assert_allclose(labels[valid], [0.1, 0.2, 0.5])


def test_labels_match_the_env_progress_of_each_observation():
    from envs.tabletop import make

    env = make("pick_place", image=False)
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(1))
    step = jax.jit(env.step)
    own, after = [], []
    for a in [[1.0, 0.3, -1.0]] * 4 + [[-0.5, 1.0, 1.0]] * 4:
        own.append(float(state.progress))  # progress of the state the row observes
        state, _, _, _, info = step(state, jnp.array(a))
        after.append(float(info["progress"]))
    steps = {"progress": np.array(after, np.float32), "episode": np.zeros(8, int),
             "t": np.arange(8)}
    labels, valid = state_progress(types.SimpleNamespace(steps=steps))
    np.testing.assert_allclose(labels[valid], np.array(own, np.float32)[1:])


# --------------------------------------------------------------------------- a synthetic fit


def synthetic(episodes=240, T=16, seed=0) -> Dataset:
    """Random walks in [0, 1]^4; the instruction's word (3 or 4) names the coordinate whose
    square is the progress: a smooth function of state and instruction, of no clock."""
    rng = np.random.default_rng(seed)
    S = 4
    walk = np.clip(rng.uniform(0, 1, (episodes, 1, S))
                   + np.cumsum(rng.normal(0, 0.08, (episodes, T + 1, S)), 1), 0, 1)
    word = rng.integers(3, 5, episodes)
    truth = 0.05 + 0.9 * walk[np.arange(episodes), :, word - 3] ** 2  # [E, T + 1]
    instr = np.zeros((episodes, T, 6), np.int32)
    instr[..., 0], instr[..., 1] = 2, word[:, None]
    steps = {
        "state": walk[:, :T].reshape(-1, S).astype(np.float32),
        "instruction": instr.reshape(-1, 6),
        "task_id": np.full(episodes * T, 2, np.int32),
        "time": np.tile(np.arange(T) / T, episodes).astype(np.float32),
        "progress": truth[:, 1:].reshape(-1).astype(np.float32),  # after each step
        "episode": np.repeat(np.arange(episodes), T).astype(np.int32),
        "t": np.tile(np.arange(T), episodes).astype(np.int32),
        "mode": rng.integers(0, 2, episodes * T).astype(np.int32),
    }
    n = episodes * T
    # the other fields of the on-disk layout (envs.dataset.STEP_KEYS); unused here
    steps.update(action=np.zeros((n, 3)), reward=np.zeros(n), done=steps["t"] == T - 1,
                 success=np.zeros(n, bool), decision=steps["t"] % 4 == 0,
                 mode_label=np.zeros((n, 5)))
    eps = {"length": np.full(episodes, T, np.int32), "success": truth[:, -1] > 0.5,
           "mode": np.full(episodes, -1, np.int32), "wrong_block": np.zeros(episodes, bool)}
    return Dataset(steps=steps, episodes=eps, manifest={"task": "synthetic"})


def save_synthetic(path, variant: str, seed: int) -> None:
    """A synthetic dataset in the on-disk layout, so ``load_demos`` validates it."""
    d = synthetic(episodes=12, T=6, seed=seed)
    save_dataset(str(path), d.steps, d.episodes, {
        "task": "synthetic", "variant": variant, "seed": seed,
        "counts": {"episodes": d.num_episodes, "steps": d.num_steps}})


@pytest.fixture(scope="module")
def fitted():
    data = synthetic()
    cfg = ProgressConfig(**SMALL)
    rows = []
    return data, cfg, fit_progress(data, cfg, log=rows.append), rows


def test_fit_learns_a_known_smooth_progress_and_beats_a_constant(fitted):
    data, cfg, est, rows = fitted
    assert [r["step"] for r in rows] == [250, 500, 750, 1000]
    assert rows[-1]["loss"] < rows[0]["loss"]
    _, held = split_episodes(data.num_episodes, cfg.holdout, cfg.seed)
    res = evaluate_progress(est, data, held)
    o = res["overall"]
    assert o["episodes"] == len(held) == 48 and o["steps"] == 48 * 15  # t = 0 rows unlabelled
    assert o["mae"] < 0.04 and o["mae"] < 0.2 * o["constant_mae"]
    assert o["spearman"] > 0.97 and o["increment_spearman"] > 0.8
    assert set(res["modes"]) == {"optimal", "hesitant"}
    assert set(res["outcome"]) == {"success", "failed"}
    assert sum(m["steps"] for m in res["modes"].values()) == o["steps"]


def test_split_is_by_episode_seeded_and_disjoint():
    train, held = split_episodes(50, 0.2, 3)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    np.testing.assert_array_equal(held, split_episodes(50, 0.2, 3)[1])
    assert not np.array_equal(held, split_episodes(50, 0.2, 4)[1])


def test_unbatched_prediction_equals_batched(fitted):
    data, _, est, _ = fitted
    obs = {k: jnp.asarray(data.steps[k][:6]) for k in ("state", "instruction", "task_id")}
    batched = predict_progress(est, obs)
    assert batched.shape == (6,)
    one = jax.jit(predict_progress)(est, {k: v[2] for k, v in obs.items()})
    assert one.shape == () and 0.0 <= float(one) <= 1.0
    np.testing.assert_allclose(one, batched[2], atol=1e-6)
    vmapped = jax.jit(jax.vmap(predict_progress, in_axes=(None, 0)))(est, obs)
    np.testing.assert_allclose(vmapped, batched, atol=1e-6)
    grid = predict_progress(est, {k: v.reshape(2, 3, *v.shape[1:]) for k, v in obs.items()})
    np.testing.assert_allclose(grid.reshape(-1), batched, atol=1e-6)
    with pytest.raises(ValueError, match="task_id"):
        predict_progress(est, {"state": obs["state"], "instruction": obs["instruction"]})


def test_fit_is_deterministic_under_a_seed():
    data = synthetic(episodes=40, T=8)
    cfg = ProgressConfig(**{**SMALL, "steps": 40, "updates_per_call": 20})
    a, b = fit_progress(data, cfg), fit_progress(data, cfg)
    c = fit_progress(data, ProgressConfig(**{**SMALL, "steps": 40, "updates_per_call": 20,
                                             "seed": 1}))
    same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a.params, b.params)
    assert all(jax.tree.leaves(same))
    assert not jnp.array_equal(a.params["params"]["Dense_0"]["kernel"],
                               c.params["params"]["Dense_0"]["kernel"])


def test_save_load_round_trip(fitted, tmp_path):
    data, cfg, est, _ = fitted
    save_progress(est, tmp_path / "est")
    back = load_progress(str(tmp_path / "est"))
    assert back.config == cfg and back.net == est.net and back.state_dim == est.state_dim
    obs = {k: jnp.asarray(data.steps[k][:32]) for k in ("state", "instruction", "task_id")}
    np.testing.assert_array_equal(predict_progress(back, obs), predict_progress(est, obs))


def test_load_names_a_missing_or_foreign_directory(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere"):
        load_progress(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="estimator.json"):
        load_progress(str(tmp_path / "empty"))
    write_json(tmp_path / "other" / "estimator.json", {"kind": "cfn"})
    with pytest.raises(BadFileError, match="not a progress estimator"):
        load_progress(str(tmp_path / "other"))


@pytest.mark.parametrize("field, value", [
    ("width", 0), ("depth", -1), ("embed_dim", 1.5), ("steps", 0), ("batch_size", True),
    ("updates_per_call", 0), ("lr", 0.0), ("lr", float("nan")), ("seed", -1),
    ("holdout", 1.0), ("holdout", -0.1),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ProgressConfig\.{field} must be"):
        ProgressConfig(**{field: value})


def test_holdout_that_leaves_no_training_episode_is_an_error():
    with pytest.raises(ValueError, match="holdout"):
        fit_progress(synthetic(episodes=2, T=4), ProgressConfig(holdout=0.9))


# --------------------------------------------------------------------------- the command


def test_cli_fits_saves_and_writes_progress_json(tmp_path, capsys):
    from experiments.cli import main

    save_synthetic(tmp_path / "a", "nominal", 0)
    save_synthetic(tmp_path / "b", "layout", 1)
    out = tmp_path / "est"
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    argv = ["fit-progress", "--demos", a, "--out", str(out), "--eval-demos", b, a, a,
            "steps=20", "width=16", "depth=1", "batch_size=32", "updates_per_call=10",
            "holdout=0.25"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "synthetic/layout" in printed
    record = json.loads((out / "progress.json").read_text())
    assert {"config", "demos", "split", "loss_curve", "fit_s", "train", "heldout",
            "eval"} <= set(record)
    assert record["config"]["steps"] == 20 and len(record["loss_curve"]) == 2
    assert record["split"]["heldout_episodes"] == 3
    # keyed by the manifest's task/variant; a repeated key gets the directory's name
    assert list(record["eval"]) == ["synthetic/layout", "synthetic/nominal",
                                    "synthetic/nominal@a"]
    for r in [record["heldout"], *record["eval"].values()]:
        assert {"overall", "modes", "outcome"} <= set(r)
        assert {"steps", "mae", "spearman", "increment_spearman"} <= set(r["overall"])
    assert load_progress(str(out)).config.steps == 20

    assert main(["fit-progress", "--demos", str(tmp_path / "a"), "--out",
                 str(tmp_path / "bad"), "holdout=2"]) == 2
    assert "holdout" in capsys.readouterr().err

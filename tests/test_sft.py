"""SFT training: loss falls, checkpoints resume exactly, evaluation rollout, config files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algos.sft import (
    TrainConfig,
    default_train_config,
    load_checkpoint,
    rollout_success,
    train_policy,
)
from core.config import from_dict, to_dict
from policies import ARConfig, FlowConfig
from policies.base import Candidates

SIZES = dict(state_dim=4, instruction_len=5, vocab_size=10, num_tasks=2, horizon=4, image=False)
TINY_FLOW = FlowConfig(**SIZES, width=32, depth=1, heads=2, expert_width=16, expert_heads=2,
                       num_steps=3)


def synthetic_data(n=256, seed=0):
    """Actions are a fixed function of the state, so a policy can fit them."""
    rng = np.random.default_rng(seed)
    state = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
    act = np.tanh(state[:, None, :3] * np.array([1.0, -1.0, 0.5]) * np.arange(1, 5)[None, :, None])
    valid = np.ones((n, 4), bool)
    valid[:16, 2:] = False
    obs = {"state": state, "instruction": np.tile(np.array([1, 2, 3, 0, 0], np.int32), (n, 1)),
           "task_id": np.zeros((n,), np.int32)}
    return {"obs": obs, "actions": act.astype(np.float32), "valid": valid}


def tiny_cfg(**kw):
    base = dict(flow=TINY_FLOW, steps=8, batch_size=16, lr=3e-3, warmup=2, steps_per_call=2,
                log_every=2, checkpoint_every=4, keep_last=2, eval_episodes=0, seed=3)
    return TrainConfig(**{**base, **kw})


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def data():
    return synthetic_data()


def test_resume_reproduces_uninterrupted_run(tmp_path, data):
    cfg = tiny_cfg(ema_decay=0.9)
    full = train_policy(cfg, str(tmp_path / "full"), data=data, progress=False)
    part = str(tmp_path / "part")
    train_policy(cfg, part, data=data, stop_after=4, progress=False)  # "crash" at step 4
    assert sorted(int(d) for d in os.listdir(os.path.join(part, "ckpt"))) == [4]
    train_policy(cfg, part, data=data, progress=False)
    _, p_full, _ = load_checkpoint(full)
    _, p_part, loaded_cfg = load_checkpoint(part)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_part), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded_cfg == cfg
    # keep_last = 2 checkpoints at steps 4 and 8; metrics rows are not duplicated on resume
    assert sorted(int(d) for d in os.listdir(os.path.join(part, "ckpt"))) == [4, 8]
    assert [r["step"] for r in read_metrics(part)] == [2, 4, 6, 8]
    # a different seed gives different params
    other = train_policy(tiny_cfg(ema_decay=0.9, seed=4), str(tmp_path / "other"), data=data,
                         progress=False)
    _, p_other, _ = load_checkpoint(other)
    diff = max(float(jnp.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_other), strict=True))
    assert diff > 0


def test_loss_falls_on_synthetic_data(tmp_path, data):
    cfg = tiny_cfg(steps=120, steps_per_call=20, log_every=20, checkpoint_every=120)
    run = train_policy(cfg, str(tmp_path / "run"), data=data, progress=False)
    rows = read_metrics(run)
    first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
    assert last < 0.6 * first, (first, last)
    assert rows[-1]["time/sps"] > 0


def test_ar_policy_trains(tmp_path, data):
    ar = ARConfig(**SIZES, width=32, depth=1, heads=2)
    cfg = tiny_cfg(policy="autoregressive", autoregressive=ar, steps=60, steps_per_call=20,
                   log_every=20, checkpoint_every=60)
    run = train_policy(cfg, str(tmp_path / "ar"), data=data, progress=False)
    rows = read_metrics(run)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    policy, params, _ = load_checkpoint(run)
    assert policy.name == "autoregressive" and policy.has_log_prob


def test_config_round_trip_and_mismatch(tmp_path, data):
    cfg = tiny_cfg(steps=2, checkpoint_every=2)
    run = train_policy(cfg, str(tmp_path / "r"), data=data, progress=False)
    with open(os.path.join(run, "config.json")) as f:
        assert from_dict(TrainConfig, json.load(f)) == cfg
    with pytest.raises(ValueError, match="different config"):
        train_policy(tiny_cfg(steps=4), run, data=data, progress=False)
    with pytest.raises(ValueError, match="eval_replan"):
        tiny_cfg(eval_replan=9).validate()
    with pytest.raises(ValueError, match="policy"):
        TrainConfig(policy="mlp").validate()
    d = default_train_config("pick_place")
    assert from_dict(TrainConfig, to_dict(d)) == d and d.tasks == ("pick_place",)


class LineEnv:
    """A 1-D known-answer env: x starts at 0, moves by 0.1 * action[0]; success at x >= 0.5."""

    class spec:  # noqa: N801
        max_steps = 12

    def reset(self, key):
        s = jnp.zeros(())
        return s, {"x": s}

    def step(self, s, a):
        s = s + 0.1 * a[0]
        succ = s >= 0.5
        return s, {"x": s}, succ.astype(jnp.float32), succ, {"success": succ,
                                                             "progress": jnp.clip(s / 0.5, 0, 1)}


class ConstPolicy:
    """Always proposes the chunk filled with ``value``."""

    def __init__(self, value):
        self.value = value

    def encode(self, params, obs):
        return obs["x"]

    def sample(self, params, ctx, key, M):
        return Candidates(jnp.full((M, 4, 3), self.value) + 0 * ctx, jnp.zeros((M, 1)))


def test_rollout_success_known_answers():
    env = LineEnv()
    up = rollout_success(env, ConstPolicy(1.0), None, 0, episodes=3, replan=2)
    assert float(up["success_rate"]) == 1.0
    down = rollout_success(env, ConstPolicy(-1.0), None, 0, episodes=3, replan=2)
    assert float(down["success_rate"]) == 0.0 and float(down["progress"]) == 0.0
    # 0.3 per step for 12 steps reaches x = 0.36: no success, progress 0.72
    slow = rollout_success(env, ConstPolicy(0.3), None, 0, episodes=2, replan=4)
    assert float(slow["success_rate"]) == 0.0
    assert float(slow["progress"]) == pytest.approx(0.72, abs=1e-5)


def test_heldout_split_is_a_fixed_fraction_of_episodes():
    from algos.sft import heldout_episodes

    ep = np.arange(20_000)
    held = heldout_episodes(ep, 0.05)
    assert abs(held.mean() - 0.05) < 0.005
    np.testing.assert_array_equal(held, heldout_episodes(ep, 0.05))  # no seed, no drift
    assert not heldout_episodes(ep, 0.0).any()


def test_heldout_loss_is_logged_and_deterministic(tmp_path, data):
    d = dict(data, heldout=np.arange(len(data["actions"])) % 4 == 0)
    rows = []
    for name in ("a", "b"):
        train_policy(tiny_cfg(heldout_every=4), str(tmp_path / name), data=dict(d),
                     progress=False)
        rows.append([r for r in read_metrics(str(tmp_path / name)) if "heldout/loss" in r])
    assert [r["step"] for r in rows[0]] == [4, 8]
    assert rows[0][0]["heldout/chunks"] == 64
    assert rows[0] == rows[1]  # fixed (t, noise) draws: the same params give the same loss


def test_bad_dataset_leaves_no_run_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="manifest.json"):
        train_policy(tiny_cfg(datasets=(str(tmp_path / "missing"),)), str(out), progress=False)
    assert not out.exists()


def test_normalize_stores_the_training_chunks_statistics(tmp_path, data):
    cfg = tiny_cfg(normalize=True, heldout=0.0)
    run = train_policy(cfg, str(tmp_path / "norm"), data=data, progress=False)
    policy, _, loaded = load_checkpoint(run)
    valid = data["valid"]
    np.testing.assert_allclose(loaded.flow.state_mean, data["obs"]["state"].mean(0), atol=1e-6)
    np.testing.assert_allclose(loaded.flow.state_std, data["obs"]["state"].std(0), atol=1e-6)
    np.testing.assert_allclose(loaded.flow.action_mean, data["actions"][valid].mean(0),
                               atol=1e-6)
    np.testing.assert_allclose(loaded.flow.action_std, data["actions"][valid].std(0), atol=1e-6)
    assert policy.cfg == loaded.flow
    train_policy(cfg, run, data=data, progress=False)  # the same run again resumes, no mismatch
    with pytest.raises(ValueError, match="normalize is for the flow policy"):
        tiny_cfg(normalize=True, policy="autoregressive",
                 autoregressive=ARConfig(**SIZES, width=32, depth=1, heads=2)).validate()

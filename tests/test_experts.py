"""Scripted experts: pi* succeeds, failure modes fail or are slow, chunks and labels agree."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import TASKS, make
from envs.experts import (
    ALL_MODES,
    MODES,
    classify_chunk,
    expert_action,
    expert_chunk,
    mode_index,
    mode_weights,
    rollout,
    segment_key,
)

N_EPISODES = 200


@functools.cache
def _stats(task):
    """Per mode over N_EPISODES nominal episodes: success rate, mean length, final progress."""
    env = make(task, image=False)
    modes = jnp.arange(len(MODES[task]))
    keys = jax.random.split(jax.random.PRNGKey(0), N_EPISODES)
    run = jax.jit(jax.vmap(jax.vmap(lambda k, m: rollout(env, k, m), (0, None)), (None, 0)))
    tr = jax.device_get(run(keys, modes))
    success = tr["success"][:, :, -1]  # [modes, N]
    length = tr["valid"].sum(-1)
    progress = tr["progress"]
    return success.mean(1), length.mean(1), progress, tr["success"]


def test_modes_table():
    for task in TASKS:
        assert MODES[task][0] == "optimal" and len(MODES[task]) >= 4
        assert MODES[task] == ALL_MODES[: len(MODES[task])]  # same index in every task
    assert mode_index("sort", "sloppy") == 3
    with pytest.raises(ValueError, match="mode"):
        mode_index("push", "wrong_object")


@pytest.mark.parametrize("task", TASKS)
def test_optimal_succeeds_and_other_modes_are_worse(task):
    success, length, progress, ok = _stats(task)
    assert success[0] >= 0.95, (task, success)
    for m in range(1, len(MODES[task])):
        # a failure mode either succeeds less often or takes far longer than pi*
        assert success[m] < success[0] - 0.2 or length[m] > 1.8 * length[0], (
            task,
            MODES[task][m],
            success[m],
            length[m],
        )
    # progress is in [0, 1] and exactly 1 where success holds
    assert progress.min() >= 0.0 and progress.max() <= 1.0
    assert np.all(progress[ok] == 1.0) and np.all(progress[~ok] < 1.0)


def test_rollout_is_deterministic_and_frozen():
    env = make("push", image=False)
    run = jax.jit(lambda k: rollout(env, k, 0))
    a, b = run(jax.random.PRNGKey(7)), run(jax.random.PRNGKey(7))
    np.testing.assert_array_equal(a["action"], b["action"])
    done = np.asarray(a["done"])
    first = int(np.argmax(done))
    assert done[first:].all() and not done[:first].any()
    assert not np.asarray(a["valid"])[first + 1 :].any()
    # once done, the observed state never changes
    states = np.asarray(a["obs"]["state"])
    np.testing.assert_array_equal(states[first + 1], states[-1])


def test_expert_chunk_matches_rollout_and_classifies_itself():
    # sort: pi* and wrong_object head for different blocks from the first step
    env = make("sort", image=False)
    key = jax.random.PRNGKey(3)
    k_reset, k_expert = jax.random.split(key)
    H = 8
    traj = jax.jit(lambda k: rollout(env, k, 4))(key)  # wrong_object, one mode per episode
    state, _ = jax.jit(env.reset)(k_reset)
    k_episode = segment_key(k_expert, 0, 0)
    chunk = jax.jit(lambda s: expert_chunk(env, s, 4, k_episode, H))(state)
    np.testing.assert_allclose(chunk, traj["action"][:H], atol=1e-6)
    classify = jax.jit(lambda s, c: classify_chunk(env, s, c))
    np.testing.assert_allclose(classify(state, chunk), np.eye(5)[4])
    opt = jax.jit(lambda s: expert_chunk(env, s, 0, k_episode, H))(state)
    # pi* and sloppy agree until the release: the label splits between them, never favouring
    # pi* by order
    np.testing.assert_allclose(classify(state, opt), [0.5, 0, 0, 0.5, 0])
    assert float(jnp.sum((opt - chunk) ** 2)) > 1.0


def test_modes_switch_per_segment():
    env = make("pick_place", image=False)
    modes = jnp.array([0, 1, 2, 3] * 4, jnp.int32)
    traj = jax.jit(lambda k: rollout(env, k, modes, segment=4))(jax.random.PRNGKey(5))
    valid = np.asarray(traj["valid"])
    t = np.arange(len(valid))
    expected = np.asarray(modes)[np.minimum(t // 4, len(modes) - 1)]
    np.testing.assert_array_equal(np.asarray(traj["mode"])[valid], expected[valid])


def test_mode_weights_split_ties_and_pick_the_nearest():
    protos = jnp.zeros((3, 1, 2, 1)).at[1].set(1.0)  # modes 0 and 2 coincide, mode 1 differs
    np.testing.assert_allclose(mode_weights(protos, jnp.zeros((2, 1))), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(mode_weights(protos, jnp.full((2, 1), 0.9)), [0.0, 1.0, 0.0])


def test_expert_action_vmaps_over_modes_and_states():
    env = make("sort", image=False)
    states, _ = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(0), 3))
    modes = jnp.arange(len(MODES["sort"]))
    f = jax.vmap(
        jax.vmap(lambda s, m: expert_action(env, s, m, jax.random.PRNGKey(1)), (None, 0)), (0, None)
    )
    acts = jax.jit(f)(states, modes)
    assert acts.shape == (3, len(modes), 3)
    assert np.all(np.abs(np.asarray(acts)) <= 1.0)

"""Malformed and non-finite inputs to every registered gymnasium id, the functional step under
jit + vmap, and the host driver's count of non-finite observations.

Non-finite actions are replaced by safe values and counted; malformed actions and resets raise
a clear TypeError / ValueError and leave the env usable."""

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.host import HostDriver, has_nonfinite

NAN, INF = float("nan"), float("inf")

# Every id in the suite's namespace, whatever registered it.
ENV_IDS = sorted(i for i, spec in gymnasium.registry.items() if spec.namespace == "steerlab")

# name -> (actions stepped in order, whether the gripper must stay put)
NONFINITE = {
    "nan": ([[NAN, NAN, NAN]] * 3, True),
    "+inf": ([[INF, INF, INF]] * 2, True),
    "-inf": ([[-INF, -INF, -INF]] * 2, True),
    "1e6": ([[1e6, -1e6, 1e6]] * 2, False),
    "mixed": ([[NAN, 0.5, 1.0], [0.1, 0.1, -1.0], [0.2, INF, NAN], [-0.3, 0.0, 0.5]], False),
}

# name -> (action, error type); the error must name "action" and the expected shape
BAD_ACTIONS = {
    "len2": ([0.1, 0.2], ValueError),
    "len4": ([0.1, 0.2, 0.3, 0.4], ValueError),
    "2x3": (np.zeros((2, 3), np.float32), ValueError),
    "1x3": (np.zeros((1, 3), np.float32), ValueError),
    "scalar": (0.5, ValueError),
    "empty": ([], ValueError),
    "ragged": ([[0.1, 0.2], 0.3], ValueError),
    "none": (None, TypeError),
    "string": ("0.1 0.2 0.3", TypeError),
    "string_array": (np.array(["0.1", "0.2", "0.3"]), TypeError),
    "object": (np.array([0.1, 0.2, 0.3], dtype=object), TypeError),
    "none_entry": ([0.1, None, 0.3], TypeError),
    "complex": (np.array([0.1, 0.2, 0.3], np.complex64), TypeError),
    "bool": (np.array([True, False, True]), TypeError),
}

GOOD_ACTIONS = {
    "int_list": [1, 0, -1],
    "float_tuple": (0.1, -0.2, 0.3),
    "int32": np.array([0, 1, 0], np.int32),
    "float64": np.array([0.1, 0.2, -0.5]),
    "float64_huge": np.array([1e300, -1e300, 0.5]),
    "jax_f32": jnp.array([0.1, 0.2, 0.3]),
}

# name -> (reset options, error type, text the message must contain)
BAD_RESETS = {
    "key_none": ({"key": None}, TypeError, 'options["key"]'),
    "key_string": ({"key": "0"}, TypeError, 'options["key"]'),
    "key_int": ({"key": 7}, TypeError, 'options["key"]'),
    "key_shape3": ({"key": np.zeros(3, np.uint32)}, ValueError, 'options["key"]'),
    "key_batch": ({"key": np.zeros((2, 2), np.uint32)}, ValueError, 'options["key"]'),
    "key_int32": ({"key": np.zeros(2, np.int32)}, TypeError, 'options["key"]'),
    "key_float": ({"key": np.zeros(2, np.float32)}, TypeError, 'options["key"]'),
    "typed_key_batch": ({"key": jax.random.split(jax.random.key(0))}, ValueError,
                        'options["key"]'),
    "unknown_option": ({"seed": 3}, ValueError, "allowed"),
    "options_list": (["key"], TypeError, "options"),
}


@pytest.fixture(scope="module")
def gym_envs():
    made = {env_id: gymnasium.make(env_id) for env_id in ENV_IDS}
    yield made
    for env in made.values():
        env.close()


def _reset(env, seed=0):
    obs, info = env.reset(options={"key": jax.random.PRNGKey(seed)})
    return obs, info


def _assert_sane(env, obs, info):
    """The observation is finite and inside its space, and so is the functional state."""
    assert not has_nonfinite(obs)
    assert env.observation_space.contains(obs)
    for leaf in jax.tree.leaves(info["env_state"]):
        leaf = np.asarray(leaf)
        assert leaf.dtype.kind not in "fc" or np.isfinite(leaf).all()


def test_ids_are_discovered():
    assert ENV_IDS and set(envs.GYM_IDS) <= set(ENV_IDS)


@pytest.mark.parametrize("case", sorted(NONFINITE))
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_nonfinite_actions_are_replaced_and_counted(gym_envs, env_id, case):
    env = gym_envs[env_id]
    actions, still = NONFINITE[case]
    obs, info = _reset(env)
    start = obs["state"][:2].copy()
    assert info["nonfinite_actions"] == 0
    expected = 0
    for a in actions:
        expected += int(not np.isfinite(a).all())
        obs, reward, terminated, truncated, info = env.step(np.asarray(a))
        _assert_sane(env, obs, info)
        assert np.isfinite(reward) and not (terminated or truncated)
        assert info["nonfinite_actions"] == expected
    assert int(info["env_state"].nonfinite_actions) == expected
    if still:  # inf means no motion, not full speed
        np.testing.assert_array_equal(obs["state"][:2], start)
    _, info = _reset(env)
    assert info["nonfinite_actions"] == 0  # per episode


@pytest.mark.parametrize("case", sorted(BAD_ACTIONS))
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_malformed_actions_raise_and_leave_the_env_usable(gym_envs, env_id, case):
    env = gym_envs[env_id]
    action, error = BAD_ACTIONS[case]
    _reset(env)
    with pytest.raises(error, match=r"action must be .*\(3,\)"):
        env.step(action)
    obs, _, _, _, info = env.step(np.zeros(3, np.float32))
    _assert_sane(env, obs, info)
    assert int(info["env_state"].t) == 1 and info["nonfinite_actions"] == 0


@pytest.mark.parametrize("case", sorted(GOOD_ACTIONS))
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_real_actions_of_the_right_shape_are_accepted(gym_envs, env_id, case):
    env = gym_envs[env_id]
    _reset(env)
    obs, _, _, _, info = env.step(GOOD_ACTIONS[case])
    _assert_sane(env, obs, info)
    assert info["nonfinite_actions"] == 0


@pytest.mark.parametrize("case", sorted(BAD_RESETS))
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_malformed_resets_raise_and_leave_the_env_usable(gym_envs, env_id, case):
    env = gym_envs[env_id]
    options, error, text = BAD_RESETS[case]
    with pytest.raises(error) as err:
        env.reset(options=options)
    assert text in str(err.value)
    if text == 'options["key"]':
        assert "(2,)" in str(err.value) and "uint32" in str(err.value)
    if text == "allowed":
        assert "key" in str(err.value) and "seed" in str(err.value)
    # A raw and a typed key with the same data start the same episode.
    obs, info = _reset(env, seed=5)
    typed, _ = env.reset(options={"key": jax.random.key(5)})
    _assert_sane(env, obs, info)
    for k in obs:
        np.testing.assert_array_equal(obs[k], typed[k])


def test_safe_values_keep_the_grip_and_stop_the_motion():
    env = envs.make("pick_place", image=False)
    s, _ = env.reset(jax.random.PRNGKey(1))
    step = jax.jit(env.step_state)
    s = step(s, jnp.array([0.0, 0.0, 1.0]))  # close
    pos = s.grip_pos
    s = step(s, jnp.array([0.5, 0.5, NAN]))  # grip command unchanged: stays closed
    assert float(s.grip_closed) == 1.0 and not np.array_equal(s.grip_pos, pos)
    pos = s.grip_pos
    s = step(s, jnp.array([NAN, -INF, -1.0]))  # no motion; the finite grip still applies
    assert float(s.grip_closed) == 0.0
    np.testing.assert_array_equal(s.grip_pos, pos)
    s = step(s, jnp.array([INF, 0.25, 1.0]))  # only the non-finite axis is zeroed
    assert float(s.grip_pos[0]) == float(pos[0]) and float(s.grip_pos[1]) != float(pos[1])
    assert int(s.nonfinite_actions) == 3 and int(s.t) == 4


@pytest.mark.parametrize("task, variant, max_steps",
                         [("pick_place", "nominal", None), ("sort", "dynamics", 4)])
def test_nonfinite_actions_under_jit_and_vmap(task, variant, max_steps):
    """A batch where some actions have NaN / inf entries: every state stays finite and each
    env's count is the number of its non-finite steps taken before done (frozen after)."""
    env = envs.make(task, variant, image=False, max_steps=max_steps)
    B, T = 8, 6
    rng = np.random.default_rng(0)
    bad = rng.random((T, B, 3)) < 0.15
    actions = np.where(bad, rng.choice([NAN, INF, -INF], (T, B, 3)),
                       rng.uniform(-1.0, 1.0, (T, B, 3))).astype(np.float32)

    @jax.jit
    def run(keys, actions):
        s, _ = jax.vmap(env.reset)(keys)

        def body(s, a):
            nxt, obs, reward, _, _ = jax.vmap(env.step)(s, a)
            return nxt, (obs["state"], reward, s.done)

        return jax.lax.scan(body, s, actions)

    final, (obs, reward, done_before) = run(jax.random.split(jax.random.PRNGKey(0), B), actions)
    expected = (bad.any(-1) & ~np.asarray(done_before)).sum(0)
    assert expected.sum() > 0
    if max_steps:  # steps after done are frozen: their non-finite actions do not count
        assert (bad.any(-1) & np.asarray(done_before)).any()
    np.testing.assert_array_equal(final.nonfinite_actions, expected)
    assert np.isfinite(obs).all() and np.isfinite(reward).all()
    for leaf in jax.tree.leaves(final):
        assert not jnp.issubdtype(leaf.dtype, jnp.floating) or bool(jnp.isfinite(leaf).all())


class _NaNObsEnv:
    """A JAX-free env whose observation turns NaN on the steps in ``bad_steps``."""

    def __init__(self, bad_steps=()):
        self.bad_steps, self.t = set(bad_steps), 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 0.0, False, False, {}

    def _obs(self):
        x = np.full(2, NAN if self.t in self.bad_steps else 0.5, np.float32)
        return {"x": x, "t": np.int32(self.t)}

    def close(self):
        pass


def test_host_driver_counts_nonfinite_observations_per_env():
    factory = iter([_NaNObsEnv({1, 3}), _NaNObsEnv(), _NaNObsEnv({0, 1})]).__next__
    with HostDriver(factory, num_envs=3) as driver:
        obs, _ = driver.reset([0, 1, 2], [None] * 3)
        np.testing.assert_array_equal(driver.nonfinite_obs, [0, 0, 1])  # env 2 at reset
        active = np.array([True, True, False])
        for _ in range(3):
            obs, *_ = driver.step(np.zeros((3, 3)), active)
        assert np.isnan(obs["x"][0]).all()  # passed on unchanged, but counted
        np.testing.assert_array_equal(driver.nonfinite_obs, [2, 0, 1])  # env 2 not stepped
        driver.reset([0, 1, 2], [None] * 3)
        np.testing.assert_array_equal(driver.nonfinite_obs, [0, 0, 1])


def test_host_driver_with_nonfinite_actions_sees_finite_observations():
    factory = lambda: envs.TabletopGymEnv(task="reach", image=False, max_steps=12)
    keys = [{"key": np.asarray(jax.random.PRNGKey(i))} for i in range(2)]
    with HostDriver(factory, num_envs=2) as driver:
        driver.reset([0, 1], keys)
        actions = np.array([[NAN, 0.0, 0.0], [0.1, 0.1, 0.1]], np.float32)
        for _ in range(2):
            obs, _, _, _, infos = driver.step(actions, np.ones(2, bool))
        assert not has_nonfinite(obs)
        np.testing.assert_array_equal(driver.nonfinite_obs, [0, 0])
        assert [info["nonfinite_actions"] for info in infos] == [2, 0]

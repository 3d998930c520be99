"""Scripted experts for the tabletop suite: the successful mode and plausible failure modes.

Every expert is a state-feedback rule: ``expert_action(env, state, mode, key)`` depends only on
the state, the step counter inside it and ``key``, which is fixed for a segment of an episode.
Latents (the arc direction of a detour, hesitation coins) are drawn from ``key``, so the
expert can be queried at any state, e.g. to label a chunk with its nearest mode.

Modes (``MODES[task]``, "optimal" first; the index of a mode is the same in every task):
    optimal       the successful mode pi*; takes the shorter gap where a wall is in the way
    hesitant      pauses (jitters in place) on about 65% of steps and moves at half speed:
                  runs out of time
    detour        moves along a wide arc (velocity rotated ~65 degrees off the goal direction),
                  about twice as slow
    sloppy        stops short / opens the gripper 0.15 from the goal and leaves the block there
    wrong_object  goes for the block the instruction does not name (sort: swaps the zones);
                  not available in push, which has a single block
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from envs.tabletop import TabletopEnv
from envs.tabletop_world import (
    CONTACT,
    GRIPPER_RADIUS,
    NUM_ZONES,
    PLACE_RADIUS,
    SPEED,
    TabletopState,
)

ALL_MODES = ("optimal", "hesitant", "detour", "sloppy", "wrong_object")
MODES: dict[str, tuple[str, ...]] = {
    "reach": ALL_MODES,
    "push": ALL_MODES[:4],
    "pick_place": ALL_MODES,
    "sort": ALL_MODES,
}

# Per mode: pause probability, speed scale, arc angle (rad), slack (stop/release distance), swap.
_MODE_PARAMS = {
    "optimal": (0.0, 1.0, 0.0, 0.0, 0.0),
    "hesitant": (0.65, 0.5, 0.0, 0.0, 0.0),
    "detour": (0.0, 1.0, 1.15, 0.0, 0.0),
    "sloppy": (0.0, 1.0, 0.0, 0.15, 0.0),
    "wrong_object": (0.0, 1.0, 0.0, 0.0, 1.0),
}
_RELEASE_TOL = 0.02  # pi* opens the gripper this close to the zone centre
_GRASP_TOL = 0.035  # close the gripper this close to the block
_GAP_MARGIN = 0.09  # waypoints sit this far beyond a wall end


def mode_index(task: str, mode: str) -> int:
    if mode not in MODES[task]:
        raise ValueError(f"mode: unknown {mode!r} for task {task!r}; allowed: {MODES[task]}")
    return MODES[task].index(mode)


@functools.cache
def _param_table(task: str) -> np.ndarray:
    return np.array([_MODE_PARAMS[m] for m in MODES[task]], np.float32)  # [n_modes, 5]


def _waypoint(pos, goal, wall, wall_active):
    """Where to head for `goal`: the goal itself, or a gap when a wall is in the way.

    The gap is the one with the shorter path from `pos` via the gap to `goal`, a function of
    the state alone: with a hidden per-episode route choice, a chunk policy re-planning from
    the same state would switch between the two routes and dither in front of the wall.
    Layouts still put the wall so that either gap is used depending on where things are.
    """
    wy = 0.5 * (wall[1] + wall[3])
    opposite = (pos[1] - wy) * (goal[1] - wy) < 0
    dy = goal[1] - pos[1]
    dy = jnp.where(jnp.abs(dy) > 1e-6, dy, 1e-6)
    xi = pos[0] + (wy - pos[1]) * (goal[0] - pos[0]) / dy  # where the straight line meets y=wy
    m = GRIPPER_RADIUS + 0.02
    hits = opposite & (xi > wall[0] - m) & (xi < wall[2] + m) & (wall_active > 0)
    side = jnp.sign(goal[1] - wy)
    gaps = jnp.array([wall[0] - _GAP_MARGIN, wall[2] + _GAP_MARGIN])  # left, right
    via = jnp.stack([gaps, jnp.full(2, wy)], -1)  # [2, 2]
    length = jnp.linalg.norm(via - pos, axis=-1) + jnp.linalg.norm(goal - via, axis=-1)
    gap_x = gaps[jnp.argmin(length)]
    # Aim just past the wall line so the gripper crosses it and the wall test turns false.
    wp = jnp.stack([gap_x, wy + side * 0.07])
    return jnp.where(hits, wp, goal)


def _seg_dist(p, a, b):
    """Distance from point p to segment a-b."""
    ab = b - a
    t = jnp.clip(jnp.dot(p - a, ab) / jnp.maximum(jnp.dot(ab, ab), 1e-9), 0.0, 1.0)
    return jnp.linalg.norm(a + t * ab - p)


def _push_point(pos, block, zone):
    """Push task: where the gripper should head to shove `block` toward `zone`."""
    to_zone = zone - block
    u = to_zone / jnp.maximum(jnp.linalg.norm(to_zone), 1e-6)
    behind = block - u * (CONTACT + 0.015)
    rel = pos - block
    along = jnp.dot(rel, u)
    perp = rel - along * u
    aligned = (
        (along < -CONTACT + 0.025) & (along > -CONTACT - 0.05) & (jnp.linalg.norm(perp) < 0.02)
    )
    push_to = zone - u * CONTACT  # gripper position that leaves the block on the zone centre
    # Go around the block (on the gripper's side) when the way behind it passes through it.
    n = jnp.stack([-u[1], u[0]])
    n = jnp.where(jnp.dot(rel, n) >= 0, n, -n)
    around = block + n * (CONTACT + 0.04) - u * 0.06
    blocked = _seg_dist(block, pos, behind) < CONTACT + 0.005
    approach = jnp.where(blocked, around, behind)
    return jnp.where(aligned, push_to, approach)


def expert_action(
    env: TabletopEnv, state: TabletopState, mode: int | jax.Array, key: jax.Array
) -> jax.Array:
    """-> f32 [A] = (dx, dy, grip). Pure and vmappable over states, modes and keys."""
    task = env.task
    params = jnp.asarray(_param_table(task))[mode]
    pause_p, speed, arc, slack, swap = (params[i] for i in range(5))
    key = _raw(key)
    latent = jax.random.uniform(key, ())  # per-episode: the arc direction of a detour
    arc = arc * jnp.where(latent < 0.5, 1.0, -1.0)

    s = state
    pos = s.grip_pos
    n_core = env.layout.n_core
    core = (jnp.arange(s.target.shape[0]) < n_core).astype(jnp.float32)
    target = jnp.where(swap > 0, core * (1.0 - s.target), s.target)
    goal = jnp.where(swap > 0, s.goal[:, ::-1] if task == "sort" else s.goal, s.goal)
    if task != "sort":
        # The wrong block goes where the right one should have gone.
        goal = jnp.where(swap > 0, target[:, None] * jnp.sum(s.goal, 0)[None, :], goal)
    goal_pos = goal @ s.zone_pos  # [K, 2]

    if task == "reach":
        obj = target @ s.obj_pos
        d = jnp.linalg.norm(obj - pos)
        point = _waypoint(pos, obj, s.wall, s.wall_active)
        point = jnp.where(d < slack, pos, point)
        grip = jnp.float32(-1.0)
    elif task == "push":
        obj = target @ s.obj_pos
        zone = target @ goal_pos
        point = _push_point(pos, obj, zone)
        point = jnp.where(jnp.linalg.norm(obj - zone) < slack, pos, point)
        grip = jnp.float32(-1.0)
    else:
        d_zone = jnp.linalg.norm(s.obj_pos - goal_pos, axis=-1)  # [K]
        finished = (d_zone < jnp.maximum(PLACE_RADIUS, slack)) & (s.held == 0)
        pending = (target > 0) & ~finished
        # Work through blocks in zone order (the block for zone 0 first).
        zone_idx = jnp.sum(goal * jnp.arange(NUM_ZONES), -1)
        rank = jnp.where(pending, zone_idx, 1e3) + 1e-3 * jnp.arange(target.shape[0])
        current = jax.nn.one_hot(jnp.argmin(rank), target.shape[0]) * jnp.any(pending)
        obj = current @ s.obj_pos
        zone = current @ goal_pos
        held_cur = jnp.sum(current * s.held) > 0
        held_other = jnp.sum((1.0 - current) * s.held) > 0
        release_tol = jnp.maximum(_RELEASE_TOL, slack)
        at_zone = jnp.linalg.norm(obj - zone) < release_tol
        near_obj = jnp.linalg.norm(obj - pos) < _GRASP_TOL
        carry_point = _waypoint(pos, zone, s.wall, s.wall_active)
        fetch_point = _waypoint(pos, obj, s.wall, s.wall_active)
        point = jnp.where(held_cur, carry_point, fetch_point)
        grip = jnp.where(held_cur, jnp.where(at_zone, -1.0, 1.0), jnp.where(near_obj, 1.0, -1.0))
        stop = (held_cur & at_zone) | held_other | ~jnp.any(pending)
        grip = jnp.where(held_other | ~jnp.any(pending), -1.0, grip)
        point = jnp.where(stop, pos, point)

    delta = point - pos
    # The arc straightens out near the goal, so a detour is slow but still arrives.
    arc = arc * jnp.minimum(jnp.linalg.norm(delta) / 0.25, 1.0)
    c, sn = jnp.cos(arc), jnp.sin(arc)
    delta = jnp.stack([c * delta[0] - sn * delta[1], sn * delta[0] + c * delta[1]])
    # Scale (not clip) so the heading is kept: pushing and gap-threading need the direction.
    step = SPEED * s.gain
    move = delta / jnp.maximum(step, jnp.max(jnp.abs(delta))) * speed
    # Hesitation: a step-indexed coin from the episode key, so it is reproducible at any state.
    coin = jax.random.uniform(jax.random.fold_in(key, s.t), (3,))
    pause = coin[0] < pause_p
    jitter = 0.6 * coin[1:] - 0.3
    move = jnp.where(pause, jitter, move)
    return jnp.concatenate([move, jnp.reshape(grip, (1,))]).astype(jnp.float32)


def _raw(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def expert_chunk(
    env: TabletopEnv, state: TabletopState, mode: int | jax.Array, key: jax.Array, H: int
) -> jax.Array:
    """The H actions the expert takes from a copy of `state` -> f32 [H, A]."""

    def body(s, _):
        a = expert_action(env, s, mode, key)
        return env.step_state(s, a), a

    _, actions = jax.lax.scan(body, state, None, length=H)
    return actions


def segment_key(key: jax.Array, t: jax.Array, segment: int) -> jax.Array:
    """The expert key of the segment that step ``t`` falls in (``segment`` 0: one per episode)."""
    return jax.random.fold_in(_raw(key), t // segment if segment else 0)


def rollout(env: TabletopEnv, key: jax.Array, modes: int | jax.Array, segment: int = 0,
            num_steps: int | None = None):
    """One expert episode from reset, as a compiled scan; vmap over keys and modes.

    ``modes``: one mode for the whole episode (``segment`` 0), or i32 [S] with a mode per
    segment of ``segment`` steps (segment j covers steps j*segment ... (j+1)*segment - 1; the last
    entry repeats past the end). Each segment draws its own expert latents (detour side,
    hesitation coins) from ``segment_key``. Per-segment modes make the demonstrations a mixture
    at every decision state (a chunk policy re-plans every few steps and cannot know which mode
    an episode "is in"), which is the per-step mixture a pseudo-count verifier estimates.

    -> dict of per-step arrays [T, ...]: "obs" (dict, the observation the action was taken
    at), "action", "mode" (the mode that took it), "reward", "done", "success", "progress"
    (after the step), "wrong_block" (a block the instruction does not name is held after the
    step) and "valid" (the step happened before the episode ended).
    """
    T = num_steps or env.max_steps
    k_reset, k_expert = jax.random.split(_raw(key))
    modes = jnp.atleast_1d(jnp.asarray(modes, jnp.int32))
    state, obs = env.reset(k_reset)

    def body(carry, _):
        s, o = carry
        seg = jnp.minimum(s.t // segment if segment else 0, modes.shape[0] - 1)
        mode = modes[seg]
        a = expert_action(env, s, mode, segment_key(k_expert, s.t, segment))
        s2, o2, r, d, info = env.step(s, a)
        out = {
            "obs": o,
            "action": a,
            "mode": mode,
            "reward": r,
            "done": d,
            "success": info["success"],
            "progress": info["progress"],
            "wrong_block": wrong_block(env, s2),
            "valid": ~s.done,
        }
        return (s2, o2), out

    _, traj = jax.lax.scan(body, (state, obs), None, length=T)
    return traj


def wrong_block(env: TabletopEnv, state: TabletopState) -> jax.Array:
    """bool []: the gripper holds a block the instruction does not name (a grounding failure)."""
    return jnp.sum(state.held * (1.0 - state.target) * state.obj_active) > 0


# ---- the mode classifier --------------------------------------------------------------------
# A chunk is labelled by the expert mode whose chunk from the same state is nearest (L2). Modes
# with random latents (detour side, hesitation coins) are represented by PROTOTYPES draws with
# fixed keys, the mode's distance being the nearest draw; modes whose chunks coincide at a state
# (pi* and sloppy agree until the release) tie, and a tie splits the label evenly between them
# instead of crediting the first mode. Data and policy chunks go through the same function.
PROTOTYPES = 8
_PROTOTYPE_KEY = 7
TIE_TOL = 1e-4


def mode_chunks(env: TabletopEnv, state: TabletopState, key: jax.Array, H: int) -> jax.Array:
    """Every mode's next H actions from ``state`` with expert key ``key`` -> f32 [n_modes, H, A]
    in MODES[env.task] order (index 0 is pi*)."""
    modes = jnp.arange(len(MODES[env.task]))
    return jax.vmap(lambda m: expert_chunk(env, state, m, key, H))(modes)


def mode_prototypes(env: TabletopEnv, state: TabletopState, H: int) -> jax.Array:
    """f32 [n_modes, PROTOTYPES, H, A]: each mode's chunk under PROTOTYPES fixed latent draws."""
    keys = jax.random.split(jax.random.PRNGKey(_PROTOTYPE_KEY), PROTOTYPES)
    return jax.vmap(lambda k: mode_chunks(env, state, k, H), out_axes=1)(keys)


def mode_weights(prototypes: jax.Array, chunk: jax.Array) -> jax.Array:
    """Label of ``chunk`` [H, A] against ``prototypes`` [n_modes, P, H, A] -> f32 [n_modes]:
    1 on the nearest mode, or 1/k on each of k modes tied (within TIE_TOL) for nearest."""
    dist = jnp.sqrt(jnp.sum((prototypes - chunk[None, None]) ** 2, axis=(2, 3))).min(1)
    nearest = (dist <= dist.min() + TIE_TOL).astype(jnp.float32)
    return nearest / nearest.sum()


def classify_chunk(env: TabletopEnv, state: TabletopState, chunk: jax.Array) -> jax.Array:
    """Mode label of ``chunk`` f32 [h, A] executed from ``state`` -> f32 [n_modes] (sums to 1)."""
    return mode_weights(mode_prototypes(env, state, chunk.shape[0]), chunk)

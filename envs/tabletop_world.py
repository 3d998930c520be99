"""The tabletop world: geometry constants, the state and its vector layout, the sampling regions
of each (task, variant), and the pure rules the env (``envs.tabletop``) steps with.

Mechanics: the action (dx, dy, grip) is clipped to [-1, 1] (non-finite entries are replaced by
safe values and counted, see ``TabletopEnv.step``); the gripper moves by
``(dx, dy) * SPEED * gain`` and slides along walls (per-axis collision). grip > 0 closes it; a
closed gripper picks up the nearest block within ``PICK_RADIUS`` and carries it; opening drops
it. Only in ``push`` is the gripper lowered onto the table, so there it pushes blocks instead.

Progress is dense in [0, 1], exactly 1 at success and below 1 otherwise: distance-shaped terms
for reaching the object, grasping it, and bringing it to its zone (see ``_evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from envs.language import COLOURS

NUM_OBJECTS = 4  # object slots (K); unused slots are inactive
NUM_ZONES = 2  # zone slots (Z)
NUM_COLOURS = len(COLOURS)  # C
SPEED = 0.04  # table units per step at full action
GRIPPER_RADIUS = 0.03
BLOCK_HALF = 0.03  # blocks are squares of side 0.06
CONTACT = 0.065  # gripper-block centre distance at which a lowered gripper pushes
PICK_RADIUS = 0.05
REACH_RADIUS = 0.05
ZONE_RADIUS = 0.09  # drawn size of a zone
PLACE_RADIUS = 0.06  # a block counts as in a zone within this distance of its centre
WALL_HALF = 0.02  # half thickness of a wall
SLIP_STD = 0.006
SLIP_PROB = 0.01
_SHAPE_SCALE = 0.8  # distance that maps to zero in distance-shaped progress terms

# obs["state"]: gripper xy, closed, holding | per object: xy, xy - gripper xy, active, held,
# colour one-hot | per zone: xy, xy - gripper xy, active, colour one-hot (zeros = neutral) |
# wall x0 y0 x1 y1, active. The gripper-relative offsets are what a robot's state
# observation usually carries too (ManiSkill's tcp_to_obj_pos): grasping needs the gap to the
# block to within a few hundredths, which a small network reads poorly off two absolute positions.
OBJECT_FEATURES = 6 + NUM_COLOURS
ZONE_FEATURES = 5 + NUM_COLOURS
# The elapsed-time fraction t/T is not part of it: it is obs["time"], which critics may read
# and base policies do not (a policy that sees t/T learns that slow modes own late steps and
# locks itself into them).
STATE_DIM = 4 + NUM_OBJECTS * OBJECT_FEATURES + NUM_ZONES * ZONE_FEATURES + 5
# The entities of the state vector, in order (see TabletopEnv.state_vector): (name, count, size).
STATE_GROUPS = (
    ("gripper", 1, 4),
    ("object", NUM_OBJECTS, OBJECT_FEATURES),
    ("zone", NUM_ZONES, ZONE_FEATURES),
    ("scene", 1, 5),
)
assert sum(n * d for _, n, d in STATE_GROUPS) == STATE_DIM


@struct.dataclass
class TabletopState:
    grip_pos: jax.Array  # f32 [2]
    grip_closed: jax.Array  # f32 [] 1 when closed
    held: jax.Array  # f32 [K] one-hot of the carried block, zeros when none
    obj_pos: jax.Array  # f32 [K, 2]
    obj_active: jax.Array  # f32 [K]
    obj_colour: jax.Array  # f32 [K, C] one-hot
    zone_pos: jax.Array  # f32 [Z, 2]
    zone_active: jax.Array  # f32 [Z]
    zone_colour: jax.Array  # f32 [Z, C] one-hot, zeros for a neutral zone
    wall: jax.Array  # f32 [4] x0, y0, x1, y1
    wall_active: jax.Array  # f32 []
    target: jax.Array  # f32 [K] blocks the instruction names
    goal: jax.Array  # f32 [K, Z] block k belongs in zone z
    gain: jax.Array  # f32 [] action gain (1 outside the dynamics variant)
    instruction: jax.Array  # i32 [L]
    key: jax.Array  # u32 [2] stream for slip noise
    t: jax.Array  # i32 []
    done: jax.Array  # bool []
    success: jax.Array  # bool []
    progress: jax.Array  # f32 []
    # Steps this episode whose action had a NaN or inf entry (replaced by safe values).
    nonfinite_actions: jax.Array  # i32 []

    def __eq__(self, other) -> bool:
        # Value equality of every leaf (host-side), so states compare like observations do.
        if type(other) is not type(self):
            return NotImplemented
        a, b = jax.tree.leaves(self), jax.tree.leaves(other)
        return len(a) == len(b) and all(
            x.shape == y.shape and bool(jnp.all(x == y)) for x, y in zip(a, b, strict=True)
        )

    __hash__ = None


# The fields a step can change (frozen after done by TabletopEnv.step_state).
_DYNAMIC = (
    "grip_pos",
    "grip_closed",
    "held",
    "obj_pos",
    "key",
    "t",
    "done",
    "success",
    "progress",
    "nonfinite_actions",
)


@dataclass(frozen=True)
class _Layout:
    """Static sampling regions and counts for one (task, variant)."""

    n_core: int  # blocks that take part in the task
    n_objects: int  # core + distractors
    n_zones: int
    wall_prob: float
    obj_x: tuple[float, float]
    obj_y: tuple[float, float]
    zone_x: tuple[float, float]
    zone_y: tuple[float, float]
    start_x: tuple[float, float]
    start_y: tuple[float, float]
    wall_y: float
    wall_x: tuple[float, float]  # nominal x0, x1 before jitter


def _layout(task: str, variant: str) -> _Layout:
    n_core = {"reach": 2, "push": 1, "pick_place": 2, "sort": 2}[task]
    n_zones = {"reach": 0, "push": 1, "pick_place": 1, "sort": 2}[task]
    wall_prob = {"reach": 0.5, "push": 0.0, "pick_place": 1.0, "sort": 0.0}[task]
    n_objects = min(n_core + 2, NUM_OBJECTS) if variant == "distractors" else n_core
    shifted = variant == "layout"
    if task == "push":
        obj_y = (0.36, 0.48) if shifted else (0.28, 0.42)
        start_y = (0.14, 0.2) if shifted else (0.06, 0.1)
        zone_y = (0.66, 0.76) if shifted else (0.72, 0.86)
        obj_x = (0.3, 0.95) if shifted else (0.12, 0.88)
    else:
        obj_y = (0.3, 0.4) if shifted else (0.1, 0.28)
        obj_x = (0.05, 0.95) if shifted else (0.12, 0.88)
        zone_y = (0.66, 0.74) if shifted else (0.74, 0.86)
        start_y = (0.55, 0.6) if task == "sort" else (0.86, 0.92)
        if shifted:
            start_y = (0.6, 0.7) if task == "sort" else (0.8, 0.84)
    return _Layout(
        n_core=n_core,
        n_objects=n_objects,
        n_zones=n_zones,
        wall_prob=wall_prob,
        obj_x=obj_x,
        obj_y=obj_y,
        zone_x=(0.5, 0.9) if shifted else (0.2, 0.8),
        zone_y=zone_y,
        start_x=(0.7, 0.85) if shifted else (0.4, 0.6),
        start_y=start_y,
        wall_y=0.56 if shifted else 0.52,
        wall_x=(0.3, 0.85) if shifted else (0.22, 0.78),
    )


def _safe_action(action: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (action f32 [A] with non-finite entries zeroed and all clipped to [-1, 1],
    finite bool [A] of the entries after the cast to float32). Zeroing before the clip keeps
    +-inf from acting as a full-speed command; finite actions come out exactly as the plain
    clip gives them."""
    a = action.astype(jnp.float32)
    finite = jnp.isfinite(a)
    return jnp.clip(jnp.where(finite, a, 0.0), -1.0, 1.0), finite


def _blocked(x, y, wall, wall_active):
    r = GRIPPER_RADIUS
    inside = (x > wall[0] - r) & (x < wall[2] + r) & (y > wall[1] - r) & (y < wall[3] + r)
    return inside & (wall_active > 0)


def _slide(pos, move, wall, wall_active):
    """Move one axis at a time and cancel the component that would enter the wall, so the
    gripper slides along walls instead of sticking to them."""
    x = jnp.clip(pos[0] + move[0], 0.0, 1.0)
    x = jnp.where(_blocked(x, pos[1], wall, wall_active), pos[0], x)
    y = jnp.clip(pos[1] + move[1], 0.0, 1.0)
    y = jnp.where(_blocked(x, y, wall, wall_active), pos[1], y)
    return jnp.stack([x, y])


def goal_positions(s: TabletopState) -> jax.Array:
    """f32 [K, 2]: the centre of the zone each block belongs in (zeros for none)."""
    return s.goal @ s.zone_pos


def _shape(d):
    return 1.0 - jnp.minimum(d / _SHAPE_SCALE, 1.0)


def _evaluate(task: str, s: TabletopState):
    g = s.grip_pos
    d_grip = jnp.sqrt(jnp.sum((s.obj_pos - g) ** 2, -1))  # [K]
    n_target = jnp.maximum(jnp.sum(s.target), 1.0)
    if task == "reach":
        d = jnp.sum(d_grip * s.target) / n_target
        success = d < REACH_RADIUS
        progress = _shape(d)
    else:
        d_zone = jnp.sqrt(jnp.sum((s.obj_pos - goal_positions(s)) ** 2, -1))  # [K]
        placed = (d_zone < PLACE_RADIUS) & (s.held == 0)
        success = jnp.all(placed | (s.target == 0))
        if task == "push":
            part = 0.3 * _shape(d_grip) + 0.65 * _shape(d_zone)
        else:
            # reach the block, grasp it, carry it (distance-shaped), place it
            part = 0.25 * _shape(d_grip) + 0.15 * s.held + 0.55 * _shape(d_zone)
        part = jnp.where(placed, 1.0, part)
        progress = jnp.sum(part * s.target) / n_target
    progress = jnp.where(success, 1.0, jnp.clip(progress, 0.0, 0.99))
    return success, progress.astype(jnp.float32)

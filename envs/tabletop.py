"""Pure-JAX tabletop suite: a gripper over a unit-square table with blocks, zones and walls.

Tasks (``TASKS``):
    reach       move the gripper onto the named block (two blocks; a wall in half the layouts)
    push        push the block into the zone; the block cannot be grasped, the open gripper
                shoves it on contact
    pick_place  two blocks of different colours; carry the named one over the wall into the zone
    sort        two blocks, two zones of matching colours; each block to its zone (long horizon)

Mechanics: the action (dx, dy, grip) is clipped to [-1, 1] (non-finite entries are replaced by
safe values and counted, see ``TabletopEnv.step``); the gripper moves by
``(dx, dy) * SPEED * gain`` and slides along walls (per-axis collision). grip > 0 closes it; a
closed gripper picks up the nearest block within ``PICK_RADIUS`` and carries it; opening drops
it. Only in ``push`` is the gripper lowered onto the table, so there it pushes blocks instead.

Variants (``VARIANTS``): ``nominal``; ``layout`` (objects, zones, walls and the start drawn
from shifted regions); ``distractors`` (two extra blocks of the unused colours); ``dynamics``
(per-episode action gain in [0.75, 1.25], Gaussian slip of the motion, and a small chance per
step that a carried block slips out); ``paraphrase`` (held-out instruction templates only).

Reward: ``reward="sparse"`` gives 1.0 on the step that reaches success, else 0;
``reward="progress"`` gives the *increment* of ``info["progress"]`` (p_t - p_{t-1}), so an
episode's return is its final progress minus its initial progress.

Progress is dense in [0, 1], exactly 1 at success and below 1 otherwise: distance-shaped terms
for reaching the object, grasping it, and bringing it to its zone (see ``_progress``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from envs.base import ACTION_DIM, EnvSpec
from envs.language import COLOURS, INSTRUCTION_LEN, VOCAB, instruction_table
from envs.render import render_state

TASKS = ("reach", "push", "pick_place", "sort")
VARIANTS = ("nominal", "layout", "distractors", "dynamics", "paraphrase")
REWARDS = ("sparse", "progress")
# Time limits: pi* (every step its own) always finishes within them; the default per-step mixture
# of demonstrations (envs.mixture.MIXTURES["premise"]) finishes in about 60% of episodes, so the
# base policy has room to fail and a verifier room to help. Failure is mostly running out of
# time after slow chunks (hesitant, detour) or a sloppy release that must be redone.
DEFAULT_MAX_STEPS = {"reach": 26, "push": 42, "pick_place": 54, "sort": 80}

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
# The entities of the state vector, in order (see state_vector): (name, count, size).
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


def _raw_key(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _validate(task: str, variant: str, reward: str, max_steps: int | None) -> None:
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; allowed values are {TASKS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; allowed values are {VARIANTS}")
    if reward not in REWARDS:
        raise ValueError(f"reward: unknown {reward!r}; allowed values are {REWARDS}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps: must be a positive int or None, got {max_steps!r}")


@dataclass(frozen=True)
class TabletopEnv:
    """One (task, variant) of the suite. Frozen and hashable: usable as a jit static argument."""

    task: str
    variant: str = "nominal"
    image: bool = True
    max_steps: int = 0  # filled by make()
    reward: str = "sparse"

    def __post_init__(self):
        _validate(self.task, self.variant, self.reward, self.max_steps or None)
        if not self.max_steps:
            object.__setattr__(self, "max_steps", DEFAULT_MAX_STEPS[self.task])

    @property
    def spec(self) -> EnvSpec:
        return EnvSpec(
            task=self.task,
            variant=self.variant,
            state_dim=STATE_DIM,
            action_dim=ACTION_DIM,
            instruction_len=INSTRUCTION_LEN,
            vocab_size=len(VOCAB),
            num_tasks=len(TASKS),
            max_steps=self.max_steps,
            image=self.image,
            state_groups=STATE_GROUPS,
        )

    @property
    def task_id(self) -> int:
        return TASKS.index(self.task)

    @property
    def layout(self) -> _Layout:
        return _layout(self.task, self.variant)

    # ---------------------------------------------------------------- reset

    def reset(self, key: jax.Array) -> tuple[TabletopState, dict]:
        state = self.reset_state(key)
        return state, self.observe(state)

    def reset_state(self, key: jax.Array) -> TabletopState:
        lay = self.layout
        K, Z, C = NUM_OBJECTS, NUM_ZONES, NUM_COLOURS
        k_draw, k_stream = jax.random.split(_raw_key(key))
        # One threefry draw for every random quantity keeps reset cheap to compile and run.
        r = jax.random.uniform(k_draw, (32,), jnp.float32)
        u = lambda i, lo_hi, n=None: (
            lo_hi[0] + (lo_hi[1] - lo_hi[0]) * (r[i] if n is None else r[i : i + n])
        )
        # Blocks sit in distinct x bins (random bin per slot) so they never overlap.
        bins = jnp.argsort(r[0:K]).astype(jnp.float32)
        width = (lay.obj_x[1] - lay.obj_x[0]) / K
        jitter = 0.5 * width - 0.055
        ox = lay.obj_x[0] + (bins + 0.5) * width + u(4, (-jitter, jitter), K)
        oy = u(8, lay.obj_y, K)
        active = (jnp.arange(K) < lay.n_objects).astype(jnp.float32)
        obj_pos = jnp.stack([ox, oy], -1) * active[:, None]
        colours = jnp.argsort(r[12 : 12 + C])[:K]
        obj_colour = jax.nn.one_hot(colours, C) * active[:, None]

        # The instruction names block `first` (and `second` for sort) among the core blocks.
        first = jnp.minimum((r[16] * lay.n_core).astype(jnp.int32), lay.n_core - 1)
        second = (first + 1) % max(lay.n_core, 1)
        target = jax.nn.one_hot(first, K)
        if self.task == "sort":
            target = target + jax.nn.one_hot(second, K)

        # Zones: sort puts one zone in each half (random order); others use one zone.
        zx = u(17, lay.zone_x, Z)
        zy = u(19, lay.zone_y, Z)
        if self.task == "sort":
            mid = 0.5 * (lay.zone_x[0] + lay.zone_x[1])
            left = u(21, (lay.zone_x[0], mid - 0.12))
            right = u(22, (mid + 0.12, lay.zone_x[1]))
            zx = jnp.where(r[23] < 0.5, jnp.stack([right, left]), jnp.stack([left, right]))
        zone_active = (jnp.arange(Z) < lay.n_zones).astype(jnp.float32)
        zone_pos = jnp.stack([zx, zy], -1) * zone_active[:, None]
        goal = jnp.zeros((K, Z), jnp.float32)
        zone_colour = jnp.zeros((Z, C), jnp.float32)
        if lay.n_zones >= 1:
            goal = goal.at[first, 0].set(1.0)
        if self.task == "sort":
            goal = goal.at[second, 1].set(1.0)
            zone_colour = goal.T @ obj_colour  # each zone takes its block's colour

        wall_active = (r[24] < lay.wall_prob).astype(jnp.float32)
        wj = u(25, (-0.04, 0.04), 2)
        wall = jnp.array(
            [lay.wall_x[0], lay.wall_y - WALL_HALF, lay.wall_x[1], lay.wall_y + WALL_HALF]
        )
        wall = (wall + jnp.array([wj[0], wj[1], wj[0], wj[1]])) * wall_active

        start = jnp.stack([u(27, lay.start_x), u(28, lay.start_y)])
        gain = jnp.float32(1.0)
        if self.variant == "dynamics":
            gain = u(29, (0.75, 1.25))

        table = jnp.asarray(instruction_table(self.task, self.variant == "paraphrase"))
        n_templates = table.shape[0]
        template = jnp.minimum((r[30] * n_templates).astype(jnp.int32), n_templates - 1)
        instruction = table[template, colours[first], colours[second]]

        state = TabletopState(
            grip_pos=start,
            grip_closed=jnp.float32(0.0),
            held=jnp.zeros((K,), jnp.float32),
            obj_pos=obj_pos,
            obj_active=active,
            obj_colour=obj_colour,
            zone_pos=zone_pos,
            zone_active=zone_active,
            zone_colour=zone_colour,
            wall=wall,
            wall_active=wall_active,
            target=target,
            goal=goal,
            gain=gain,
            instruction=instruction,
            key=k_stream,
            t=jnp.int32(0),
            done=jnp.bool_(False),
            success=jnp.bool_(False),
            progress=jnp.float32(0.0),
            nonfinite_actions=jnp.int32(0),
        )
        success, progress = self._evaluate(state)
        return state.replace(success=success, progress=progress)

    # ---------------------------------------------------------------- step

    def step(self, state: TabletopState, action: jax.Array):
        """-> (state, obs, reward f32[], done bool[], info {"success", "progress"}).

        Non-finite actions: this step runs inside compiled evaluations, so it cannot raise.
        A NaN or +-inf entry is replaced by a safe value instead: a motion component (dx, dy)
        by 0 (no motion on that axis), the grip component by the current grip (unchanged).
        Finite entries are clipped to [-1, 1] as usual (1e6 acts as 1). Each step whose action
        had any non-finite entry adds 1 to ``state.nonfinite_actions`` (per episode; frozen
        after ``done`` like the rest of the state), so a broken policy is visible, not hidden.
        """
        new = self.step_state(state, action)
        if self.reward == "sparse":
            reward = (new.success & ~state.done).astype(jnp.float32)
        else:
            reward = jnp.where(state.done, 0.0, new.progress - state.progress)
        info = {"success": new.success, "progress": new.progress}
        return new, self.observe(new), reward, new.done, info

    def step_state(self, state: TabletopState, action: jax.Array) -> TabletopState:
        """The transition without the observation (experts and oracles simulate with this)."""
        new = self._advance(state, action)
        # Frozen after done: select, not cond, so the step stays branch-free under vmap. Only
        # the fields a step can change are selected; the layout fields are passed through.
        keep = lambda old, nxt: jnp.where(state.done, old, nxt)
        return new.replace(**{f: keep(getattr(state, f), getattr(new, f)) for f in _DYNAMIC})

    def _advance(self, s: TabletopState, action: jax.Array) -> TabletopState:
        a, finite = _safe_action(action)
        move = a[:2] * (SPEED * s.gain)
        closed = jnp.where(finite[2], (a[2] > 0).astype(jnp.float32), s.grip_closed)
        key = s.key
        slip = jnp.bool_(False)
        if self.variant == "dynamics":
            key, k_move, k_slip = jax.random.split(key, 3)
            move = move + SLIP_STD * jax.random.normal(k_move, (2,))
            slip = jax.random.bernoulli(k_slip, SLIP_PROB)
        pos = _slide(s.grip_pos, move, s.wall, s.wall_active)
        obj_pos = s.obj_pos
        held = s.held
        if self.task == "push":
            # Lowered gripper: blocks inside the contact distance are shoved out along the
            # centre line.
            delta = obj_pos - pos
            d = jnp.sqrt(jnp.sum(delta * delta, -1, keepdims=True))
            pushed = pos + delta * (CONTACT / jnp.maximum(d, 1e-6))
            inside = (d < CONTACT) & (s.obj_active[:, None] > 0)
            obj_pos = jnp.clip(jnp.where(inside, pushed, obj_pos), BLOCK_HALF, 1.0 - BLOCK_HALF)
        else:
            delta = obj_pos - pos
            d2 = jnp.sum(delta * delta, -1)
            near = (d2 < PICK_RADIUS**2) & (s.obj_active > 0)
            dm = jnp.where(near, d2, jnp.inf)
            nearest = (near & (dm <= jnp.min(dm))).astype(jnp.float32)
            holding = jnp.sum(held) > 0
            held = jnp.where(holding, held, nearest) * closed
            if self.variant == "dynamics":
                held = jnp.where(slip, 0.0, held)
            obj_pos = jnp.where(held[:, None] > 0, pos, obj_pos)
        s = s.replace(
            grip_pos=pos,
            grip_closed=closed,
            held=held,
            obj_pos=obj_pos,
            key=key,
            t=s.t + 1,
            nonfinite_actions=s.nonfinite_actions + jnp.any(~finite).astype(jnp.int32),
        )
        success, progress = self._evaluate(s)
        return s.replace(success=success, progress=progress, done=success | (s.t >= self.max_steps))

    def _evaluate(self, s: TabletopState) -> tuple[jax.Array, jax.Array]:
        """-> (success bool[], progress f32[])."""
        return _evaluate(self.task, s)

    # ---------------------------------------------------------------- observation

    def observe(self, s: TabletopState) -> dict:
        obs = {
            "state": self.state_vector(s),
            "instruction": s.instruction,
            "task_id": jnp.int32(self.task_id),
            "time": s.t.astype(jnp.float32) / self.max_steps,
        }
        if self.image:
            obs["image"] = self.render(s)
        return obs

    def state_vector(self, s: TabletopState) -> jax.Array:
        """f32 [STATE_DIM]; inactive slots are zeros."""
        obj_rel = (s.obj_pos - s.grip_pos) * s.obj_active[:, None]
        zone_rel = (s.zone_pos - s.grip_pos) * s.zone_active[:, None]
        obj = jnp.concatenate(
            [s.obj_pos, obj_rel, s.obj_active[:, None], s.held[:, None], s.obj_colour], -1
        )  # [K, OBJECT_FEATURES]
        zone = jnp.concatenate(
            [s.zone_pos, zone_rel, s.zone_active[:, None], s.zone_colour], -1
        )  # [Z, ZONE_FEATURES]
        return jnp.concatenate(
            [
                s.grip_pos,
                s.grip_closed[None],
                jnp.sum(s.held, keepdims=True),
                obj.reshape(-1),
                zone.reshape(-1),
                s.wall,
                s.wall_active[None],
            ]
        )

    def render(self, s: TabletopState) -> jax.Array:
        """uint8 [64, 64, 3] top-down view."""
        return render_state(s, ZONE_RADIUS, BLOCK_HALF, GRIPPER_RADIUS)


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


@functools.cache
def make(
    task: str,
    variant: str = "nominal",
    image: bool = True,
    max_steps: int | None = None,
    reward: str = "sparse",
) -> TabletopEnv:
    """Build one environment of the suite; bad names raise ValueError listing allowed values."""
    _validate(task, variant, reward, max_steps)
    return TabletopEnv(
        task=task,
        variant=variant,
        image=bool(image),
        max_steps=max_steps or DEFAULT_MAX_STEPS[task],
        reward=reward,
    )


def batch_reset(env: TabletopEnv, keys: jax.Array):
    """keys [B, 2] -> (state [B], obs [B])."""
    return jax.vmap(env.reset)(keys)


def batch_step(env: TabletopEnv, state, action):
    """state [B], action [B, A] -> (state, obs, reward, done, info), all batched."""
    return jax.vmap(env.step)(state, action)

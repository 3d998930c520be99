"""Pure-JAX tabletop suite: a gripper over a unit-square table with blocks, zones and walls.

Tasks (``TASKS``):
    reach       move the gripper onto the named block (two blocks; a wall in half the layouts)
    push        push the block into the zone; the block cannot be grasped, the open gripper
                shoves it on contact
    pick_place  two blocks of different colours; carry the named one over the wall into the zone
    sort        two blocks, two zones of matching colours; each block to its zone (long horizon)

Variants (``VARIANTS``): ``nominal``; ``layout`` (objects, zones, walls and the start drawn
from shifted regions); ``distractors`` (two extra blocks of the unused colours); ``dynamics``
(per-episode action gain in [0.75, 1.25], Gaussian slip of the motion, and a small chance per
step that a carried block slips out); ``paraphrase`` (held-out instruction templates only).

Reward: ``reward="sparse"`` gives 1.0 on the step that reaches success, else 0;
``reward="progress"`` gives the *increment* of ``info["progress"]`` (p_t - p_{t-1}), so an
episode's return is its final progress minus its initial progress.

The mechanics, the state, the layouts and the success/progress rules live in
``envs.tabletop_world``; this module holds the names and time limits, ``make`` and the env
(reset, step, observe).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from envs.base import ACTION_DIM, EnvSpec
from envs.language import INSTRUCTION_LEN, VOCAB, instruction_table
from envs.render import render_state
from envs.tabletop_world import (
    _DYNAMIC,
    BLOCK_HALF,
    CONTACT,
    GRIPPER_RADIUS,
    NUM_COLOURS,
    NUM_OBJECTS,
    NUM_ZONES,
    PICK_RADIUS,
    SLIP_PROB,
    SLIP_STD,
    SPEED,
    STATE_DIM,
    STATE_GROUPS,
    WALL_HALF,
    ZONE_RADIUS,
    TabletopState,
    _evaluate,
    _Layout,
    _layout,
    _safe_action,
    _slide,
)

TASKS = ("reach", "push", "pick_place", "sort")
VARIANTS = ("nominal", "layout", "distractors", "dynamics", "paraphrase")
REWARDS = ("sparse", "progress")
# Time limits: pi* (every step its own) always finishes within them; the default per-step mixture
# of demonstrations (envs.mixture.MIXTURES["premise"]) finishes in about 60% of episodes, so the
# base policy has room to fail and a verifier room to help. Failure is mostly running out of
# time after slow chunks (hesitant, detour) or a sloppy release that must be redone.
DEFAULT_MAX_STEPS = {"reach": 26, "push": 42, "pick_place": 54, "sort": 80}


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

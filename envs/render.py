"""Top-down 64x64 RGB rendering of a tabletop state, computed in JAX.

Every primitive is separable or a sum of separable terms (squares: row mask AND column mask;
discs: row distance + column distance), so a primitive costs O(W + H) setup and one fused
elementwise pass over the pixel grid. Layers are painted back to front onto one int32 canvas of
packed RGB, so each layer is a single select per pixel, not three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from envs.base import IMAGE_SIZE

# Palette (uint8 RGB).
TABLE = (232, 222, 200)
WALL = (70, 70, 78)
ZONE_NEUTRAL = (180, 180, 180)
OBJECT_COLOURS = ((215, 45, 45), (45, 160, 65), (45, 85, 215), (225, 195, 35))
ZONE_COLOURS = ((240, 170, 170), (170, 225, 175), (170, 190, 245), (245, 230, 160))
GRIPPER_OPEN = (30, 30, 30)
GRIPPER_CLOSED = (250, 250, 250)

# Pixel centres in table coordinates; row 0 is the far edge (y = 1).
_COORD = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE
_XS = _COORD  # column -> x
_YS = 1.0 - _COORD  # row -> y


def _box(lo, hi):
    """Axis-aligned box mask bool [64, 64] from corners (x0, y0), (x1, y1)."""
    mx = (_XS >= lo[0]) & (_XS <= hi[0])
    my = (_YS >= lo[1]) & (_YS <= hi[1])
    return my[:, None] & mx[None, :]


def _disc(c, r):
    dx2 = (_XS - c[0]) ** 2
    dy2 = (_YS - c[1]) ** 2
    return (dy2[:, None] + dx2[None, :]) <= r * r


def _pack(rgb) -> np.ndarray:
    """uint8 RGB triples -> int32 0x00BBGGRR, so one int32 select paints all three channels."""
    rgb = np.asarray(rgb, np.int64).reshape(-1, 3)
    return (rgb[:, 0] | (rgb[:, 1] << 8) | (rgb[:, 2] << 16)).astype(np.int32)


_P_TABLE = int(_pack(TABLE)[0])
_P_WALL = int(_pack(WALL)[0])
_P_ZONE = np.concatenate([_pack(ZONE_NEUTRAL), _pack(ZONE_COLOURS)])  # [1 + C]
_P_OBJ = _pack(OBJECT_COLOURS)  # [C]
_P_GRIP_OPEN = int(_pack(GRIPPER_OPEN)[0])
_P_GRIP_CLOSED = int(_pack(GRIPPER_CLOSED)[0])
_LITTLE_ENDIAN = np.little_endian


def render_state(state, zone_radius: float, block_half: float, gripper_radius: float):
    """state (TabletopState, unbatched) -> uint8 [64, 64, 3].

    Painter's algorithm on a packed-RGB int32 canvas; per-primitive colours are scalars picked
    with a tiny dot product (no gathers), and the canvas is bitcast to bytes at the end.
    """
    canvas = jnp.full((IMAGE_SIZE, IMAGE_SIZE), _P_TABLE, jnp.int32)
    wall = state.wall
    canvas = jnp.where(_box(wall[:2], wall[2:]) & (state.wall_active > 0), _P_WALL, canvas)
    zone_onehot = jnp.concatenate(
        [1.0 - jnp.sum(state.zone_colour, -1, keepdims=True), state.zone_colour], -1
    )  # [Z, 1 + C]
    zone_rgb = _select_packed(zone_onehot, _P_ZONE)  # [Z]
    for z in range(state.zone_pos.shape[0]):
        m = _disc(state.zone_pos[z], zone_radius) & (state.zone_active[z] > 0)
        canvas = jnp.where(m, zone_rgb[z], canvas)
    obj_rgb = _select_packed(state.obj_colour, _P_OBJ)  # [K]
    for k in range(state.obj_pos.shape[0]):
        p = state.obj_pos[k]
        m = _box(p - block_half, p + block_half) & (state.obj_active[k] > 0)
        canvas = jnp.where(m, obj_rgb[k], canvas)
    # The carried block sits at the gripper: paint it again on top of any block it passes over.
    g = state.grip_pos
    holding = jnp.sum(state.held) > 0
    held_rgb = jnp.sum(jnp.where(state.held > 0, obj_rgb, 0))
    canvas = jnp.where(_box(g - block_half, g + block_half) & holding, held_rgb, canvas)
    r_out = 1.5 * gripper_radius  # drawn larger than the collision radius to stay visible
    r_in = 0.6 * r_out
    d2 = ((_YS - g[1]) ** 2)[:, None] + ((_XS - g[0]) ** 2)[None, :]
    closed = state.grip_closed > 0
    # Open: a dark ring; closed: a white ring around a dark centre, visible on any block colour.
    ring_rgb = jnp.where(closed, _P_GRIP_CLOSED, _P_GRIP_OPEN)
    canvas = jnp.where((d2 <= r_out * r_out) & (d2 > r_in * r_in), ring_rgb, canvas)
    canvas = jnp.where((d2 <= r_in * r_in) & closed, _P_GRIP_OPEN, canvas)
    return _unpack(canvas)


def _select_packed(onehot, packed):
    """one-hot f32 [..., P] x packed colours int32 [P] -> int32 [...] without a gather."""
    return jnp.sum(jnp.where(onehot > 0.5, jnp.asarray(packed), 0), -1).astype(jnp.int32)


def _unpack(canvas):
    rgba = jax.lax.bitcast_convert_type(canvas, jnp.uint8)  # [64, 64, 4], byte order = memory
    if not _LITTLE_ENDIAN:
        rgba = rgba[..., ::-1]
    return rgba[..., :3]


render_batch = jax.vmap(render_state, in_axes=(0, None, None, None))

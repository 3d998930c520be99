"""Building blocks shared by the base policies: the observation prefix encoder (the "VLM"),
multi-head attention against a cached prefix, and analytic FLOP counts.

Every module works on batched inputs (leading B). The prefix is a sequence of N tokens:
image patches (16 for a 64x64 render with 16x16 patches), instruction tokens (padding masked),
and one token per state entity (gripper, each object, each zone, the scene) or a single state
token, carrying the task embedding; state values optionally pass through Fourier features.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

NEG_INF = -1e9


def prefix_length(image: bool, image_size: int, patch_size: int, instruction_len: int,
                  state_groups: tuple = ()) -> int:
    """N, the number of prefix tokens."""
    patches = (image_size // patch_size) ** 2 if image else 0
    return patches + instruction_len + state_token_count(state_groups)


def state_token_count(state_groups: tuple) -> int:
    return sum(n for _, n, _ in state_groups) if state_groups else 1


def check_state_inputs(cfg, owner: str) -> None:
    """The state-embedding fields a policy config shares with PrefixEmbed."""
    if cfg.state_fourier < 0:
        raise ValueError(f"{owner}.state_fourier must be >= 0, got {cfg.state_fourier}")
    total = sum(n * d for _, n, d in cfg.state_groups)
    if cfg.state_groups and total != cfg.state_dim:
        raise ValueError(f"{owner}.state_groups cover {total} state entries, state_dim is "
                         f"{cfg.state_dim}")


def attention(
    q: jax.Array, keys: list[jax.Array], values: list[jax.Array], masks: list[jax.Array | None]
) -> jax.Array:
    """Softmax attention over several key/value blocks with one joint normalisation.

    q [B, Tq, h, d]; each key/value block is [B, Tk, h, d] or unbatched [Tk, h, d] (a prefix cache
    shared by all B queries: broadcast, never tiled); masks are bool [B, Tk] / [Tk] (True = attend)
    or [B, Tq, Tk] for causal blocks, or None. Returns [B, Tq, h, d].
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = []
    for k, mask in zip(keys, masks, strict=True):
        if k.ndim == 3:
            lg = jnp.einsum("bqhd,khd->bhqk", q, k)
        else:
            lg = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        lg = lg * scale
        if mask is not None:
            if mask.ndim == 1:
                m = mask[None, None, None, :]
            elif mask.ndim == 2:
                m = mask[:, None, None, :]
            else:
                m = mask[:, None, :, :]
            lg = jnp.where(m, lg, NEG_INF)
        logits.append(lg)
    sizes = [lg.shape[-1] for lg in logits]
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out = 0.0
    start = 0
    for v, size in zip(values, sizes, strict=True):
        p = probs[..., start : start + size]
        start += size
        if v.ndim == 3:
            out = out + jnp.einsum("bhqk,khd->bqhd", p, v)
        else:
            out = out + jnp.einsum("bhqk,bkhd->bqhd", p, v)
    return out


class Mlp(nn.Module):
    width: int
    ratio: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width * self.ratio)(x)
        return nn.Dense(self.width)(nn.gelu(x))


class Block(nn.Module):
    """Pre-LN transformer block; attends to its own tokens plus optional cached blocks."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, self_mask, extra_kv=(), extra_masks=()):
        # x [B, T, D]; returns (x, (k, v)) with k, v [B, T, h, d] for caching.
        b, t, _ = x.shape
        d = self.width // self.heads
        y = nn.LayerNorm()(x)
        qkv = nn.Dense(3 * self.width, name="qkv")(y).reshape(b, t, 3, self.heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        keys = [kv[0] for kv in extra_kv] + [k]
        values = [kv[1] for kv in extra_kv] + [v]
        masks = list(extra_masks) + [self_mask]
        att = attention(q, keys, values, masks).reshape(b, t, self.width)
        x = x + nn.Dense(self.width, name="out")(att)
        x = x + Mlp(self.width)(nn.LayerNorm()(x))
        return x, (k, v)


PREFIX_FIELDS = ("width", "vocab_size", "num_tasks", "instruction_len", "image", "image_size",
                 "patch_size", "state_groups", "state_fourier")


class PrefixEmbed(nn.Module):
    """Observation dict [B, ...] -> prefix tokens [B, N, D] and mask [B, N]."""

    width: int
    vocab_size: int
    num_tasks: int
    instruction_len: int
    image: bool
    image_size: int
    patch_size: int
    state_groups: tuple = ()
    state_fourier: int = 0

    @classmethod
    def from_config(cls, c) -> PrefixEmbed:
        """The prefix of a policy config (flow and AR configs both carry these fields)."""
        return cls(**{f: getattr(c, f) for f in PREFIX_FIELDS})

    @nn.compact
    def __call__(self, obs):
        tokens, masks = [], []
        state = obs["state"].astype(jnp.float32)
        b = state.shape[0]
        if self.state_fourier:
            # [x, sin(2^k pi x), cos(2^k pi x)] per entry: fine position differences become
            # easy to read out (a dot product of two such codes is a function of x - x').
            state = fourier_features(state, self.state_fourier)
        e = 1 + 2 * self.state_fourier  # values per state entry
        if self.image:
            img = obs["image"].astype(jnp.float32) / 255.0 - 0.5  # [B, 64, 64, 3]
            p, g = self.patch_size, self.image_size // self.patch_size
            patches = img.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
            patches = patches.reshape(b, g * g, p * p * 3)
            pos = self.param("image_pos", nn.initializers.normal(0.02), (g * g, self.width))
            tokens.append(nn.Dense(self.width, name="patch")(patches) + pos)
            masks.append(jnp.ones((b, g * g), bool))
        ids = obs["instruction"].astype(jnp.int32)  # [B, L], 0 = pad
        pos = self.param("instr_pos", nn.initializers.normal(0.02),
                         (self.instruction_len, self.width))
        tokens.append(nn.Embed(self.vocab_size, self.width, name="word")(ids) + pos)
        masks.append(ids != 0)
        task = nn.Embed(self.num_tasks, self.width, name="task")(obs["task_id"].astype(jnp.int32))
        if self.state_groups:
            # One token per entity (gripper, each object, each zone, ...), with a projection per
            # entity type and an embedding per slot: a colour word in the instruction can then
            # attend to the object token carrying that colour.
            start = 0
            for name, count, size in self.state_groups:
                part = state[:, start * e:(start + count * size) * e].reshape(b, count, -1)
                slot = self.param(f"{name}_slot", nn.initializers.normal(0.02),
                                  (count, self.width))
                tokens.append(nn.Dense(self.width, name=f"state_{name}")(part) + slot
                              + task[:, None])
                masks.append(jnp.ones((b, count), bool))
                start += count * size
        else:
            tokens.append((nn.Dense(self.width, name="state")(state) + task)[:, None])
            masks.append(jnp.ones((b, 1), bool))
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1)


def fourier_features(x: jax.Array, octaves: int) -> jax.Array:
    """x [B, S] -> [B, S * (1 + 2 * octaves)], entry-major so slicing by entries still works."""
    freqs = jnp.pi * 2.0 ** jnp.arange(octaves)
    ang = x[..., None] * freqs
    return jnp.concatenate([x[..., None], jnp.sin(ang), jnp.cos(ang)], -1).reshape(
        *x.shape[:-1], -1)


def sinusoidal(t: jax.Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0):
    """Sine-cosine embedding of the flow time t in [0, 1] (periods as in pi0). t [B] -> [B, dim]."""
    frac = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** frac
    x = t[:, None] * (2 * jnp.pi / period)[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def prefix_obs_fields(image: bool) -> tuple[str, ...]:
    """The observation fields the prefix reads."""
    return ("state", "instruction", "task_id") + (("image",) if image else ())


def check_obs(obs: dict, image: bool) -> None:
    """Clear errors for observation dicts that lack a required field."""
    need = list(prefix_obs_fields(image))
    for name in need:
        if name not in obs:
            raise ValueError(f"obs is missing field {name!r}; required fields: {need}")


def batch_obs(obs: dict, image: bool) -> dict:
    """One unbatched observation -> the batch-1 dict the modules take."""
    check_obs(obs, image)
    return {k: jnp.asarray(obs[k])[None] for k in prefix_obs_fields(image)}


# --- analytic matmul FLOPs (2 * m * n * k per product; norms, softmax, gelu not counted) ---


def block_flops(tokens: int, width: int, keys: int, mlp_ratio: int = 4) -> int:
    """One transformer block for ``tokens`` queries attending to ``keys`` keys."""
    qkv = 2 * tokens * width * 3 * width
    att = 2 * 2 * tokens * keys * width
    out = 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * mlp_ratio * width
    return qkv + att + out + mlp


def embed_flops(width, state_dim, image, image_size, patch_size) -> int:
    patches = (image_size // patch_size) ** 2 if image else 0
    return 2 * patches * patch_size * patch_size * 3 * width + 2 * state_dim * width


def fill_sizes(cfg, spec):
    """Size fields left at 0 take the env spec's value; the action dim is always the env's."""
    pairs = {"state_dim": spec.state_dim, "instruction_len": spec.instruction_len,
             "vocab_size": spec.vocab_size, "num_tasks": spec.num_tasks}
    upd = {k: v for k, v in pairs.items() if getattr(cfg, k) == 0}
    upd["action_dim"] = spec.action_dim
    if hasattr(spec, "image") and not spec.image:
        upd["image"] = False
    if not cfg.state_groups and getattr(spec, "state_groups", ()):
        upd["state_groups"] = tuple(tuple(g) for g in spec.state_groups)
    return dataclasses.replace(cfg, **upd)


@functools.lru_cache(maxsize=32)
def jit_init(net: nn.Module):
    """One compiled init per network config (modules are frozen, hashable dataclasses)."""
    return jax.jit(net.init)

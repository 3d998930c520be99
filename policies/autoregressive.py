"""An OpenVLA-style autoregressive token policy.

Each action dimension is discretised into ``bins`` (256) uniform bins over [-1, 1] and decoded
as a bin centre. One decoder-only transformer reads the prefix (image patches, instruction,
state token; same embedding as the flow policy) then the H*A action tokens, ordered step by step
(h0a0, h0a1, ..., h{H-1}a{A-1}). Attention is prefix-LM: prefix tokens attend to the whole
prefix (bidirectional, as PaliGemma), action tokens attend to the prefix and causally to earlier
action tokens. Because the prefix never attends to action tokens, its per-layer keys/values
are computed once per observation (``encode``) and broadcast to the M candidates; decoding is a
``lax.scan`` over the H*A tokens at batch M with an incremental key/value cache.

Features: the final hidden state of the last token, computed by one extra decoding step that
feeds the last sampled token, so the feature covers the whole chunk; f32 [M, width].
``log_prob`` [M] is the sum of the model's (temperature 1) token log-probs of the sampled tokens;
``extras["token_logits"]`` [M, H*A, bins] holds the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from policies import layers
from policies.base import Candidates, ConfiguredPolicy


def tokenize_actions(actions: jax.Array, bins: int = 256) -> jax.Array:
    """f32 [..., A] in [-1, 1] -> i32 bin ids [..., A] (values outside are clipped)."""
    idx = jnp.floor((jnp.clip(actions, -1.0, 1.0) + 1.0) * 0.5 * bins)
    return jnp.clip(idx, 0, bins - 1).astype(jnp.int32)


def low_rank_logits(delta: dict, hidden: jax.Array) -> jax.Array:
    """A low-rank update of the output head's logits: h down up, [..., D] -> [..., bins]."""
    return hidden @ delta["down"] @ delta["up"]


def detokenize_actions(tokens: jax.Array, bins: int = 256) -> jax.Array:
    """i32 bin ids -> bin centres in [-1, 1]."""
    return -1.0 + (tokens.astype(jnp.float32) + 0.5) * (2.0 / bins)


@dataclass(frozen=True)
class ARConfig:
    state_dim: int = 0
    """state vector size S (0 = take it from the env spec)"""
    instruction_len: int = 0
    vocab_size: int = 0
    num_tasks: int = 0
    state_groups: tuple[tuple[str, int, int], ...] = ()
    """entities of the state vector (name, count, size), one prefix token each; () = one state
    token (filled from the env spec)"""
    state_fourier: int = 6
    """octaves of sin/cos features per state entry in the prefix (0 = raw values)"""
    horizon: int = 8
    """H, actions per chunk"""
    action_dim: int = 3
    image: bool = False
    """use the 64x64 render as patch tokens (off by default, as for the flow policy: the
    tabletop state carries the scene)"""
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    bins: int = 256
    """uniform bins per action dimension over [-1, 1]"""
    temperature: float = 1.0
    """sampling temperature"""

    def with_spec(self, spec) -> ARConfig:
        return layers.fill_sizes(self, spec)

    def validate(self) -> None:
        for name in ("state_dim", "instruction_len", "vocab_size", "num_tasks", "horizon",
                     "action_dim", "width", "depth", "heads", "bins"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ARConfig.{name} must be > 0 (got {getattr(self, name)}); "
                                 "size fields left at 0 are filled by with_spec(env.spec)")
        if self.width % self.heads:
            raise ValueError("ARConfig: width must divide by heads")
        if self.temperature <= 0:
            raise ValueError(f"ARConfig.temperature must be > 0, got {self.temperature}")
        layers.check_state_inputs(self, "ARConfig")

    @property
    def num_tokens(self) -> int:
        return self.horizon * self.action_dim


@struct.dataclass
class ARContext:
    k: jax.Array  # [depth, N, h, d]
    v: jax.Array
    mask: jax.Array  # bool [N]


class ARNet(nn.Module):
    cfg: ARConfig

    def setup(self):
        c = self.cfg
        self.embed = layers.PrefixEmbed.from_config(c)
        self.blocks = [layers.Block(c.width, c.heads) for _ in range(c.depth)]
        self.tok_embed = nn.Embed(c.bins + 1, c.width)  # id ``bins`` = begin-of-action
        # positions 0..T: T inputs (BOS + T-1 tokens) plus the extra feature step
        self.tok_pos = self.param("tok_pos", nn.initializers.normal(0.02),
                                  (c.num_tokens + 1, c.width))
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(c.bins)

    def encode(self, obs):
        # obs [B, ...] -> per-layer prefix k, v [depth, B, N, h, d], mask [B, N]
        x, mask = self.embed(obs)
        ks, vs = [], []
        for blk in self.blocks:
            x, (k, v) = blk(x, mask)
            ks.append(k)
            vs.append(v)
        return jnp.stack(ks), jnp.stack(vs), mask

    def decode_full(self, tokens_in, k, v, mask):
        # tokens_in [B, T'] (first = BOS); teacher-forced -> logits [B, T', bins], hidden [B, T', D]
        t = tokens_in.shape[1]
        x = self.tok_embed(tokens_in) + self.tok_pos[:t]
        causal = jnp.tril(jnp.ones((t, t), bool))[None].repeat(x.shape[0], 0)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, causal, extra_kv=[(k[i], v[i])], extra_masks=[mask])
        h = self.norm(x)
        return self.head(h), h

    def decode_step(self, tok, pos, cache_k, cache_v, k, v, mask):
        # tok [M], pos scalar; cache [depth, M, T+1, h, d] -> logits [M, bins], hidden [M, D]
        x = (self.tok_embed(tok) + self.tok_pos[pos])[:, None]
        seen = jnp.arange(cache_k.shape[2]) < pos
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            x, (kn, vn) = blk(x, None, extra_kv=[(k[i], v[i]), (cache_k[i], cache_v[i])],
                              extra_masks=[mask, seen])
            new_k.append(kn)
            new_v.append(vn)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, jnp.stack(new_k), pos, axis=2)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, jnp.stack(new_v), pos, axis=2)
        h = self.norm(x[:, 0])
        return self.head(h), h, cache_k, cache_v

    def __call__(self, obs, tokens_in):
        k, v, mask = self.encode(obs)
        return self.decode_full(tokens_in, k, v, mask)


@dataclass(frozen=True)
class ARPolicy(ConfiguredPolicy):
    cfg: ARConfig
    name: str = "autoregressive"
    has_log_prob: bool = True

    @cached_property
    def net(self) -> ARNet:
        return ARNet(self.cfg)

    @property
    def feature_dim(self) -> int:
        return self.cfg.width

    def init(self, key: jax.Array, obs: dict):
        ob = layers.batch_obs(obs, self.cfg.image)
        tokens = jnp.zeros((1, self.cfg.num_tokens + 1), jnp.int32)
        return layers.jit_init(self.net)(key, ob, tokens)

    def encode(self, params, obs: dict) -> ARContext:
        k, v, mask = self.net.apply(params, layers.batch_obs(obs, self.cfg.image),
                                    method=ARNet.encode)
        return ARContext(k[:, 0], v[:, 0], mask[0])

    def sample(self, params, context: ARContext, key: jax.Array, M: int,
               temperature: float | None = None, head_delta: dict | None = None) -> Candidates:
        """M chunks decoded token by token. ``head_delta`` {"down" [D, r], "up" [r, bins]} adds
        a low-rank update to the output head (logits + h down up: a test-time learner's adapter);
        then ``extras["token_hidden"]`` [M, T, D] holds the hidden state behind each token's
        logits, which the adapter's log-probabilities are recomputed from."""
        c = self.cfg
        temp = c.temperature if temperature is None else temperature
        t = c.num_tokens
        hd = c.width // c.heads
        cache = jnp.zeros((c.depth, M, t + 1, c.heads, hd), context.k.dtype)

        def step(carry, xs):
            cache_k, cache_v, tok = carry
            pos, k_step = xs
            logits, h, cache_k, cache_v = self.net.apply(
                params, tok, pos, cache_k, cache_v, context.k, context.v, context.mask,
                method=ARNet.decode_step)
            if head_delta is not None:
                logits = logits + low_rank_logits(head_delta, h)
            new = jax.random.categorical(k_step, logits / temp, axis=-1).astype(jnp.int32)
            return (cache_k, cache_v, new), (new, logits, h)

        keys = jax.random.split(key, t)
        bos = jnp.full((M,), c.bins, jnp.int32)
        (ck, cv, last), (toks, logits, hidden) = jax.lax.scan(step, (cache, cache, bos),
                                                              (jnp.arange(t), keys))
        _, feat, _, _ = self.net.apply(params, last, t, ck, cv, context.k, context.v,
                                       context.mask, method=ARNet.decode_step)
        toks = toks.T  # [M, T]
        logits = jnp.swapaxes(logits, 0, 1)  # [M, T, bins]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), toks[..., None], -1)[..., 0]
        actions = detokenize_actions(toks, c.bins).reshape(M, c.horizon, c.action_dim)
        extras = {"tokens": toks, "token_logits": logits}
        if head_delta is not None:
            extras["token_hidden"] = jnp.swapaxes(hidden, 0, 1)
        return Candidates(actions, feat, logp.sum(-1), extras)

    def sample_steered(self, params, context: ARContext, key: jax.Array, M: int,
                       steer: dict) -> Candidates:
        """A test-time learner's steering (``algos.base``): a low-rank output-head update."""
        return self.sample(params, context, key, M, head_delta=steer)

    def state_features(self, context: ARContext) -> jax.Array:
        """A feature of the observation alone [D]: the last layer's prefix keys, averaged over
        the valid prefix tokens (heads concatenated)."""
        k = context.k[-1].reshape(context.k.shape[1], -1)  # [N, D]
        w = context.mask.astype(k.dtype)[:, None]
        return jnp.sum(w * k, 0) / jnp.maximum(w.sum(), 1.0)

    def full_logits(self, params, obs: dict, tokens: jax.Array):
        """Recompute without caches: tokens [M, T] -> (logits [M, T, bins], feature [M, D])."""
        c = self.cfg
        ob = layers.batch_obs(obs, c.image)
        k, v, mask = self.net.apply(params, ob, method=ARNet.encode)
        m = tokens.shape[0]
        inp = jnp.concatenate([jnp.full((m, 1), c.bins, jnp.int32), tokens], axis=1)
        logits, h = self.net.apply(params, inp, k[:, 0], v[:, 0], mask[0],
                                   method=ARNet.decode_full)
        return logits[:, :-1], h[:, -1]

    def loss(self, params, batch: dict, key: jax.Array):
        """Token cross-entropy over valid chunk steps -> (loss, info)."""
        del key
        c = self.cfg
        b = batch["actions"].shape[0]
        toks = tokenize_actions(batch["actions"], c.bins).reshape(b, -1)  # [B, T]
        inp = jnp.concatenate([jnp.full((b, 1), c.bins, jnp.int32), toks[:, :-1]], axis=1)
        logits, _ = self.net.apply(params, batch["obs"], inp)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[..., None], -1)[..., 0]
        w = jnp.repeat(batch["valid"].astype(jnp.float32), c.action_dim, axis=1)
        loss = jnp.sum(w * nll) / jnp.maximum(w.sum(), 1.0)
        acc = jnp.sum(w * (jnp.argmax(logits, -1) == toks)) / jnp.maximum(w.sum(), 1.0)
        return loss, {"loss": loss, "token_acc": acc}


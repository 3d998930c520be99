"""A pi0-style flow-matching action-chunk policy with a shared-context KV cache.

Prefix ("VLM"): image patches, instruction tokens and state-entity tokens through a bidirectional
transformer. Action expert: H action tokens (noisy chunk + flow-time embedding) that attend,
bidirectionally, to each other and to per-expert-layer keys/values projected from the final
prefix hidden states (pi0 takes them from the matching VLM layer; with fewer expert layers
than prefix layers we project the final prefix state once per expert layer).

Flow convention (as pi0 / openpi): t = 1 is noise, t = 0 is data,
    x_t = t * noise + (1 - t) * a,     target velocity u = noise - a,
t ~ 0.999 * Beta(1.5, 1) + 0.001 (more weight on noisy times) or Uniform(0, 1).
Sampling: K Euler steps from t = 1 to t = 0 with dt = -1/K.

The prefix is computed once per observation (``encode``, batch 1) and broadcast to the M
chains in ``sample``; ``sample_naive`` is the tiled baseline (prefix at batch M).
Features: the final-layer hidden state (after the final norm) of the first action token at
the last integration step, f32 [M, expert_width].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from policies import layers
from policies.base import Candidates, ConfiguredPolicy


@dataclass(frozen=True)
class FlowConfig:
    state_dim: int = 0
    """state vector size S (0 = take it from the env spec)"""
    instruction_len: int = 0
    """instruction length L (0 = from the env spec)"""
    vocab_size: int = 0
    """instruction vocabulary size (0 = from the env spec)"""
    num_tasks: int = 0
    """number of task ids (0 = from the env spec)"""
    state_groups: tuple[tuple[str, int, int], ...] = ()
    """entities of the state vector (name, count, size), one prefix token each; () = one state
    token (filled from the env spec)"""
    state_fourier: int = 6
    """octaves of sin/cos features per state entry in the prefix (0 = raw values)"""
    horizon: int = 8
    """H, actions per chunk"""
    action_dim: int = 3
    """A"""
    image: bool = False
    """use the 64x64 render as patch tokens (off by default: the tabletop state carries every
    object, zone and wall, and images double the cost of training on a CPU)"""
    image_size: int = 64
    patch_size: int = 16
    """16 x 16 patches: 16 image tokens (see PI0_PROPORTIONS)"""
    width: int = 128
    """prefix transformer width (the defaults train to their plateau within 10 minutes on 2
    CPU cores)"""
    depth: int = 3
    """prefix transformer layers"""
    heads: int = 4
    expert_width: int = 64
    """action-expert width (= feature dim F)"""
    expert_depth: int = 1
    expert_heads: int = 2
    num_steps: int = 10
    """K Euler integration steps"""
    time_dist: Literal["beta", "uniform"] = "beta"
    """training distribution of the flow time t"""
    noise: Literal["fresh", "bank"] = "fresh"
    """fresh noise per call, or a fixed bank (seed noise_seed) reused at every decision (TACO)"""
    noise_seed: int = 42
    loss_samples: int = 4
    """(t, noise) draws per observation in the training loss; they share one prefix pass"""
    state_mean: tuple[float, ...] = ()
    """per-entry state shift: the network reads (state - state_mean) / state_std; () = raw
    states. SFT fills the four statistics from its training chunks (``TrainConfig.normalize``)"""
    state_std: tuple[float, ...] = ()
    action_mean: tuple[float, ...] = ()
    """per-dimension action shift: the flow runs on (a - action_mean) / action_std, so that the
    unit noise has every dimension's spread; () = raw actions"""
    action_std: tuple[float, ...] = ()

    def with_spec(self, spec) -> FlowConfig:
        """Fills the size fields left at 0 from an ``envs.base.EnvSpec``."""
        return layers.fill_sizes(self, spec)

    def validate(self) -> None:
        for name in ("state_dim", "instruction_len", "vocab_size", "num_tasks", "horizon",
                     "action_dim", "width", "depth", "heads", "expert_width", "expert_depth",
                     "expert_heads", "num_steps", "loss_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FlowConfig.{name} must be > 0 (got {getattr(self, name)}); "
                                 "size fields left at 0 are filled by with_spec(env.spec)")
        if self.width % self.heads or self.expert_width % self.expert_heads:
            raise ValueError("FlowConfig: width must divide by heads, expert_width by expert_heads")
        if self.image_size % self.patch_size:
            raise ValueError("FlowConfig.patch_size must divide image_size")
        if self.time_dist not in ("beta", "uniform"):
            raise ValueError("FlowConfig.time_dist must be 'beta' or 'uniform', "
                             f"got {self.time_dist!r}")
        if self.noise not in ("fresh", "bank"):
            raise ValueError(f"FlowConfig.noise must be 'fresh' or 'bank', got {self.noise!r}")
        layers.check_state_inputs(self, "FlowConfig")
        for name, size in (("state", self.state_dim), ("action", self.action_dim)):
            mean, std = getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")
            if len(mean) != len(std) or len(mean) not in (0, size):
                raise ValueError(f"FlowConfig.{name}_mean and {name}_std must both be empty or "
                                 f"both have {name}_dim = {size} entries, got {len(mean)} and "
                                 f"{len(std)}")
            if not all(v > 0 for v in std):
                raise ValueError(f"FlowConfig.{name}_std entries must be > 0")

    def with_statistics(self, states: np.ndarray, actions: np.ndarray) -> FlowConfig:
        """The config with the mean and std of training states [N, S] and actions [N, A]
        (a std below ``MIN_STD`` is raised to it: a nearly constant entry is not amplified)."""
        def stats(x):
            x = np.asarray(x, np.float64)
            return (tuple(float(v) for v in x.mean(0)),
                    tuple(float(v) for v in np.maximum(x.std(0), MIN_STD)))

        (sm, ss), (am, as_) = stats(states), stats(actions)
        return dataclasses.replace(self, state_mean=sm, state_std=ss, action_mean=am,
                                   action_std=as_)


MIN_STD = 1e-2


# Sizes with pi0's cost proportions: with the image prefix the prefix costs about ten times the
# K expert passes of one candidate, so the shared-prefix cache matters as much as in pi0. The
# sampling benchmark uses them when no trained policy is given.
PI0_PROPORTIONS = {"image": True, "width": 160, "depth": 4, "heads": 5}


@struct.dataclass
class FlowContext:
    k: jax.Array  # [Le, N, h, d], or [Le, M, N, h, d] for the tiled baseline
    v: jax.Array
    mask: jax.Array  # bool [N] or [M, N]
    state: jax.Array  # [De] or [M, De], the state embedding fed to the action expert


class FlowNet(nn.Module):
    cfg: FlowConfig

    def setup(self):
        c = self.cfg
        self.embed = layers.PrefixEmbed.from_config(c)
        self.blocks = [layers.Block(c.width, c.heads) for _ in range(c.depth)]
        self.prefix_norm = nn.LayerNorm()
        self.kv_proj = [nn.Dense(2 * c.expert_width) for _ in range(c.expert_depth)]
        self.action_in = nn.Dense(c.expert_width)
        self.state_in = nn.Dense(c.expert_width)
        self.time_in = nn.Dense(c.expert_width)
        self.time_out = nn.Dense(c.expert_width)
        self.action_pos = self.param("action_pos", nn.initializers.normal(0.02),
                                     (c.horizon, c.expert_width))
        self.expert = [layers.Block(c.expert_width, c.expert_heads) for _ in range(c.expert_depth)]
        self.expert_norm = nn.LayerNorm()
        self.action_out = nn.Dense(c.action_dim)

    def encode(self, obs):
        # obs [B, ...] -> k, v [Le, B, N, h, d], mask [B, N], state embedding [B, De]
        c = self.cfg
        if c.state_mean:
            state = (obs["state"].astype(jnp.float32) - jnp.asarray(c.state_mean)) \
                / jnp.asarray(c.state_std)
            obs = {**obs, "state": state}
        x, mask = self.embed(obs)
        for blk in self.blocks:
            x, _ = blk(x, mask)
        x = self.prefix_norm(x)
        b, n, _ = x.shape
        d = c.expert_width // c.expert_heads
        kv = jnp.stack([p(x) for p in self.kv_proj]).reshape(
            c.expert_depth, b, n, 2, c.expert_heads, d)
        state = self.state_in(obs["state"].astype(jnp.float32))
        return kv[:, :, :, 0], kv[:, :, :, 1], mask, state

    def velocity(self, x_t, t, k, v, mask, state):
        # x_t [M, H, A], t [M]; k, v [Le, (M,) N, h, d]; state [(M,) De]
        # -> velocity [M, H, A], feature [M, De]
        c = self.cfg
        # pi0 feeds the proprioceptive state to the action expert as well (direct access for
        # precise control); the prefix keeps its own state token
        h = self.action_in(x_t) + (state[:, None] if state.ndim == 2 else state)
        te = jnp.broadcast_to(layers.sinusoidal(t, c.expert_width)[:, None], h.shape)
        h = self.time_out(nn.swish(self.time_in(jnp.concatenate([h, te], axis=-1))))
        h = h + self.action_pos
        for i, blk in enumerate(self.expert):
            h, _ = blk(h, None, extra_kv=[(k[i], v[i])], extra_masks=[mask])
        h = self.expert_norm(h)
        return self.action_out(h), h[:, 0]

    def __call__(self, obs, x_t, t):
        # obs [B, ...]; x_t [B * n, H, A], t [B * n]: n draws per observation share its prefix
        k, v, mask, state = self.encode(obs)
        n = x_t.shape[0] // mask.shape[0]
        k, v, mask = jnp.repeat(k, n, 1), jnp.repeat(v, n, 1), jnp.repeat(mask, n, 0)
        return self.velocity(x_t, t, k, v, mask, jnp.repeat(state, n, 0))


def flow_path(actions: jax.Array, noise: jax.Array, t: jax.Array):
    """x_t = t * noise + (1 - t) * a and the target velocity noise - a.
    actions/noise [B, H, A], t [B]."""
    tt = t[:, None, None]
    return tt * noise + (1.0 - tt) * actions, noise - actions


def flow_matching_loss(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared velocity error over valid chunk steps. pred/target [B, H, A], valid [B, H]."""
    w = valid.astype(jnp.float32)[..., None]
    denom = jnp.maximum(w.sum() * pred.shape[-1], 1.0)
    return jnp.sum(w * (pred - target) ** 2) / denom


@dataclass(frozen=True)
class FlowPolicy(ConfiguredPolicy):
    cfg: FlowConfig
    name: str = "flow"
    has_log_prob: bool = False

    @cached_property
    def net(self) -> FlowNet:
        return FlowNet(self.cfg)

    @property
    def feature_dim(self) -> int:
        return self.cfg.expert_width

    def init(self, key: jax.Array, obs: dict):
        """obs: one unbatched observation."""
        c = self.cfg
        ob = layers.batch_obs(obs, c.image)
        x = jnp.zeros((1, c.horizon, c.action_dim))
        return layers.jit_init(self.net)(key, ob, x, jnp.ones((1,)))

    def to_flow(self, actions: jax.Array) -> jax.Array:
        """Env actions [..., A] -> the flow's (normalised) space."""
        c = self.cfg
        if not c.action_mean:
            return actions
        return (actions - jnp.asarray(c.action_mean)) / jnp.asarray(c.action_std)

    def to_actions(self, x: jax.Array) -> jax.Array:
        """Integrated chunks in the flow's space -> env actions, clipped to [-1, 1]."""
        c = self.cfg
        if c.action_mean:
            x = x * jnp.asarray(c.action_std) + jnp.asarray(c.action_mean)
        return jnp.clip(x, -1.0, 1.0)

    def encode(self, params, obs: dict) -> FlowContext:
        """The prefix keys/values for one observation (batch 1, stored unbatched)."""
        k, v, mask, state = self.net.apply(params, layers.batch_obs(obs, self.cfg.image),
                                           method=FlowNet.encode)
        return FlowContext(k[:, 0], v[:, 0], mask[0], state[0])

    def make_noise(self, key: jax.Array, M: int) -> jax.Array:
        """Initial noise [M, H, A]; candidate m's noise depends only on (key, m), so the first M
        candidates are shared across M. The bank mode ignores ``key``."""
        c = self.cfg
        if c.noise == "bank":
            key = jax.random.PRNGKey(c.noise_seed)
        return jax.vmap(lambda m: jax.random.normal(jax.random.fold_in(key, m),
                                                    (c.horizon, c.action_dim)))(jnp.arange(M))

    def _integrate(self, params, ctx: FlowContext, noise: jax.Array):
        c = self.cfg
        m = noise.shape[0]
        dt = -1.0 / c.num_steps

        def step(carry, i):
            x, _ = carry
            t = jnp.full((m,), 1.0 - i / c.num_steps)
            vel, feat = self.net.apply(params, x, t, ctx.k, ctx.v, ctx.mask, ctx.state,
                                       method=FlowNet.velocity)
            return (x + dt * vel, feat), None

        init = (noise, jnp.zeros((m, c.expert_width), noise.dtype))
        (x, feat), _ = jax.lax.scan(step, init, jnp.arange(c.num_steps))
        return x, feat

    def sample(self, params, context: FlowContext, key: jax.Array, M: int,
               noise: jax.Array | None = None) -> Candidates:
        """M chains in one batch against the shared prefix cache. noise: optional [M, H, A]."""
        if noise is None:
            noise = self.make_noise(key, M)
        x, feat = self._integrate(params, context, noise)
        return Candidates(self.to_actions(x), feat, None, {"noise": noise})

    def sample_steered(self, params, context: FlowContext, key: jax.Array, M: int,
                       steer: jax.Array) -> Candidates:
        """A test-time learner's steering (``algos.base``): the same initial noise, shifted by
        the mean ``steer`` [H, A]."""
        return self.sample(params, context, key, M, noise=self.make_noise(key, M) + steer)

    def state_features(self, context: FlowContext) -> jax.Array:
        """A feature of the observation alone [F]: the state embedding for the action expert."""
        return context.state

    def sample_naive(self, params, obs: dict, key: jax.Array, M: int,
                     noise: jax.Array | None = None) -> Candidates:
        """Baseline as released TACO/pi0.5 code: tile obs M times, prefix at batch M."""
        ob = layers.batch_obs(obs, self.cfg.image)
        ob = jax.tree.map(lambda x: jnp.repeat(x, M, axis=0), ob)
        k, v, mask, state = self.net.apply(params, ob, method=FlowNet.encode)
        if noise is None:
            noise = self.make_noise(key, M)
        x, feat = self._integrate(params, FlowContext(k, v, mask, state), noise)
        return Candidates(self.to_actions(x), feat, None, {"noise": noise})

    def one_step_features(self, params, context: FlowContext, clean_chunks: jax.Array,
                          key: jax.Array) -> jax.Array:
        """Noise clean chunks [M, H, A] to the last-step level (t = 1/K) and run one denoising
        step; returns the features [M, F] (TACO's add_and_denoise1step_get_feature)."""
        k_ = self.cfg.num_steps
        noise = jax.random.normal(key, clean_chunks.shape)
        x = noise / k_ + self.to_flow(clean_chunks) * (k_ - 1) / k_
        t = jnp.full((clean_chunks.shape[0],), 1.0 / k_)
        _, feat = self.net.apply(params, x, t, context.k, context.v, context.mask,
                                 context.state, method=FlowNet.velocity)
        return feat

    def sample_time(self, key: jax.Array, shape) -> jax.Array:
        if self.cfg.time_dist == "beta":
            return jax.random.beta(key, 1.5, 1.0, shape) * 0.999 + 0.001
        return jax.random.uniform(key, shape)

    def loss(self, params, batch: dict, key: jax.Array):
        """batch: obs [B, ...], actions [B, H, A], valid bool [B, H] -> (loss, info).
        Each observation gets ``loss_samples`` (t, noise) draws against one prefix pass."""
        n = self.cfg.loss_samples
        actions = jnp.repeat(self.to_flow(batch["actions"]), n, 0)  # [B * n, H, A]
        k_t, k_n = jax.random.split(key)
        t = self.sample_time(k_t, actions.shape[:1])
        noise = jax.random.normal(k_n, actions.shape)
        x_t, target = flow_path(actions, noise, t)
        pred, _ = self.net.apply(params, batch["obs"], x_t, t)
        loss = flow_matching_loss(pred, target, jnp.repeat(batch["valid"], n, 0))
        return loss, {"loss": loss}

    def flop_counts(self) -> dict[str, int]:
        """Analytic matmul FLOPs: ``prefix`` P (one observation, incl. the expert K/V
        projections) and ``expert_per_candidate`` S (K expert passes for one candidate)."""
        c = self.cfg
        n = layers.prefix_length(c.image, c.image_size, c.patch_size, c.instruction_len,
                                 c.state_groups)
        de, h = c.expert_width, c.horizon
        state_inputs = c.state_dim * (1 + 2 * c.state_fourier)
        p = layers.embed_flops(c.width, state_inputs, c.image, c.image_size, c.patch_size)
        p += c.depth * layers.block_flops(n, c.width, n)
        p += c.expert_depth * 2 * n * c.width * 2 * de + 2 * c.state_dim * de
        per_pass = 2 * h * c.action_dim * de + 2 * h * 2 * de * de + 2 * h * de * de
        per_pass += c.expert_depth * layers.block_flops(h, de, n + h)
        per_pass += 2 * h * de * c.action_dim
        return {"prefix": p, "expert_per_candidate": c.num_steps * per_pass}

    def flops_per_decision(self, M: int, cached: bool = True) -> int:
        f = self.flop_counts()
        if cached:
            return f["prefix"] + M * f["expert_per_candidate"]
        return M * (f["prefix"] + f["expert_per_candidate"])

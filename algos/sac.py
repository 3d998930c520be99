"""SAC with the RLPD ingredients (Ball, Smith, Kostrikov, Levine, ICML 2023), for an agent that
acts on top of a base action, as PLD's residual specialist does (METHODS.md 5).

The agent reads an observation dict and a base action b (flat, [D]) and outputs a residual
a_delta in (-1, 1)^D (a tanh-Gaussian); what is executed is

    a = clip(b + xi a_delta, -1, 1)                                  (``compose``)

Plain SAC is the case b = 0, xi = 1. The critics read the *executed* action, Q(s, a): a
transition of the base alone (a_delta = 0) then trains the same critic as one of the agent,
Cal-QL can pre-train it on the base's own rollouts, and changing xi on a schedule does not
change what a stored transition means.

Per update (RLPD's ``update`` with ``utd_ratio``): a batch of ``batch_size x utd`` transitions,
``offline_ratio`` of it from the offline buffer and the rest from the online one (symmetric
sampling), is split into ``utd`` minibatches; the critics take one step on each

    a'   = compose(b', xi a_delta'),  a_delta' ~ pi(s', b')
    y    = r + gamma_d (1 - done) (min_{i in I} Qtarget_i(s', a') - [backup_entropy] T log pi)
           with I a random subset of ``num_min_critics`` of the ``num_critics`` target critics
    loss = mean_i mean_batch (Q_i(s, a) - y)^2  [+ cql_alpha x conservative term]

with Polyak averaging after each; then the actor (maximising mean_i Q_i(s, compose(b, xi
a_delta)) - T log pi) and the temperature T (towards ``target_entropy``) take one step on the
last minibatch. ``cql_alpha > 0`` adds Cal-QL's conservative term (``algos.calql``): uniform
actions and the agent's actions at s and s', evaluated at s, floored at the Monte-Carlo return
``mc`` when ``calibrated``, without importance weights (the composed action's density is not the
residual's once clipped), pushing Q down there and up at the data.

The buffers are fixed-size device arrays (``Buffer``): ``buffer_add`` writes a batch of
transitions with a validity mask inside jit, ``buffer_sample`` draws uniformly from the filled
part. ``train_steps`` runs ``num_updates`` updates as one ``lax.scan`` in one compiled call.
Defaults follow the released RLPD configs (METHODS.md 5.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from algos.calql import LOG_STD_RANGE, ObsEncoder, mlp, tanh_gaussian


@dataclass(frozen=True)
class SACConfig:
    hidden: tuple[int, ...] = (256, 256)
    """critic MLP widths (RLPD: 256-256)"""
    actor_hidden: tuple[int, ...] = (256, 256)
    num_critics: int = 10
    """ensemble size (RLPD num_qs)"""
    num_min_critics: int = 2
    """the target is the minimum over a random subset of this many target critics (num_min_qs)"""
    layer_norm: bool = True
    """LayerNorm after each hidden layer of the critics (RLPD critic_layer_norm)"""
    embed_dim: int = 16
    """instruction-token embedding width (``algos.calql.ObsEncoder``)"""
    vocab_size: int = 0
    """instruction vocabulary (0: no instruction input)"""
    use_time: bool = True
    """read obs["time"] when present (a finite-horizon value depends on the clock)"""
    gamma: float = 0.99
    """per env step; each transition carries its own discount (gamma ** steps executed)"""
    tau: float = 0.005
    critic_lr: float = 3e-4
    actor_lr: float = 3e-4
    temperature_lr: float = 3e-4
    init_temperature: float = 1.0
    init_log_std: float = 0.0
    """the residual's log std before training (its head starts constant; its mean starts at 0)"""
    target_entropy: float | None = None
    """None: -D / 2, RLPD's default (D the residual's dimension)"""
    backup_entropy: bool = True
    """subtract T log pi(a'|s') in the target (RLPD default; off in its AntMaze/Adroit configs)"""
    grad_clip: float = 0.0
    """global-norm gradient clipping of every optimiser (0: none; PLD's Table 5: 1.0)"""
    batch_size: int = 256
    utd: int = 20
    """critic updates per actor update, one minibatch each (RLPD utd_ratio)"""
    offline_ratio: float = 0.5
    """share of each batch drawn from the offline buffer (RLPD 0.5; 0 = online only)"""
    cql_alpha: float = 0.0
    """weight of Cal-QL's conservative term (0: none; PLD pre-trains the critic with it)"""
    cql_actions: int = 4
    """samples of each kind (uniform, pi(s), pi(s')) in the conservative term"""
    calibrated: bool = True
    """floor the conservative term's policy samples at the Monte-Carlo return (Cal-QL)"""

    def validate(self, where: str = "sac") -> None:
        for f in ("num_critics", "num_min_critics", "embed_dim", "batch_size", "utd",
                  "cql_actions"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}.{f} must be a positive int, got {v!r}")
        if self.num_min_critics > self.num_critics:
            raise ValueError(f"{where}.num_min_critics must be <= num_critics "
                             f"({self.num_critics}), got {self.num_min_critics}")
        for f in ("hidden", "actor_hidden"):
            v = getattr(self, f)
            if not v or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in v):
                raise ValueError(f"{where}.{f} must be a non-empty list of positive ints, "
                                 f"got {v!r}")
        for f in ("critic_lr", "actor_lr", "temperature_lr", "init_temperature"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{where}.{f} must be > 0, got {getattr(self, f)}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"{where}.gamma must be in [0, 1), got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"{where}.tau must be in (0, 1], got {self.tau}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ValueError(f"{where}.offline_ratio must be in [0, 1], got "
                             f"{self.offline_ratio}")
        for f in ("cql_alpha", "grad_clip"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"{where}.{f} must be >= 0, got {getattr(self, f)}")
        if self.vocab_size < 0:
            raise ValueError(f"{where}.vocab_size must be >= 0, got {self.vocab_size}")


# ---------------------------------------------------------------------------------------------
# replay buffers: fixed-size device arrays


@struct.dataclass
class Buffer:
    data: dict  # every leaf [capacity, ...]
    size: jax.Array  # i32 (): filled rows
    insert_at: jax.Array  # i32 (): the next row written (wraps around)


def buffer_init(example: dict, capacity: int) -> Buffer:
    """An empty buffer whose rows have the shapes and dtypes of ``example``'s leaves (one
    transition, no batch axis)."""
    if capacity < 1:
        raise ValueError(f"buffer capacity must be a positive int, got {capacity}")
    data = jax.tree.map(lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype),
                        example)
    return Buffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_capacity(buf: Buffer) -> int:
    return jax.tree.leaves(buf.data)[0].shape[0]


def buffer_add(buf: Buffer, batch: dict, valid: jax.Array) -> Buffer:
    """Writes the rows of ``batch`` (leaves [N, ...]) where ``valid`` [N] is true, in order, at
    the insertion point; the oldest rows are overwritten once the buffer is full. Jittable."""
    cap = buffer_capacity(buf)
    valid = valid.astype(bool)
    rank = jnp.cumsum(valid) - 1
    rows = jnp.where(valid, (buf.insert_at + rank) % cap, cap)  # cap: out of range, dropped
    data = jax.tree.map(lambda d, x: d.at[rows].set(x.astype(d.dtype), mode="drop"),
                        buf.data, batch)
    n = jnp.sum(valid).astype(jnp.int32)
    return Buffer(data, jnp.minimum(buf.size + n, cap), (buf.insert_at + n) % cap)


def buffer_sample(buf: Buffer, key: jax.Array, n: int) -> dict:
    """n rows drawn uniformly (with replacement) from the filled part."""
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(buf.size, 1))
    return jax.tree.map(lambda d: d[idx], buf.data)


def offline_count(n: int, offline_ratio: float) -> int:
    """Rows of an n-row batch that come from the offline buffer."""
    return int(round(n * offline_ratio))


def symmetric_batch(offline: Buffer | None, online: Buffer | None, key: jax.Array, n: int,
                    offline_ratio: float) -> dict:
    """RLPD's symmetric sampling: ``offline_count(n, ratio)`` rows from ``offline`` followed by
    the rest from ``online`` (either buffer may be None when its share is zero)."""
    n_off = offline_count(n, offline_ratio)
    k_off, k_on = jax.random.split(key)
    parts = []
    if n_off:
        parts.append(buffer_sample(offline, k_off, n_off))
    if n - n_off:
        parts.append(buffer_sample(online, k_on, n - n_off))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *parts)


# ---------------------------------------------------------------------------------------------
# networks


class Critic(nn.Module):
    hidden: tuple[int, ...]
    layer_norm: bool
    vocab_size: int
    embed_dim: int
    use_time: bool

    @nn.compact
    def __call__(self, obs: dict, action: jax.Array) -> jax.Array:  # [..., D] -> [...]
        x = ObsEncoder(self.vocab_size, self.embed_dim, self.use_time)(obs)
        x = mlp(jnp.concatenate([x, action], -1), self.hidden, self.layer_norm)
        return nn.Dense(1)(x)[..., 0]


class ResidualActor(nn.Module):
    """pi(a_delta | s, b): a tanh-Gaussian over the residual, reading the base action b."""

    hidden: tuple[int, ...]
    action_dim: int
    vocab_size: int
    embed_dim: int
    use_time: bool
    init_log_std: float = 0.0

    @nn.compact
    def __call__(self, obs: dict, base: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = ObsEncoder(self.vocab_size, self.embed_dim, self.use_time)(obs)
        x = mlp(jnp.concatenate([x, base], -1), self.hidden)
        # the mean starts at zero, so the first residual episodes execute the base itself
        # (a random residual would start below the base and the critic would have to undo it)
        mean = nn.Dense(self.action_dim, kernel_init=nn.initializers.zeros)(x)
        log_std = nn.Dense(self.action_dim, kernel_init=nn.initializers.zeros,
                           bias_init=nn.initializers.constant(self.init_log_std))(x)
        log_std = jnp.clip(log_std, *LOG_STD_RANGE)
        return mean, log_std


def residual_actor(cfg: SACConfig, action_dim: int) -> ResidualActor:
    return ResidualActor(cfg.actor_hidden, action_dim, cfg.vocab_size, cfg.embed_dim,
                         cfg.use_time, cfg.init_log_std)


def compose(base: jax.Array, delta: jax.Array, xi) -> jax.Array:
    """The executed action: clip(base + xi delta, -1, 1)."""
    return jnp.clip(base + xi * delta, -1.0, 1.0)


def subset_min(qs: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """RLPD's target over an ensemble: qs [C, B] -> the minimum over k critics drawn without
    replacement (one subset for the whole batch, as ``subsample_ensemble``) -> [B]."""
    idx = jax.random.choice(key, qs.shape[0], (k,), replace=False)
    return qs[idx].min(0)


# ---------------------------------------------------------------------------------------------
# the learner


@struct.dataclass
class SACState:
    critic: TrainState
    target_params: Any
    actor: TrainState
    log_temperature: TrainState
    config: SACConfig = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)

    @property
    def target_entropy(self) -> float:
        c = self.config.target_entropy
        return -0.5 * self.action_dim if c is None else c


def _optimizer(lr: float, clip: float):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr)) if clip else \
        optax.adam(lr)


def init_sac(cfg: SACConfig, obs: dict, action_dim: int, key: jax.Array) -> SACState:
    """A fresh learner for observations shaped like ``obs`` (one, no batch axis) and residuals
    of ``action_dim``."""
    cfg.validate()
    ensemble = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=cfg.num_critics)
    critic = ensemble(cfg.hidden, cfg.layer_norm, cfg.vocab_size, cfg.embed_dim, cfg.use_time)
    actor = residual_actor(cfg, action_dim)
    one = jax.tree.map(lambda x: jnp.asarray(x)[None], obs)
    a = jnp.zeros((1, action_dim), jnp.float32)
    k_c, k_a = jax.random.split(key)
    c_params = critic.init(k_c, one, a)["params"]
    return SACState(
        critic=TrainState.create(apply_fn=critic.apply, params=c_params,
                                 tx=_optimizer(cfg.critic_lr, cfg.grad_clip)),
        target_params=c_params,
        actor=TrainState.create(apply_fn=actor.apply, params=actor.init(k_a, one, a)["params"],
                                tx=_optimizer(cfg.actor_lr, cfg.grad_clip)),
        log_temperature=TrainState.create(
            apply_fn=None,
            params={"log_temperature": jnp.asarray(math.log(cfg.init_temperature), jnp.float32)},
            tx=optax.adam(cfg.temperature_lr)),
        config=cfg, action_dim=action_dim)


def q_values(state: SACState, obs: dict, action: jax.Array, params=None) -> jax.Array:
    """Q_i(s, a) for every critic: obs [B, ...], action [B, D] -> [num_critics, B]."""
    return state.critic.apply_fn({"params": state.critic.params if params is None else params},
                                 obs, action)


def residual(state: SACState, obs: dict, base: jax.Array, key: jax.Array, params=None):
    """A residual sample at each of B states -> (a_delta [B, D], log-prob [B])."""
    mean, log_std = state.actor.apply_fn(
        {"params": state.actor.params if params is None else params}, obs, base)
    return tanh_gaussian(mean, log_std, key)


def act(state: SACState, obs: dict, base: jax.Array, key: jax.Array, xi,
        deterministic: bool = False) -> jax.Array:
    """The executed action at each of B states: compose(base, xi a_delta), with a_delta sampled
    or, ``deterministic``, tanh of the mean (for evaluation)."""
    if deterministic:
        mean, _ = state.actor.apply_fn({"params": state.actor.params}, obs, base)
        return compose(base, jnp.tanh(mean), xi)
    return compose(base, residual(state, obs, base, key)[0], xi)


def temperature(state: SACState) -> jax.Array:
    return jnp.exp(state.log_temperature.params["log_temperature"])


def critic_loss(params, state: SACState, batch: dict, key: jax.Array, xi):
    """Batch keys: obs, base, action (executed), reward, discount, done, next_obs, next_base
    (the base action at s'), and mc with ``cql_alpha > 0``."""
    cfg = state.config
    k_next, k_subset, k_cur, k_next_cql, k_rand = jax.random.split(key, 5)
    d_next, logp_next = residual(state, batch["next_obs"], batch["next_base"], k_next)
    a_next = compose(batch["next_base"], d_next, xi)
    q_next = subset_min(q_values(state, batch["next_obs"], a_next, state.target_params),
                        k_subset, cfg.num_min_critics)
    if cfg.backup_entropy:
        q_next = q_next - temperature(state) * logp_next
    y = jax.lax.stop_gradient(
        batch["reward"] + batch["discount"] * (1.0 - batch["done"]) * q_next)
    q_data = q_values(state, batch["obs"], batch["action"], params)  # [C, B]
    bellman = jnp.mean((q_data - y[None]) ** 2)
    info = {"critic_loss": bellman, "q": jnp.mean(q_data), "target": jnp.mean(y)}
    if not cfg.cql_alpha:
        return bellman, info
    n, (B, D) = cfg.cql_actions, batch["action"].shape

    def pi_at(at_obs, at_base, k):  # n composed samples of the agent -> [n, B, D]
        d = jax.vmap(lambda kk: residual(state, at_obs, at_base, kk)[0])(jax.random.split(k, n))
        return jax.lax.stop_gradient(compose(at_base[None], d, xi))

    def q_many(actions):  # [n, B, D] -> [C, n, B], all at s
        return jax.vmap(lambda a: q_values(state, batch["obs"], a, params), out_axes=1)(actions)

    q_rand = q_many(jax.random.uniform(k_rand, (n, B, D), minval=-1.0, maxval=1.0))
    q_cur = q_many(pi_at(batch["obs"], batch["base"], k_cur))
    q_nxt = q_many(pi_at(batch["next_obs"], batch["next_base"], k_next_cql))
    if cfg.calibrated:
        floor = batch["mc"][None, None]
        q_cur, q_nxt = jnp.maximum(q_cur, floor), jnp.maximum(q_nxt, floor)
    ood = jax.nn.logsumexp(jnp.concatenate([q_rand, q_cur, q_nxt, q_data[:, None]], 1), 1)
    cql = cfg.cql_alpha * jnp.mean(ood - q_data)
    return bellman + cql, {**info, "critic_loss": bellman + cql, "cql": cql}


def actor_loss(params, state: SACState, batch: dict, key: jax.Array, xi):
    d, logp = residual(state, batch["obs"], batch["base"], key, params)
    q = q_values(state, batch["obs"], compose(batch["base"], d, xi)).mean(0)
    loss = jnp.mean(temperature(state) * logp - q)
    return loss, {"actor_loss": loss, "entropy": -jnp.mean(logp)}


def critic_step(state: SACState, batch: dict, key: jax.Array, xi) -> tuple[SACState, dict]:
    (_, info), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic.params, state, batch, key, xi)
    critic = state.critic.apply_gradients(grads=grads)
    target = optax.incremental_update(critic.params, state.target_params, state.config.tau)
    return state.replace(critic=critic, target_params=target), info


def actor_step(state: SACState, batch: dict, key: jax.Array, xi) -> tuple[SACState, dict]:
    (_, info), grads = jax.value_and_grad(actor_loss, has_aux=True)(
        state.actor.params, state, batch, key, xi)
    entropy = jax.lax.stop_gradient(info["entropy"])
    # the temperature rises while the entropy is below its target
    t_grad = jax.grad(lambda p: jnp.exp(p["log_temperature"]) * (entropy - state.target_entropy))(
        state.log_temperature.params)
    state = state.replace(actor=state.actor.apply_gradients(grads=grads),
                          log_temperature=state.log_temperature.apply_gradients(grads=t_grad))
    return state, {**info, "temperature": temperature(state)}


def update(state: SACState, batch: dict, key: jax.Array, xi, train_actor: bool = True
           ) -> tuple[SACState, dict]:
    """One RLPD update on ``batch`` of ``batch_size x utd`` rows: ``utd`` critic steps on its
    minibatches, then (``train_actor``) one actor and temperature step on the last."""
    cfg = state.config
    minis = jax.tree.map(lambda x: x.reshape(cfg.utd, cfg.batch_size, *x.shape[1:]), batch)
    k_critic, k_actor = jax.random.split(key)
    state, infos = jax.lax.scan(lambda s, mk: critic_step(s, mk[0], mk[1], xi), state,
                                (minis, jax.random.split(k_critic, cfg.utd)))
    info = jax.tree.map(jnp.mean, infos)
    if not train_actor:
        return state, info
    last = jax.tree.map(lambda x: x[-1], minis)
    state, a_info = actor_step(state, last, k_actor, xi)
    return state, {**info, **a_info}


@partial(jax.jit, static_argnames=("num_updates", "offline_ratio", "train_actor"))
def train_steps(state: SACState, offline: Buffer | None, online: Buffer | None, key: jax.Array,
                num_updates: int, xi, offline_ratio: float | None = None,
                train_actor: bool = True) -> tuple[SACState, dict]:
    """``num_updates`` RLPD updates on symmetric batches, as one scan -> (state, mean metrics).
    ``offline_ratio`` None: the config's (1.0 pre-trains on the offline buffer alone)."""
    cfg = state.config
    ratio = cfg.offline_ratio if offline_ratio is None else offline_ratio
    n = cfg.batch_size * cfg.utd

    def body(st, k):
        k_batch, k_up = jax.random.split(k)
        batch = symmetric_batch(offline, online, k_batch, n, ratio)
        return update(st, batch, k_up, xi, train_actor)

    state, infos = jax.lax.scan(body, state, jax.random.split(key, num_updates))
    return state, jax.tree.map(jnp.mean, infos)

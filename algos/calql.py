"""Cal-QL (Nakamoto et al., NeurIPS 2023) over action chunks: a conservative, calibrated critic
Q(s, chunk) learned offline from per-decision transitions (``envs.transitions``).

Per update, for a batch of decisions (s, a, r, gamma_d, s', done) and each critic Q_i:

    y        = r' + gamma_d (1 - done) max_{j<n} min_i Qtarget_i(s', a'_j),  a'_j ~ pi(s')
               (one sample and no max without ``max_target_backup``)
    bellman  = mean (Q_i(s, a) - y)^2
    ood      = T logsumexp_{a in rand, pi(s), pi(s')} (Q~_i(s, a) - log density(a)) / T
    cql      = alpha * mean(ood - Q_i(s, a))
    critic   = sum_i (bellman_i + cql_i)

with n = ``n_actions`` samples of each kind: uniform chunks in [-1, 1]^(H A) (density 0.5^(H A))
and chunks from Cal-QL's own tanh-Gaussian actor at s and at s', all evaluated at s. Cal-QL's one
change to CQL: Q~ = max(Q, V_mc(s)) for the policy samples, the Monte-Carlo return-to-go of the
data, so the regulariser never pushes Q at the policy's actions below what the data's own
behaviour earned; ``bound_rate`` is the share of those Q values that the floor lifted.
``calibrated=False`` is plain CQL. The actor maximises min_i Q_i - alpha_ent log pi with
automatic entropy tuning. ``policy_samples="base"`` replaces the actor by a fixed bank of the
frozen base policy's own candidates at s and s' (``prepare``'s ``base_chunks`` and
``base_next_chunks``): the chunks a verifier will rank. Their density is unknown, so that choice
goes without importance sampling (the logsumexp then also holds Q(s, a_data), as released).
Rewards enter as r' = reward_scale r + reward_bias, and an episode that never succeeds has
V_mc = reward_bias / (1 - gamma_d) (Cal-QL's sparse-reward convention).

Defaults follow the V-GPS critic (METHODS.md 4.2): alpha 5, 4 sampled actions, gamma 0.98 per
env step, critic lr 3e-4, actor lr 1e-4, tau 5e-3, batch 256, two 256-256 critics without
LayerNorm. Updates run as a ``lax.scan`` of ``updates_per_call`` steps per jitted call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

LOG_STD_RANGE = (-20.0, 2.0)
POLICY_SAMPLES = ("actor", "base")


@dataclass(frozen=True)
class CalQLConfig:
    hidden: tuple[int, ...] = (256, 256)
    """critic MLP widths (V-GPS: 256-256, no LayerNorm)"""
    actor_hidden: tuple[int, ...] = (256, 256)
    num_critics: int = 2
    """ensemble size; the target and the actor use the minimum over it"""
    embed_dim: int = 16
    """instruction-token embedding width (tokens are mean-pooled, padding excluded)"""
    vocab_size: int = 0
    """instruction vocabulary; 0 = one more than the largest token in the training data (a
    verifier sets the policy's, so unseen words at test time still have an embedding)"""
    use_time: bool = True
    """read obs["time"] (t / T) when present: a finite-horizon value depends on the clock"""
    alpha: float = 5.0
    """weight of the conservative term (V-GPS cql_alpha 5; 0 = plain fitted Q-iteration)"""
    calibrated: bool = True
    """floor the policy samples' Q at the Monte-Carlo return-to-go (False: plain CQL)"""
    n_actions: int = 4
    """samples of each kind (uniform, pi(s), pi(s')) in the conservative term and the backup"""
    policy_samples: str = "actor"
    """where pi's samples come from: "actor" (Cal-QL's own tanh-Gaussian actor, as released) or
    "base" (the frozen base policy's candidates, precomputed per decision; no actor is trained)"""
    temperature: float = 1.0
    """cql_temp of the logsumexp"""
    importance_sampling: bool = True
    max_target_backup: bool = True
    gamma: float = 0.98
    """per env step; a decision that executes `replan` steps is discounted by gamma**replan"""
    critic_lr: float = 3e-4
    actor_lr: float = 1e-4
    warmup: int = 2000
    """linear learning-rate warm-up steps of both optimisers"""
    tau: float = 5e-3
    batch_size: int = 256
    reward_scale: float = 1.0
    reward_bias: float = 0.0
    target_entropy: float | None = None
    """None: -(H A), the flattened chunk's dimension"""
    steps: int = 20000
    updates_per_call: int = 100
    seed: int = 0

    def __post_init__(self):
        for f in ("num_critics", "embed_dim", "n_actions", "batch_size", "steps",
                  "updates_per_call"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CalQLConfig.{f} must be a positive int, got {v!r}")
        for f in ("hidden", "actor_hidden"):
            v = getattr(self, f)
            if not v or any(not isinstance(w, int) or w < 1 for w in v):
                raise ValueError(f"CalQLConfig.{f} must be a non-empty list of positive ints, "
                                 f"got {v!r}")
        for f in ("critic_lr", "actor_lr", "temperature"):
            if not getattr(self, f) > 0:
                raise ValueError(f"CalQLConfig.{f} must be > 0, got {getattr(self, f)}")
        if not self.alpha >= 0:
            raise ValueError(f"CalQLConfig.alpha must be >= 0, got {self.alpha}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"CalQLConfig.gamma must be in [0, 1), got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"CalQLConfig.tau must be in (0, 1], got {self.tau}")
        if self.vocab_size < 0:
            raise ValueError(f"CalQLConfig.vocab_size must be >= 0, got {self.vocab_size}")
        if self.policy_samples not in POLICY_SAMPLES:
            raise ValueError(f"CalQLConfig.policy_samples must be one of {POLICY_SAMPLES}, got "
                             f"{self.policy_samples!r}")
        if self.policy_samples == "base" and self.importance_sampling:
            raise ValueError("CalQLConfig.policy_samples='base' needs importance_sampling=false:"
                             " the base policy's candidates have no known density")
        if self.warmup < 0:
            raise ValueError(f"CalQLConfig.warmup must be >= 0, got {self.warmup}")


# ---------------------------------------------------------------------------------------------
# data


def mc_returns(tr: dict, reward_scale: float, reward_bias: float) -> np.ndarray:
    """Cal-QL's calibration floor V_mc per decision, in the transformed reward r' = scale r +
    bias: the discounted r' to go within a successful episode (G' = scale G + bias (1 -
    gamma_d^n) / (1 - gamma_d) with n decisions left), and bias / (1 - gamma_d) for every
    decision of an episode that never succeeds (its rewards are all r' = bias, forever)."""
    episode = np.asarray(tr["episode"], np.int64)
    disc = np.asarray(tr["discount"], np.float64)
    if len(episode) == 0:
        return np.zeros(0, np.float32)
    n_eps = episode.max() + 1
    succeeded = np.zeros(n_eps, bool)
    np.logical_or.at(succeeded, episode, np.asarray(tr["done"], bool))
    count = np.bincount(episode, minlength=n_eps)
    left = count[episode] - np.asarray(tr["decision_index"], np.int64)  # this one included
    geometric = np.where(disc < 1, (1 - disc**left) / np.maximum(1 - disc, 1e-12), left)
    ok = reward_scale * np.asarray(tr["return_to_go"], np.float64) + reward_bias * geometric
    never = reward_bias / np.maximum(1 - disc, 1e-12)
    return np.where(succeeded[episode], ok, never).astype(np.float32)


def prepare(tr: dict, cfg: CalQLConfig) -> dict:
    """Device arrays for training: obs, next_obs, flat chunk [D, H A], transformed reward,
    discount, done, mc (the calibration floor), and with ``policy_samples="base"`` the base
    policy's candidates base [D, K, H A] at s and base_next [D, K, H A] at s' (from
    ``tr["base_chunks"]`` and ``tr["base_next_chunks"]``, [D, K, H, A])."""
    chunk = np.asarray(tr["chunk"], np.float32)
    bank = {}
    if cfg.policy_samples == "base":
        for name, src in (("base", "base_chunks"), ("base_next", "base_next_chunks")):
            if src not in tr:
                raise ValueError(f"CalQLConfig.policy_samples='base' needs tr[{src!r}], the base "
                                 f"policy's candidates [D, K, H, A]")
            cands = np.asarray(tr[src], np.float32)
            bank[name] = jnp.asarray(cands.reshape(len(chunk), cands.shape[1], -1))
    return {**bank,
        "obs": {k: jnp.asarray(v) for k, v in tr["obs"].items()},
        "next_obs": {k: jnp.asarray(v) for k, v in tr["next_obs"].items()},
        "action": jnp.asarray(chunk.reshape(len(chunk), -1)),
        "reward": jnp.asarray(cfg.reward_scale * np.asarray(tr["reward"]) + cfg.reward_bias,
                              jnp.float32),
        "discount": jnp.asarray(tr["discount"], jnp.float32),
        "done": jnp.asarray(tr["done"], jnp.float32),
        "mc": jnp.asarray(mc_returns(tr, cfg.reward_scale, cfg.reward_bias)),
    }


# ---------------------------------------------------------------------------------------------
# networks


class ObsEncoder(nn.Module):
    """obs dict -> one vector: the state, the mean embedding of the instruction's non-padding
    tokens (id 0 is padding), and the clock."""

    vocab_size: int
    embed_dim: int
    use_time: bool

    @nn.compact
    def __call__(self, obs: dict) -> jax.Array:
        parts = [obs["state"].astype(jnp.float32)]
        if "instruction" in obs and self.vocab_size > 0:
            tokens = obs["instruction"]
            mask = (tokens > 0).astype(jnp.float32)[..., None]
            emb = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
            parts.append(jnp.sum(emb * mask, -2) / jnp.maximum(jnp.sum(mask, -2), 1.0))
        if self.use_time and "time" in obs:
            parts.append(obs["time"].astype(jnp.float32)[..., None])
        return jnp.concatenate(parts, -1)


def mlp(x, widths, layer_norm: bool = False):
    """ReLU layers of ``widths`` (inside a compact module), LayerNorm before each activation
    when ``layer_norm``."""
    for w in widths:
        x = nn.Dense(w)(x)
        x = nn.relu(nn.LayerNorm()(x) if layer_norm else x)
    return x


class Critic(nn.Module):
    hidden: tuple[int, ...]
    vocab_size: int
    embed_dim: int
    use_time: bool

    @nn.compact
    def __call__(self, obs: dict, action: jax.Array) -> jax.Array:  # [..., D] -> [...]
        x = ObsEncoder(self.vocab_size, self.embed_dim, self.use_time)(obs)
        x = mlp(jnp.concatenate([x, action], -1), self.hidden)
        return nn.Dense(1)(x)[..., 0]


class Actor(nn.Module):
    hidden: tuple[int, ...]
    action_dim: int
    vocab_size: int
    embed_dim: int
    use_time: bool

    @nn.compact
    def __call__(self, obs: dict) -> tuple[jax.Array, jax.Array]:
        x = mlp(ObsEncoder(self.vocab_size, self.embed_dim, self.use_time)(obs), self.hidden)
        mean = nn.Dense(self.action_dim)(x)
        log_std = jnp.clip(nn.Dense(self.action_dim)(x), *LOG_STD_RANGE)
        return mean, log_std


def tanh_gaussian(mean, log_std, key):
    """A sample a = tanh(mean + std eps) in (-1, 1)^D and its log-density (change of
    variables: log N(u) - sum log(1 - tanh(u)^2))."""
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    log_n = -0.5 * (((u - mean) / jnp.exp(log_std)) ** 2 + 2 * log_std + jnp.log(2 * jnp.pi))
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), jnp.sum(log_n - log_det, -1)


# ---------------------------------------------------------------------------------------------
# the learner state and one update


@struct.dataclass
class CalQLState:
    critic: TrainState
    target_params: Any
    actor: TrainState
    log_alpha: TrainState
    config: CalQLConfig = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)


def _nets(cfg: CalQLConfig, vocab_size: int, action_dim: int):
    ensemble = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=cfg.num_critics)
    critic = ensemble(cfg.hidden, vocab_size, cfg.embed_dim, cfg.use_time)
    actor = Actor(cfg.actor_hidden, action_dim, vocab_size, cfg.embed_dim, cfg.use_time)
    return critic, actor


def _vocab_size(cfg: CalQLConfig, obs: dict) -> int:
    if "instruction" not in obs:
        return 0
    return cfg.vocab_size or int(np.asarray(obs["instruction"]).max()) + 1


def init_calql(cfg: CalQLConfig, data: dict, key: jax.Array) -> CalQLState:
    """A fresh learner sized from ``data["obs"]`` (layout, vocabulary) and ``data["action"]``
    [N, H A] (chunk size), e.g. ``prepare``'s arrays."""
    action_dim = int(data["action"].shape[-1])
    critic, actor = _nets(cfg, _vocab_size(cfg, data["obs"]), action_dim)
    one = jax.tree.map(lambda x: x[:1], data["obs"])
    k_c, k_a = jax.random.split(key)
    c_params = critic.init(k_c, one, data["action"][:1])["params"]

    def opt(lr):
        sched = optax.linear_schedule(0.0, lr, cfg.warmup) if cfg.warmup else lr
        return optax.adam(sched)

    return CalQLState(
        critic=TrainState.create(apply_fn=critic.apply, params=c_params, tx=opt(cfg.critic_lr)),
        target_params=c_params,
        actor=TrainState.create(apply_fn=actor.apply, params=actor.init(k_a, one)["params"],
                                tx=opt(cfg.actor_lr)),
        log_alpha=TrainState.create(apply_fn=None, params={"log_alpha": jnp.zeros(())},
                                    tx=optax.adam(cfg.actor_lr)),
        config=cfg, action_dim=action_dim)


def q_values(state: CalQLState, obs: dict, actions: jax.Array, params=None) -> jax.Array:
    """Q_i(s, a) for every critic: obs [B, ...], actions [B, D] -> [num_critics, B]."""
    return state.critic.apply_fn({"params": state.critic.params if params is None else params},
                                 obs, actions)


def sample_actions(state: CalQLState, obs: dict, key: jax.Array, n: int, params=None):
    """n samples of the actor at each of B states -> (actions [n, B, D], log-probs [n, B])."""
    mean, log_std = state.actor.apply_fn(
        {"params": state.actor.params if params is None else params}, obs)
    return jax.vmap(lambda k: tanh_gaussian(mean, log_std, k))(jax.random.split(key, n))


def pi_samples(state: CalQLState, batch: dict, at: str, key: jax.Array, n: int):
    """n of pi's chunks per state of the batch, at s (at="obs") or s' (at="next_obs") ->
    (actions [n, B, D], log-densities [n, B] or None for the base policy's bank)."""
    if state.config.policy_samples == "actor":
        return sample_actions(state, batch[at], key, n)
    bank = batch["base" if at == "obs" else "base_next"]  # [B, K, D]
    idx = jax.random.randint(key, (n, bank.shape[0]), 0, bank.shape[1])
    return bank[jnp.arange(bank.shape[0])[None], idx], None


def _q_many(state, params, obs, actions):
    """Q at n actions per state: actions [n, B, D] -> [num_critics, n, B]."""
    return jax.vmap(lambda a: q_values(state, obs, a, params), out_axes=1)(actions)


def critic_loss(params, state: CalQLState, batch: dict, key: jax.Array):
    cfg = state.config
    n, (B, D) = cfg.n_actions, batch["action"].shape
    k_next, k_cur, k_back, k_rand = jax.random.split(key, 4)
    # Bellman target from the target critics, at the actor's samples at s'
    n_back = n if cfg.max_target_backup else 1
    a_back, _ = pi_samples(state, batch, "next_obs", k_back, n_back)
    q_back = _q_many(state, state.target_params, batch["next_obs"], a_back).min(0).max(0)
    y = batch["reward"] + batch["discount"] * (1.0 - batch["done"]) * q_back
    q_data = q_values(state, batch["obs"], batch["action"], params)  # [C, B]
    bellman = jnp.mean((q_data - jax.lax.stop_gradient(y)[None]) ** 2, -1)  # [C]

    # the conservative term: uniform chunks and the actor's chunks at s and at s', all at s
    a_rand = jax.random.uniform(k_rand, (n, B, D), minval=-1.0, maxval=1.0)
    a_cur, logp_cur = jax.lax.stop_gradient(pi_samples(state, batch, "obs", k_cur, n))
    a_next, logp_next = jax.lax.stop_gradient(pi_samples(state, batch, "next_obs", k_next, n))
    q_rand = _q_many(state, params, batch["obs"], a_rand)
    q_cur = _q_many(state, params, batch["obs"], a_cur)
    q_next = _q_many(state, params, batch["obs"], a_next)
    floor = batch["mc"][None, None]
    bound_rate = 0.5 * (jnp.mean(q_cur < floor) + jnp.mean(q_next < floor))
    q_policy = jnp.mean(q_cur)
    if cfg.calibrated:
        q_cur, q_next = jnp.maximum(q_cur, floor), jnp.maximum(q_next, floor)
    if cfg.importance_sampling:
        cat = jnp.concatenate([q_rand - D * math.log(0.5), q_next - logp_next[None],
                               q_cur - logp_cur[None]], 1)
    else:
        cat = jnp.concatenate([q_rand, q_next, q_cur, q_data[:, None]], 1)
    ood = cfg.temperature * jax.nn.logsumexp(cat / cfg.temperature, axis=1)  # [C, B]
    cql = cfg.alpha * jnp.mean(ood - q_data, -1)  # [C]
    loss = jnp.sum(bellman + cql)
    return loss, {"critic_loss": loss, "bellman": jnp.mean(bellman), "cql": jnp.mean(cql),
                  "q_data": jnp.mean(q_data), "q_policy": q_policy, "mc": jnp.mean(batch["mc"]),
                  "target": jnp.mean(y), "bound_rate": bound_rate}


def actor_loss(params, state: CalQLState, batch: dict, key: jax.Array):
    a, logp = sample_actions(state, batch["obs"], key, 1, params)
    q = q_values(state, batch["obs"], a[0]).min(0)
    alpha = jnp.exp(state.log_alpha.params["log_alpha"])
    loss = jnp.mean(alpha * logp[0] - q)
    return loss, {"actor_loss": loss, "entropy": -jnp.mean(logp), "alpha_ent": alpha}


def update(state: CalQLState, batch: dict, key: jax.Array) -> tuple[CalQLState, dict]:
    """One step on a batch: the critics and their targets, then, from the same pre-update
    critics, the actor and its entropy temperature (no actor with ``policy_samples="base"``)."""
    cfg = state.config
    k_actor, k_critic = jax.random.split(key)
    (_, c_info), c_grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic.params, state, batch, k_critic)
    critic = state.critic.apply_gradients(grads=c_grads)
    target = optax.incremental_update(critic.params, state.target_params, cfg.tau)
    if cfg.policy_samples == "base":
        return state.replace(critic=critic, target_params=target), c_info
    target_entropy = (-float(state.action_dim) if cfg.target_entropy is None
                      else cfg.target_entropy)
    (_, a_info), a_grads = jax.value_and_grad(actor_loss, has_aux=True)(
        state.actor.params, state, batch, k_actor)
    entropy = jax.lax.stop_gradient(a_info["entropy"])
    # the entropy temperature rises while the actor's entropy is below its target
    alpha_grad = jax.grad(lambda p: p["log_alpha"] * (entropy - target_entropy))(
        state.log_alpha.params)
    state = state.replace(critic=critic, target_params=target,
                          actor=state.actor.apply_gradients(grads=a_grads),
                          log_alpha=state.log_alpha.apply_gradients(grads=alpha_grad))
    return state, {**c_info, **a_info}


@partial(jax.jit, static_argnames=("num_updates",))
def train_steps(state: CalQLState, data: dict, key: jax.Array, num_updates: int):
    """``num_updates`` updates on uniformly drawn batches, as one scan -> (state, mean metrics)."""
    size = data["action"].shape[0]

    def body(st, k):
        k_idx, k_up = jax.random.split(k)
        idx = jax.random.randint(k_idx, (st.config.batch_size,), 0, size)
        return update(st, jax.tree.map(lambda x: x[idx], data), k_up)

    state, metrics = jax.lax.scan(body, state, jax.random.split(key, num_updates))
    return state, jax.tree.map(jnp.mean, metrics)


def train_calql(tr: dict, cfg: CalQLConfig, key: jax.Array | None = None, log: Any = None
                ) -> tuple[CalQLState, list[dict]]:
    """Trains a fresh learner on transitions (``envs.transitions.transitions``) for
    ``cfg.steps`` updates -> (state, one metrics row per jitted call); ``log(row)`` after each."""
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    data = prepare(tr, cfg)
    k_init, k_train = jax.random.split(key)
    state = init_calql(cfg, data, k_init)
    history, done = [], 0
    while done < cfg.steps:
        n = min(cfg.updates_per_call, cfg.steps - done)
        state, m = train_steps(state, data, jax.random.fold_in(k_train, done), n)
        done += n
        row = {"step": done, **{k: float(v) for k, v in m.items()}}
        history.append(row)
        if log is not None:
            log(row)
    return state, history

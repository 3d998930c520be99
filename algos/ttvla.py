"""TT-VLA: test-time RL from a dense task-progress reward during deployment (Liu et al., 2026;
METHODS.md 6, the authors' released code).

The published recipe, on the decisions of one deployment episode:

- the reward of a decision is the progress it made, r_t = p_{t+1} - p_t, and it is also the
  advantage (gamma = 0, no value function, no normalisation);
- every ``interval`` decisions (TT-VLA: 8) one gradient step of PPO's clipped surrogate
  (epsilon 0.2, gradient-norm clip 10) on the last ``interval`` transitions; no entropy or KL
  term (``kl_coef`` adds a KL to the frozen policy: an extension, off by default);
- the parameters updated are a low-rank adapter whose output matrix starts at zero, so the
  first decision is the base policy's;
- the adapter and its optimizer start fresh with every episode (``reset="episode"``): the
  adaptation happens within an episode. ``reset="continual"`` (an extension) keeps learning
  along a stream of episodes instead.

**What it adapts on a flow policy: the initial noise.** The denoiser stays frozen; the adapter
is a Gaussian policy over the flow's initial noise, z ~ N(mu(s), I) with
mu(s) = reshape(phi(s) D U) [H, A] (DSRL-style noise-space RL), phi(s) the policy's own state
embedding for the action expert (``FlowContext.state``, F = expert_width); as in LoRA both D
[F, rank] (drawn at random) and U [rank, H A] (zero at the start) are learned. At mu = 0 the
proposal is the base's own N(0, I): the frozen arm is exactly the base. The log-probability of
a decision is the Gaussian's at the chosen candidate's noise, so with M > 1 the verifier ranks
candidates drawn from the adapted proposal and the PPO ratio is the chosen one's (a verifier's
choice is not a sample of the adapter's policy, so that arm is a heuristic composition).

**On the autoregressive policy: a LoRA on its output head** (``TokenSteer``), as TT-VLA's
LoRA acts through OpenVLA's token log-probabilities: logits_t + h_t D U with h_t the token's
final hidden state, D [W, rank] drawn at random, U [rank, bins] zero at the start (the
transformer is frozen, so the chosen chunk's hidden states are the base's and its adapted
log-probability, the sum over its H A tokens, is recomputed exactly from them). The KL term is
the next-token KL summed over the chunk's sampled prefixes. The value of the ``gae`` option
reads phi(s) = the last layer's prefix keys averaged over the prefix (``state_features``).

A transition is one harness decision. The update is one step on data collected with the same
parameters, so the ratio is 1 at that step and the clipped surrogate's gradient is the policy
gradient (``tests/test_ttvla.py``); clipping acts only if ``epochs`` > 1.

It runs inside the harness's compiled evaluation (``algos.base``: a test-time learner), so an
adapted episode and a frozen one start from the same initial state: ``steerlab eval
adapter.name=ttvla variant=dynamics ...`` against ``adapter.name=none``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from algos.base import ADAPTERS_FILE, AdapterPlugin, BuildContext
from algos.progress import load_progress, predict_progress
from algos.registry import register_adapter
from core.io import read_npz
from policies.autoregressive import low_rank_logits

RESETS = ("episode", "continual")
PROGRESS = ("env", "learned")
ADVANTAGES = ("increment", "gae")


@dataclass(frozen=True)
class TTVLAConfig:
    interval: int = 8
    """decisions between updates; each update uses the last ``interval`` transitions"""
    clip_eps: float = 0.2
    max_grad_norm: float = 10.0
    lr: float = 1e-2
    """Adam step size. TT-VLA uses 1e-4 on a rank-32 LoRA over a 7B model, whose millions of
    moved weights change the action at that step size; this adapter has a few hundred weights
    and one update per ``interval`` decisions, and at 1e-4 its mean moves by about 1e-3 of the
    noise's scale per update"""
    epochs: int = 1
    """gradient steps per update on the same transitions (TT-VLA: 1)"""
    rank: int = 8
    """the adapter's rank (TT-VLA: 32 on each LoRA-adapted matrix)"""
    kl_coef: float = 0.0
    """weight of KL(adapted || frozen) per decision (an extension; TT-VLA: 0)"""
    reset: str = "episode"
    """episode: a fresh adapter and optimizer every episode (TT-VLA); continual: keep learning
    along a stream of episodes"""
    streams: int = 8
    """continual: parallel streams; eval.episodes must be a multiple"""
    progress: str = "env"
    """the progress signal: env (the simulator's ``info["progress"]``) or learned (a progress
    estimator fitted on demonstrations, ``algos.progress``, read from ``progress_dir``)"""
    progress_dir: str = ""
    """learned: the directory ``steerlab fit-progress`` wrote"""
    advantage: str = "increment"
    """increment: A_t = p_{t+1} - p_t (TT-VLA: gamma 0, no value); gae: GAE(gamma, lambda) over
    the buffered transitions with a learned linear value V(phi(s)), bootstrapped from the state
    after the last one (an extension)"""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    """gae: weight of the value's squared error in the update's loss"""
    init_seed: int = 0
    """seed of the random draw that initialises the down-projection D"""
    init_from: str = ""
    """continual: start each stream from the adapter it ended with in an earlier run (that
    run's ``adapters.npz``, same number of streams)"""
    learn: bool = True
    """false: act with the adapter as it is, no update (with ``init_from``: deploy a continual
    stream's final adapters, e.g. back on the unshifted task)"""

    @property
    def continual(self) -> bool:
        return self.reset == "continual"

    def frozen_final(self, run_dir: str) -> TTVLAConfig:
        """This config deploying the final adapters of the continual run in ``run_dir`` (one
        per stream), without learning."""
        return dataclasses.replace(self, init_from=run_dir, learn=False)

    def validate(self) -> None:
        w = "adapter.ttvla"
        for f in ("interval", "epochs", "rank", "streams"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{w}.{f} must be a positive int, got {v!r}")
        for f in ("clip_eps", "max_grad_norm", "lr"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{w}.{f} must be > 0, got {getattr(self, f)!r}")
        for f in ("kl_coef", "value_coef"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"{w}.{f} must be >= 0, got {getattr(self, f)!r}")
        for f in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, f) <= 1:
                raise ValueError(f"{w}.{f} must be in [0, 1], got {getattr(self, f)!r}")
        for f, allowed in (("reset", RESETS), ("progress", PROGRESS),
                           ("advantage", ADVANTAGES)):
            if getattr(self, f) not in allowed:
                raise ValueError(f"{w}.{f} must be one of {allowed}, got {getattr(self, f)!r}")
        if (self.progress == "learned") != bool(self.progress_dir):
            raise ValueError(f"{w}.progress_dir is needed by progress=learned and only by it; "
                             f"got progress={self.progress!r}, "
                             f"progress_dir={self.progress_dir!r}")
        if self.init_from and self.reset != "continual":
            raise ValueError(f"{w}.init_from continues continual streams: it needs "
                             f"reset=continual, got reset={self.reset!r}")


# ---------------------------------------------------------------------------------------------
# the pieces with known answers


def progress_advantages(progress: jax.Array, progress_now: jax.Array) -> jax.Array:
    """Advantages of the last transitions: A_j = p_{j+1} - p_j with p [I] the progress at each
    transition's decision and ``progress_now`` the progress after the last one (gamma 0)."""
    return jnp.concatenate([progress[1:], progress_now[None]]) - progress


def gae_advantages(rewards: jax.Array, values: jax.Array, next_value: jax.Array,
                   nonterminal: jax.Array, gamma: float, lam: float) -> jax.Array:
    """GAE over I transitions: delta_j = r_j + gamma V_{j+1} n_j - V_j and
    A_j = delta_j + gamma lam n_j A_{j+1}, with V_I = ``next_value`` and n_j = 0 where the
    episode ended after transition j (``nonterminal`` [I]). gamma = 0 gives A_j = r_j - V_j."""
    next_values = jnp.concatenate([values[1:], next_value[None]])
    deltas = rewards + gamma * next_values * nonterminal - values

    def back(a_next, x):
        delta, n = x
        a = delta + gamma * lam * n * a_next
        return a, a

    return jax.lax.scan(back, jnp.float32(0.0), (deltas, nonterminal), reverse=True)[1]


def value(params: dict, feats: jax.Array) -> jax.Array:
    """V(s) = phi(s) w + b: [..., F] -> [...]."""
    return feats @ params["value_w"] + params["value_b"]


def noise_mean(params: dict, feats: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """mu(s) = phi(s) D U for features [..., F] -> [..., H, A]."""
    return (feats @ params["down"] @ params["up"]).reshape(*feats.shape[:-1], *shape)


def gaussian_log_prob(z: jax.Array, mean: jax.Array) -> jax.Array:
    """log N(z; mean, I) summed over the chunk's dims: [..., H, A] -> [...]."""
    d = z.shape[-1] * z.shape[-2]
    return (-0.5 * jnp.sum((z - mean) ** 2, axis=(-2, -1))
            - 0.5 * d * math.log(2 * math.pi))


def kl_to_frozen(mean: jax.Array) -> jax.Array:
    """KL(N(mean, I) || N(0, I)) per decision: [..., H, A] -> [...]."""
    return 0.5 * jnp.sum(mean**2, axis=(-2, -1))


def clipped_surrogate(log_prob: jax.Array, old_log_prob: jax.Array, advantage: jax.Array,
                      valid: jax.Array, eps: float) -> jax.Array:
    """PPO's clipped objective, to be minimised: -mean over valid transitions of
    min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(log_prob - old_log_prob)."""
    ratio = jnp.exp(log_prob - old_log_prob)
    obj = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - eps, 1 + eps) * advantage)
    w = valid.astype(jnp.float32)
    return -jnp.sum(w * obj) / jnp.maximum(w.sum(), 1.0)


def token_log_prob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Sum of the tokens' log-probabilities: logits [..., T, bins], tokens [..., T] -> [...]."""
    logp = jax.nn.log_softmax(logits)
    return jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0], -1)


def token_kl(logits: jax.Array, base_logits: jax.Array) -> jax.Array:
    """KL(adapted || frozen) of the next-token distributions, summed over the chunk's sampled
    prefixes: [..., T, bins] -> [...]."""
    logp, logq = jax.nn.log_softmax(logits), jax.nn.log_softmax(base_logits)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=(-2, -1))


# ---------------------------------------------------------------------------------------------
# what the adapter acts on: one steering per policy kind


@dataclass(frozen=True)
class NoiseSteer:
    """Flow policy: a Gaussian over the initial noise, z ~ N(phi(s) D U, I), D [F, r],
    U [r, H A]; the denoiser is untouched."""

    shape: tuple[int, int]  # (H, A)

    def init(self, down: jax.Array, rank: int) -> dict:
        return {"down": down, "up": jnp.zeros((rank, self.shape[0] * self.shape[1]))}

    def steer(self, params: dict, feats: jax.Array) -> jax.Array:
        return noise_mean(params, feats, self.shape)

    def empty(self) -> dict:
        return {"noise": jnp.zeros(self.shape)}

    def chosen(self, params: dict, candidates, index) -> dict:
        return {"noise": candidates.extras["noise"][index]}

    def log_prob(self, params: dict, feats: jax.Array, chosen: dict) -> jax.Array:
        return gaussian_log_prob(chosen["noise"], noise_mean(params, feats, self.shape))

    def kl(self, params: dict, feats: jax.Array, chosen: dict) -> jax.Array:
        return kl_to_frozen(noise_mean(params, feats, self.shape))

    def records(self, params: dict, feats: jax.Array) -> dict:
        """The noise mean's norm at a state (the noise itself has norm about sqrt(H A))."""
        return {"learner/noise_mean_norm": jnp.sqrt(jnp.sum(self.steer(params, feats) ** 2))}


@dataclass(frozen=True)
class TokenSteer:
    """Autoregressive policy: a LoRA on its output head, logits + h D U with h the token's
    final hidden state, D [W, r], U [r, bins]; the transformer is untouched. The hidden states
    of the chosen chunk do not depend on the adapter (it changes only the logits), so they and
    the frozen head's logits are stored and the adapted log-probability is recomputed exactly."""

    tokens: int  # T = H A
    width: int  # W
    bins: int

    def init(self, down: jax.Array, rank: int) -> dict:
        return {"down": down, "up": jnp.zeros((rank, self.bins))}

    def steer(self, params: dict, feats: jax.Array) -> dict:
        return {"down": params["down"], "up": params["up"]}

    def empty(self) -> dict:
        return {"tokens": jnp.zeros(self.tokens, jnp.int32),
                "hidden": jnp.zeros((self.tokens, self.width)),
                "base_logits": jnp.zeros((self.tokens, self.bins))}

    def chosen(self, params: dict, candidates, index) -> dict:
        hidden = candidates.extras["token_hidden"][index]
        return {"tokens": candidates.extras["tokens"][index], "hidden": hidden,
                "base_logits": candidates.extras["token_logits"][index]
                - low_rank_logits(params, hidden)}

    @staticmethod
    def adapted_logits(params: dict, chosen: dict) -> jax.Array:
        return chosen["base_logits"] + low_rank_logits(params, chosen["hidden"])

    def log_prob(self, params: dict, feats: jax.Array, chosen: dict) -> jax.Array:
        return token_log_prob(self.adapted_logits(params, chosen), chosen["tokens"])

    def kl(self, params: dict, feats: jax.Array, chosen: dict) -> jax.Array:
        return token_kl(self.adapted_logits(params, chosen), chosen["base_logits"])

    def records(self, params: dict, feats: jax.Array) -> dict:
        return {}


# ---------------------------------------------------------------------------------------------
# the learner


@struct.dataclass
class Learner:
    """A test-time learner's carry: the adapter, its optimizer and the last transitions."""

    params: dict  # {"down", "up"} (the steering's) + {"value_w" [F], "value_b" ()} with gae
    opt_state: Any
    feats: jax.Array  # [I, F] phi(s) of the last transitions
    chosen: dict  # [I, ...] what the steering recomputes the chosen candidates' log-prob from
    old_log_prob: jax.Array  # [I]
    progress: jax.Array  # [I] the progress at each decision
    valid: jax.Array  # bool [I] the env was running at that decision
    count: jax.Array  # i32 () decisions so far this episode
    updates: jax.Array  # i32 () updates so far this episode
    next_feats: jax.Array  # [F] phi of the state after the last transition (gae's bootstrap)
    next_alive: jax.Array  # bool () the env still running there


@dataclass(frozen=True, eq=False)  # hashed by identity: its state holds arrays
class TTVLA:
    name = "ttvla"
    learns = True
    cfg: TTVLAConfig
    head: NoiseSteer | TokenSteer
    state: dict  # the adapter's initial parameters (U = 0), stacked [streams] with init_from
    features: Callable  # context -> phi(s) [F], the policy's own (``state_features``)
    feature_dim: int  # F
    estimator: Any = None  # progress=learned: the fitted progress estimator

    @property
    def stream_states(self) -> bool:
        """Each continual stream starts from its own state (``state`` is stacked)."""
        return bool(self.cfg.init_from)

    @property
    def continual(self) -> bool:
        return self.cfg.continual

    @property
    def streams(self) -> int:
        return self.cfg.streams

    @property
    def optimizer(self):
        return optax.chain(optax.clip_by_global_norm(self.cfg.max_grad_norm),
                           optax.adam(self.cfg.lr))

    # the harness's hooks (``algos.base``) ----------------------------------------------------

    def act(self, astate, obs, context, candidates, index, key) -> jax.Array:
        return candidates.actions[index]

    def _empty_buffer(self) -> dict:
        i, feature_dim = self.cfg.interval, self.feature_dim
        chosen = jax.tree.map(lambda x: jnp.zeros((i, *x.shape), x.dtype), self.head.empty())
        return {"feats": jnp.zeros((i, feature_dim)), "chosen": chosen,
                "old_log_prob": jnp.zeros(i), "progress": jnp.zeros(i),
                "valid": jnp.zeros(i, bool), "count": jnp.int32(0), "updates": jnp.int32(0),
                "next_feats": jnp.zeros(feature_dim), "next_alive": jnp.bool_(False)}

    def begin(self, astate: dict) -> Learner:
        return Learner(params=astate, opt_state=self.optimizer.init(astate),
                       **self._empty_buffer())

    def start_episode(self, carry: Learner) -> Learner:
        """Keeps the adapter and its optimizer; the transitions and counters start over."""
        return carry.replace(**self._empty_buffer())

    def before(self, carry: Learner, obs, context, progress, alive):
        """Update on the last ``interval`` transitions when they are complete, then this
        decision's noise mean. ``progress`` is the env's, or the learned estimator's at ``obs``."""
        i = self.cfg.interval
        if self.estimator is not None:
            progress = predict_progress(self.estimator, obs)
        feats = self.features(context)
        # after the episode's end every buffered transition is invalid: no update (Adam's
        # momentum would still move the adapter, which a continual stream carries on)
        due = (carry.count > 0) & (carry.count % i == 0) & jnp.any(carry.valid) & self.cfg.learn
        carry = carry.replace(next_feats=feats, next_alive=alive)
        carry = jax.lax.cond(due, lambda c: self.update(c, progress), lambda c: c, carry)
        slot = carry.count % i
        carry = carry.replace(
            feats=carry.feats.at[slot].set(feats), progress=carry.progress.at[slot].set(progress),
            valid=carry.valid.at[slot].set(alive))
        return carry, self.head.steer(carry.params, feats)

    def after(self, carry: Learner, context, candidates, index) -> Learner:
        slot = carry.count % self.cfg.interval
        chosen = self.head.chosen(carry.params, candidates, index)
        logp = self.head.log_prob(carry.params, carry.feats[slot], chosen)
        return carry.replace(
            chosen=jax.tree.map(lambda b, x: b.at[slot].set(x), carry.chosen, chosen),
            old_log_prob=carry.old_log_prob.at[slot].set(logp), count=carry.count + 1)

    def episode_records(self, carry: Learner) -> dict:
        """Per-episode: the updates made, how far U moved from zero (Frobenius norm), and for a
        flow policy the norm of the noise mean at the last decision's state; a continual
        learner also records its parameters after the episode (``learner/params/NAME``: the
        run's ``adapters.npz``)."""
        last = carry.feats[(carry.count - 1) % self.cfg.interval]
        records = {"learner/updates": carry.updates,
                   "learner/up_norm": jnp.sqrt(jnp.sum(carry.params["up"] ** 2)),
                   **self.head.records(carry.params, last)}
        if self.continual:
            records.update({f"learner/params/{k}": v for k, v in carry.params.items()})
        return records

    # the update ------------------------------------------------------------------------------

    def loss(self, params: dict, carry: Learner, advantage: jax.Array,
             returns: jax.Array) -> jax.Array:
        per = jax.vmap(lambda f, c: (self.head.log_prob(params, f, c),
                                     self.head.kl(params, f, c)))
        log_prob, kl = per(carry.feats, carry.chosen)
        loss = clipped_surrogate(log_prob, carry.old_log_prob, advantage, carry.valid,
                                 self.cfg.clip_eps)
        w = carry.valid.astype(jnp.float32)
        if self.cfg.kl_coef:
            loss += self.cfg.kl_coef * jnp.sum(w * kl) / jnp.maximum(w.sum(), 1)
        if self.cfg.advantage == "gae":
            err = (value(params, carry.feats) - returns) ** 2
            loss += self.cfg.value_coef * jnp.sum(w * err) / jnp.maximum(w.sum(), 1)
        return loss

    def advantages(self, carry: Learner, progress_now: jax.Array):
        """(advantages [I], value targets [I]) of the buffered transitions."""
        rewards = progress_advantages(carry.progress, progress_now)
        if self.cfg.advantage == "increment":
            return rewards, jnp.zeros_like(rewards)
        values = value(carry.params, carry.feats)
        nonterminal = jnp.concatenate([carry.valid[1:], carry.next_alive[None]])
        adv = gae_advantages(rewards, values, value(carry.params, carry.next_feats),
                             nonterminal.astype(jnp.float32), self.cfg.gamma,
                             self.cfg.gae_lambda)
        return adv, adv + values

    def update(self, carry: Learner, progress_now: jax.Array) -> Learner:
        """``epochs`` clipped-surrogate steps on the buffered transitions (advantages and value
        targets computed once, from the parameters that collected them)."""
        advantage, returns = self.advantages(carry, progress_now)

        def step(c, _):
            grads = jax.grad(self.loss)(c.params, c, advantage, returns)
            upd, opt_state = self.optimizer.update(grads, c.opt_state, c.params)
            return c.replace(params=optax.apply_updates(c.params, upd), opt_state=opt_state), None

        carry = jax.lax.scan(step, carry, None, length=self.cfg.epochs)[0]
        return carry.replace(updates=carry.updates + 1)


def init_adapter(cfg: TTVLAConfig, head, down_dim: int, feature_dim: int) -> dict:
    """D ~ N(0, 1/d) [d, r] (seeded draw), U = 0: the adapter's output starts at 0 (and so does
    D's gradient, until U has moved); with gae a zero value head on phi(s) [F]."""
    down = jax.random.normal(jax.random.PRNGKey(cfg.init_seed), (down_dim, cfg.rank))
    params = head.init(down / math.sqrt(down_dim), cfg.rank)
    if cfg.advantage == "gae":
        params.update(value_w=jnp.zeros(feature_dim), value_b=jnp.float32(0.0))
    return params


def load_stream_adapters(cfg: TTVLAConfig, like: dict) -> dict:
    """The last ``streams`` episodes' parameters of a continual run's ``adapters.npz`` (episode
    i belongs to stream i mod S, so they are the streams' final adapters, in stream order),
    stacked [S, ...] and checked against the parameters this config makes."""
    path = cfg.init_from
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTERS_FILE)
    saved = read_npz(path, remedy="adapter.ttvla.init_from names a continual run's output "
                     f"directory (its {ADAPTERS_FILE}) or the file")
    if set(saved) != set(like):
        raise ValueError(f"adapter.ttvla.init_from: {path} holds {sorted(saved)}; this config's "
                         f"adapter has {sorted(like)} (same rank and advantage needed)")
    n = len(next(iter(saved.values())))
    if n % cfg.streams:
        raise ValueError(f"adapter.ttvla.init_from: {path} holds {n} episodes, not a multiple "
                         f"of streams={cfg.streams}")
    stacked = {}
    for k, v in like.items():
        if saved[k].shape[1:] != v.shape:
            raise ValueError(f"adapter.ttvla.init_from: {path}'s {k} has shape "
                             f"{saved[k].shape[1:]}, this config's {v.shape}")
        stacked[k] = jnp.asarray(saved[k][-cfg.streams:])
    return stacked


def _build(cfg: TTVLAConfig, ctx: BuildContext) -> TTVLA:
    cfg.validate()
    policy = ctx.policy
    if policy is None or not hasattr(policy, "sample_steered"):
        raise ValueError("adapter ttvla steers a flow policy's initial noise or an "
                         "autoregressive policy's output head; the "
                         f"{type(policy).__name__} policy offers neither "
                         "(policy.policy=flow|autoregressive)")
    feature_dim = policy.feature_dim
    if hasattr(policy, "make_noise"):
        head, down_dim = NoiseSteer((policy.horizon, policy.action_dim)), feature_dim
    else:
        c = policy.cfg
        head, down_dim = TokenSteer(c.num_tokens, c.width, c.bins), c.width
    state = init_adapter(cfg, head, down_dim, feature_dim)
    if cfg.init_from:
        state = load_stream_adapters(cfg, state)
    estimator = None
    if cfg.progress == "learned":
        estimator = load_progress(cfg.progress_dir)
    return TTVLA(cfg, head, state, policy.state_features, feature_dim, estimator)


register_adapter(AdapterPlugin(TTVLA, build=_build, config=TTVLAConfig))

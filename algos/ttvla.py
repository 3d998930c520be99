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

A transition is one harness decision. The update is one step on data collected with the same
parameters, so the ratio is 1 at that step and the clipped surrogate's gradient is the policy
gradient (``tests/test_ttvla.py``); clipping acts only if ``epochs`` > 1.

It runs inside the harness's compiled evaluation (``algos.base``: a test-time learner), so an
adapted episode and a frozen one start from the same initial state: ``steerlab eval
adapter.name=ttvla variant=dynamics ...`` against ``adapter.name=none``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from algos.base import AdapterPlugin, BuildContext
from algos.registry import register_adapter

RESETS = ("episode", "continual")
PROGRESS = ("env",)


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
    """the progress signal: env (the simulator's ``info["progress"]``)"""
    init_seed: int = 0
    """seed of the random draw that initialises the down-projection D"""

    def validate(self) -> None:
        w = "adapter.ttvla"
        for f in ("interval", "epochs", "rank", "streams"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{w}.{f} must be a positive int, got {v!r}")
        for f in ("clip_eps", "max_grad_norm", "lr"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{w}.{f} must be > 0, got {getattr(self, f)!r}")
        if not self.kl_coef >= 0:
            raise ValueError(f"{w}.kl_coef must be >= 0, got {self.kl_coef!r}")
        if self.reset not in RESETS:
            raise ValueError(f"{w}.reset must be one of {RESETS}, got {self.reset!r}")
        if self.progress not in PROGRESS:
            raise ValueError(f"{w}.progress must be one of {PROGRESS}, got {self.progress!r}")


# ---------------------------------------------------------------------------------------------
# the pieces with known answers


def progress_advantages(progress: jax.Array, progress_now: jax.Array) -> jax.Array:
    """Advantages of the last transitions: A_j = p_{j+1} - p_j with p [I] the progress at each
    transition's decision and ``progress_now`` the progress after the last one (gamma 0)."""
    return jnp.concatenate([progress[1:], progress_now[None]]) - progress


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


# ---------------------------------------------------------------------------------------------
# the learner


@struct.dataclass
class Learner:
    """A test-time learner's carry: the adapter, its optimizer and the last transitions."""

    params: dict  # {"down": [F, r], "up": [r, H A]}
    opt_state: Any
    feats: jax.Array  # [I, F] phi(s) of the last transitions
    noise: jax.Array  # [I, H, A] the chosen candidates' initial noise
    old_log_prob: jax.Array  # [I]
    progress: jax.Array  # [I] the progress at each decision
    valid: jax.Array  # bool [I] the env was running at that decision
    count: jax.Array  # i32 () decisions so far this episode
    updates: jax.Array  # i32 () updates so far this episode


@dataclass(frozen=True, eq=False)  # hashed by identity: its state holds arrays
class TTVLA:
    name = "ttvla"
    learns = True
    cfg: TTVLAConfig
    shape: tuple[int, int]  # (H, A)
    state: dict  # the adapter's initial parameters (U = 0)

    @property
    def continual(self) -> bool:
        return self.cfg.reset == "continual"

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

    def _empty_buffer(self, feature_dim: int) -> dict:
        i = self.cfg.interval
        return {"feats": jnp.zeros((i, feature_dim)), "noise": jnp.zeros((i, *self.shape)),
                "old_log_prob": jnp.zeros(i), "progress": jnp.zeros(i),
                "valid": jnp.zeros(i, bool), "count": jnp.int32(0), "updates": jnp.int32(0)}

    def begin(self, astate: dict) -> Learner:
        return Learner(params=astate, opt_state=self.optimizer.init(astate),
                       **self._empty_buffer(astate["down"].shape[0]))

    def start_episode(self, carry: Learner) -> Learner:
        """Keeps the adapter and its optimizer; the transitions and counters start over."""
        return carry.replace(**self._empty_buffer(carry.params["down"].shape[0]))

    def before(self, carry: Learner, obs, context, progress, alive):
        """Update on the last ``interval`` transitions when they are complete, then this
        decision's noise mean."""
        i = self.cfg.interval
        # after the episode's end every buffered transition is invalid: no update (Adam's
        # momentum would still move the adapter, which a continual stream carries on)
        due = (carry.count > 0) & (carry.count % i == 0) & jnp.any(carry.valid)
        carry = jax.lax.cond(due, lambda c: self.update(c, progress), lambda c: c, carry)
        slot = carry.count % i
        feats = features(context)
        carry = carry.replace(
            feats=carry.feats.at[slot].set(feats), progress=carry.progress.at[slot].set(progress),
            valid=carry.valid.at[slot].set(alive))
        return carry, noise_mean(carry.params, feats, self.shape)

    def after(self, carry: Learner, context, candidates, index) -> Learner:
        slot = carry.count % self.cfg.interval
        z = candidates.extras["noise"][index]
        logp = gaussian_log_prob(z, noise_mean(carry.params, carry.feats[slot], self.shape))
        return carry.replace(noise=carry.noise.at[slot].set(z),
                             old_log_prob=carry.old_log_prob.at[slot].set(logp),
                             count=carry.count + 1)

    def episode_records(self, carry: Learner) -> dict:
        """Per-episode: the updates made, how far U moved from zero (Frobenius norm), and the
        norm of the noise mean at the last decision's state (the noise itself has norm about
        sqrt(H A))."""
        last = carry.feats[(carry.count - 1) % self.cfg.interval]
        return {"learner/updates": carry.updates,
                "learner/up_norm": jnp.sqrt(jnp.sum(carry.params["up"] ** 2)),
                "learner/noise_mean_norm": jnp.sqrt(jnp.sum(
                    noise_mean(carry.params, last, self.shape) ** 2))}

    # the update ------------------------------------------------------------------------------

    def loss(self, params: dict, carry: Learner, advantage: jax.Array) -> jax.Array:
        mean = noise_mean(params, carry.feats, self.shape)
        loss = clipped_surrogate(gaussian_log_prob(carry.noise, mean), carry.old_log_prob,
                                 advantage, carry.valid, self.cfg.clip_eps)
        if self.cfg.kl_coef:
            w = carry.valid.astype(jnp.float32)
            loss += self.cfg.kl_coef * jnp.sum(w * kl_to_frozen(mean)) / jnp.maximum(w.sum(), 1)
        return loss

    def update(self, carry: Learner, progress_now: jax.Array) -> Learner:
        """``epochs`` clipped-surrogate steps on the buffered transitions."""
        advantage = progress_advantages(carry.progress, progress_now)

        def step(c, _):
            grads = jax.grad(self.loss)(c.params, c, advantage)
            upd, opt_state = self.optimizer.update(grads, c.opt_state, c.params)
            return c.replace(params=optax.apply_updates(c.params, upd), opt_state=opt_state), None

        carry = jax.lax.scan(step, carry, None, length=self.cfg.epochs)[0]
        return carry.replace(updates=carry.updates + 1)


def features(context) -> jax.Array:
    """phi(s): the flow policy's state embedding for its action expert [F]."""
    return context.state


def init_adapter(cfg: TTVLAConfig, feature_dim: int, shape: tuple[int, int]) -> dict:
    """D ~ N(0, 1/F) [F, r] (seeded draw), U = 0 [r, H A]: the adapter's mean starts at 0 (and
    so does D's gradient, until U has moved)."""
    down = jax.random.normal(jax.random.PRNGKey(cfg.init_seed), (feature_dim, cfg.rank))
    return {"down": down / math.sqrt(feature_dim),
            "up": jnp.zeros((cfg.rank, shape[0] * shape[1]))}


def _build(cfg: TTVLAConfig, ctx: BuildContext) -> TTVLA:
    cfg.validate()
    policy = ctx.policy
    if policy is None or not hasattr(policy, "make_noise"):
        raise ValueError("adapter ttvla steers a flow policy's initial noise; the "
                         f"{type(policy).__name__} policy has none (policy.policy=flow)")
    shape = (policy.horizon, policy.action_dim)
    return TTVLA(cfg, shape, init_adapter(cfg, policy.feature_dim, shape))


register_adapter(AdapterPlugin(TTVLA, build=_build, config=TTVLAConfig))

"""PLD's residual specialist (Xiao et al., ICLR 2026; METHODS.md 5): a small Gaussian actor on
top of the frozen base policy, trained with SAC + the RLPD ingredients (``algos.sac``).

At each harness decision the base samples a chunk (M = 1, the harness's keys); the residual reads
the state and the chunk's executed part b = chunk[:replan] (flattened, replan x A) and outputs
a_delta in (-1, 1)^(replan x A); the executed part becomes clip(b + xi a_delta). The residual
acts **per decision, on the executed steps**: a decision is the harness's unit of control and of
the transition (s, b, a, r, s'), the chunk's unexecuted tail is never observed, and the Cal-QL
critic of the verifier suite is defined on the same unit. Evaluation uses the residual's mean.

The probe stage (``fit``):

1. **offline data**: ``offline_episodes`` base rollouts; the successful ones fill the offline
   buffer (sparse reward 1 at the decision that succeeds, discount gamma^replan per decision,
   the Monte-Carlo return kept for Cal-QL's floor);
2. **critic pre-training**: ``pretrain_steps`` minibatch steps of the critic alone with Cal-QL's
   conservative term (weight ``calql_alpha``; 0 skips the stage: a cold start), bootstrapping
   through the base (xi = 0); the actor starts from its random initialisation;
3. **warm-up**: ``warmup_episodes`` base-only episodes into the online buffer, with updates;
4. **online RL**: rounds of ``envs_per_round`` vmapped episodes with sampled residuals at the
   scheduled xi (linear from 0 over ``xi_ramp_episodes``, then ``xi``), each followed by
   ``updates_per_episode x envs_per_round`` RLPD updates on symmetric batches.

Collection runs as vmapped environments inside one compiled call per round
(``envs.rollout.unroll``, the harness's decision keys). Success (the residual's mean) is
evaluated by the same collection on the harness's paired initial states, which reproduces the
harness's M = 1 episodes exactly (``tests/test_pld.py``), every ``eval_every`` rounds; the
curve (success vs environment steps) is written to ``curve.json``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from algos.base import AdapterPlugin, BuildContext, fitted_config
from algos.registry import register_adapter
from algos.sac import (
    ResidualActor,
    SACConfig,
    buffer_add,
    buffer_init,
    compose,
    init_sac,
    train_steps,
)
from core.checkpoint import restore_pytree, save_pytree
from core.config import to_dict
from core.io import read_json, write_json
from envs.rollout import decision_keys, episode_keys, num_decisions, unroll
from policies.proposals import propose

OBS_KEYS = ("state", "instruction", "time")
"""what the residual and the critics read (images stay out of the buffers)"""


def _compact_sac() -> SACConfig:
    # RLPD's ingredients at a width the built-in suite trains in minutes on two cores
    # (``steerlab bench sac``): 128-128 MLPs, batch 128; ensemble 10, subset 2, UTD 20 kept.
    return SACConfig(hidden=(128, 128), actor_hidden=(128, 128), batch_size=128)


@dataclass(frozen=True)
class PLDConfig:
    sac: SACConfig = field(default_factory=_compact_sac)
    xi: float = 0.5
    """residual scale (PLD Table 5: 0.5)"""
    xi_ramp_episodes: int = 0
    """xi rises linearly from 0 over this many online episodes after the warm-up (0: constant)"""
    offline_episodes: int = 128
    """base rollouts whose successful ones fill the offline buffer"""
    calql_alpha: float = 5.0
    """Cal-QL weight of the critic's pre-training on the offline buffer (0: no pre-training)"""
    pretrain_steps: int = 1000
    """critic steps of the pre-training (one minibatch each)"""
    warmup_episodes: int = 96
    """base-only episodes into the online buffer before the residual acts (PLD: 100)"""
    online_episodes: int = 960
    envs_per_round: int = 32
    updates_per_episode: int = 8
    """RLPD updates per collected episode (about one per decision of a successful episode)"""
    buffer_capacity: int = 65536
    eval_episodes: int = 128
    eval_every: int = 5
    """rounds between evaluations (and one before the first and after the last)"""

    def validate(self) -> None:
        w = "adapter.pld"
        self.sac.validate(f"{w}.sac")
        for f in ("offline_episodes", "envs_per_round", "buffer_capacity", "eval_episodes",
                  "eval_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{w}.{f} must be a positive int, got {v!r}")
        for f in ("xi_ramp_episodes", "pretrain_steps", "warmup_episodes", "online_episodes",
                  "updates_per_episode"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{w}.{f} must be an int >= 0, got {v!r}")
        if not 0.0 <= self.xi <= 2.0:
            raise ValueError(f"{w}.xi must be in [0, 2], got {self.xi}")
        if not self.calql_alpha >= 0:
            raise ValueError(f"{w}.calql_alpha must be >= 0, got {self.calql_alpha}")


def xi_at(cfg: PLDConfig, online_episodes_done: int) -> float:
    """The scheduled residual scale after ``online_episodes_done`` residual episodes."""
    if cfg.xi_ramp_episodes == 0:
        return cfg.xi
    return cfg.xi * min(1.0, online_episodes_done / cfg.xi_ramp_episodes)


# ---------------------------------------------------------------------------------------------
# the adapter


@struct.dataclass
class PLDState:
    actor: Any  # the residual actor's parameters
    xi: jax.Array  # f32 ()


@dataclass(frozen=True, eq=False)  # hashed by identity: its state holds arrays
class ResidualAdapter:
    """Executes the chosen chunk with its first ``replan`` steps corrected by the residual's
    mean (deterministic, as PLD evaluates)."""

    name = "pld"
    actor: ResidualActor
    replan: int
    state: PLDState

    def act(self, astate: PLDState, obs, context, candidates, index, key) -> jax.Array:
        chunk = candidates.actions[index]
        return apply_residual(self.actor, astate.actor, obs, chunk, self.replan, astate.xi, key,
                              0.0)[0]


def apply_residual(actor: ResidualActor, params, obs: dict, chunk: jax.Array, replan: int, xi,
                   key: jax.Array, noise):
    """-> (chunk with its first ``replan`` steps clip(b + xi a_delta) [H, A], b flat, executed
    flat). a_delta = tanh(mean + noise std eps): noise 0 is the mean, 1 a SAC sample."""
    h, a_dim = chunk.shape[0], chunk.shape[1]
    base = chunk[:replan].reshape(-1)
    mean, log_std = actor.apply({"params": params}, {k: obs[k] for k in OBS_KEYS if k in obs},
                                base)
    delta = jnp.tanh(mean + noise * jnp.exp(log_std) * jax.random.normal(key, mean.shape))
    executed = compose(base, delta, xi)
    return chunk.at[:replan].set(executed.reshape(min(replan, h), a_dim)), base, executed


# ---------------------------------------------------------------------------------------------
# collection: vmapped episodes in one compiled call


@partial(jax.jit, static_argnames=("env", "policy", "actor", "replan", "decisions", "gamma"))
def collect(env, policy, actor, replan: int, decisions: int, gamma: float, pparams, aparams,
            xi, noise, keys):
    """Episodes from ``keys`` [E] with the residual at scale ``xi`` (0: the base alone) ->
    (transitions [E x D, ...] in ``algos.sac``'s layout, valid [E x D], per-episode
    {success, steps, progress} [E]). Decision keys are the harness's, so noise 0 reproduces
    its M = 1 episodes with this adapter (xi = 0: with none)."""

    def decide(state, obs, k_episode, k):
        k_sample, _, k_select = decision_keys(k)
        context = policy.encode(pparams, obs)
        cands = propose(policy, pparams, context, k_sample, 1, "policy", 4, False)
        chunk, base, executed = apply_residual(actor, aparams, obs, cands.actions[0], replan,
                                               xi, jax.random.fold_in(k_select, 1), noise)
        return chunk, {"obs": {k: obs[k] for k in OBS_KEYS if k in obs}, "base": base,
                       "action": executed}

    def episode(key):
        state, success, progress, recs = unroll(env, key, decide, decisions, replan)
        return recs, {"success": success, "steps": state.t, "progress": progress}

    recs, stats = jax.vmap(episode)(keys)
    return (*to_transitions(recs, stats["success"], gamma ** replan), stats)


def to_transitions(recs: dict, success: jax.Array, discount: float):
    """Per-decision records [E, D, ...] (obs, base, action, alive) and episode success [E] ->
    (transitions flattened to [E x D, ...], valid [E x D]). The reward is 1 at the last live
    decision of a successful episode; that decision is terminal (the clock is in the state, so
    the time limit is part of the MDP); next_* is the following decision's."""
    alive = recs["alive"]
    n_dec = alive.shape[1]
    last = jnp.sum(alive, 1) - 1  # [E]
    d = jnp.arange(n_dec)[None]
    is_last = d == last[:, None]
    nxt = lambda x: jnp.concatenate([x[:, 1:], x[:, -1:]], 1)  # noqa: E731
    reward = (is_last & success[:, None]).astype(jnp.float32)
    mc = jnp.where(success[:, None], discount ** (last[:, None] - d).astype(jnp.float32), 0.0)
    tr = {"obs": recs["obs"], "next_obs": jax.tree.map(nxt, recs["obs"]),
          "base": recs["base"], "next_base": nxt(recs["base"]), "action": recs["action"],
          "reward": reward, "discount": jnp.full(alive.shape, discount, jnp.float32),
          "done": is_last.astype(jnp.float32), "mc": mc.astype(jnp.float32)}
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tr)
    return flat, alive.reshape(-1)


# ---------------------------------------------------------------------------------------------
# the probe stage


EVAL_SEED = 1000
"""the harness's default evaluation seed (``EvalConfig.seed``): the curve's episodes are the
paired initial states of every M = 1 evaluation"""


def _fit(cfg: PLDConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    cfg.validate()
    env, policy, replan = ctx.env, ctx.policy, ctx.replan or 1
    decisions = num_decisions(env.spec.max_steps, replan)
    action_dim = min(replan, policy.horizon) * env.spec.action_dim
    vocab = getattr(getattr(policy, "cfg", None), "vocab_size", 0) or 0
    sac_cfg = replace(cfg.sac, vocab_size=cfg.sac.vocab_size or int(vocab))
    _, obs0 = env.reset(jax.random.PRNGKey(0))
    obs0 = {k: obs0[k] for k in OBS_KEYS if k in obs0}
    k_init, k_off, k_pre, k_loop = jax.random.split(key, 4)
    state = init_sac(sac_cfg, obs0, action_dim, k_init)
    actor = ResidualActor(sac_cfg.actor_hidden, action_dim, sac_cfg.vocab_size,
                          sac_cfg.embed_dim, sac_cfg.use_time)
    gamma = sac_cfg.gamma
    run = partial(collect, env, policy, actor, replan, decisions, gamma, params)
    eval_keys = episode_keys(EVAL_SEED, cfg.eval_episodes)

    def evaluate(aparams, xi):  # the residual's mean; collection reproduces the harness's M=1
        return float(jnp.mean(run(aparams, xi, 0.0, eval_keys)[2]["success"]))

    t0 = time.perf_counter()
    curve: list[dict] = []
    env_steps = 0

    def log_eval(phase: str, episodes: int, xi: float) -> None:
        s = evaluate(state.actor.params, xi)
        curve.append({"phase": phase, "episodes": episodes, "env_steps": env_steps,
                      "xi": xi, "success": s, "seconds": time.perf_counter() - t0})
        print(f"pld {phase}: {episodes} episodes, {env_steps} env steps, xi {xi:.2f}: "
              f"success {s:.3f} ({cfg.eval_episodes} episodes; {time.perf_counter() - t0:.0f}s)",
              flush=True)

    # 1. successful base rollouts -> the offline buffer (keys disjoint from the eval's)
    tr, valid, stats = run(state.actor.params, 0.0, 0.0,
                           episode_keys(int(jax.random.randint(k_off, (), 0, 2**30)),
                                        cfg.offline_episodes))
    success = stats["success"]
    keep = valid & jnp.repeat(success, decisions)
    example = jax.tree.map(lambda x: x[0], tr)
    offline = buffer_add(buffer_init(example, max(int(keep.sum()), 1)), tr, keep)
    env_steps += int(stats["steps"].sum())
    print(f"pld offline: {int(success.sum())}/{cfg.offline_episodes} base rollouts "
          f"succeeded, {int(keep.sum())} decisions ({time.perf_counter() - t0:.0f}s)", flush=True)

    # 2. Cal-QL pre-training of the critic, bootstrapping through the base (xi = 0)
    if cfg.calql_alpha > 0 and cfg.pretrain_steps:
        pre = state.replace(config=replace(sac_cfg, cql_alpha=cfg.calql_alpha, utd=1))
        pre, info = train_steps(pre, offline, None, k_pre, cfg.pretrain_steps, 0.0,
                                offline_ratio=1.0, train_actor=False)
        state = pre.replace(config=sac_cfg)
        print(f"pld pretrain: {cfg.pretrain_steps} Cal-QL critic steps, critic loss "
              f"{float(info['critic_loss']):.4f}, q {float(info['q']):.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)

    # 3-4. warm-up (base only) then residual rounds
    online = buffer_init(example, cfg.buffer_capacity)
    warm_rounds = math.ceil(cfg.warmup_episodes / cfg.envs_per_round)
    rl_rounds = math.ceil(cfg.online_episodes / cfg.envs_per_round)
    n_upd = cfg.updates_per_episode * cfg.envs_per_round
    log_eval("start", 0, xi_at(cfg, 0))
    for r in range(warm_rounds + rl_rounds):
        k_loop, k_keys, k_up = jax.random.split(k_loop, 3)
        warm = r < warm_rounds
        done_rl = max(0, r - warm_rounds) * cfg.envs_per_round
        xi_learn = xi_at(cfg, done_rl)
        keys = jax.random.split(k_keys, cfg.envs_per_round)
        tr, valid, stats = run(state.actor.params, 0.0 if warm else xi_learn, 1.0, keys)
        online = buffer_add(online, tr, valid)
        env_steps += int(stats["steps"].sum())
        if n_upd:
            state, info = train_steps(state, offline, online, k_up, n_upd, xi_learn)
        last = r == warm_rounds + rl_rounds - 1
        if not warm and ((r - warm_rounds + 1) % cfg.eval_every == 0 or last):
            log_eval("online", done_rl + cfg.envs_per_round, xi_at(cfg, done_rl + 1))
    final_xi = xi_at(cfg, cfg.online_episodes)
    save_pytree(os.path.join(out, "actor"), state.actor.params)
    write_json(os.path.join(out, "curve.json"),
               {"curve": curve, "action_dim": action_dim, "replan": replan,
                "decisions": decisions, "final_xi": final_xi})
    write_json(os.path.join(out, "config.json"), to_dict(replace(cfg, sac=sac_cfg)))


def _build(cfg: PLDConfig, ctx: BuildContext) -> ResidualAdapter:
    fitted = fitted_config(ctx, PLDConfig, "adapter pld", "steerlab adapt pld")
    info = read_json(os.path.join(ctx.fitted_dir, "curve.json"))
    if info["replan"] != ctx.replan:
        raise ValueError(f"adapter pld: {ctx.fitted_dir} was fitted at eval.replan="
                         f"{info['replan']}, the run asks for {ctx.replan}")
    s = fitted.sac
    actor = ResidualActor(s.actor_hidden, info["action_dim"], s.vocab_size, s.embed_dim,
                          s.use_time)
    _, obs0 = ctx.env.reset(jax.random.PRNGKey(0))
    obs0 = {k: obs0[k] for k in OBS_KEYS if k in obs0}
    shell = actor.init(jax.random.PRNGKey(0), obs0, jnp.zeros(info["action_dim"]))["params"]
    params = restore_pytree(os.path.join(ctx.fitted_dir, "actor"), shell)
    return ResidualAdapter(actor, ctx.replan,
                           PLDState(params, jnp.float32(info["final_xi"])))


register_adapter(AdapterPlugin(ResidualAdapter, build=_build, config=PLDConfig, fit=_fit))

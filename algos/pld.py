"""PLD: Probe, Learn, Distill (Xiao et al., ICLR 2026; METHODS.md 5) on a frozen base policy,
with SAC + the RLPD ingredients (``algos.sac``).

At each harness decision the base samples a chunk (M = 1, the harness's keys); the residual reads
the state and the chunk's executed part b = chunk[:replan] (flattened, replan x A) and outputs
a_delta in (-1, 1)^(replan x A); the executed part becomes clip(b + xi a_delta). The residual
acts **per decision, on the executed steps**: a decision is the harness's unit of control and of
the transition (s, b, a, r, s'), the chunk's unexecuted tail is never observed, and the Cal-QL
critic of the verifier suite is defined on the same unit. Its mean starts at zero (the first
residual episodes are the base's). Evaluation uses the residual's mean.

The stages of ``fit`` (each one's output marks it finished; a rerun resumes after it):

1. **Probe** (the residual specialist; ``actor/``, ``curve.json``):
   ``offline_episodes`` base rollouts, the successful ones filling the offline buffer (sparse
   reward 1 at the decision that succeeds, discount gamma^replan per decision, the Monte-Carlo
   return kept for Cal-QL's floor); ``pretrain_steps`` Cal-QL steps of the critic alone
   (weight ``calql_alpha``; 0 skips them: a cold start), bootstrapping through the base;
   ``warmup_episodes`` base-only episodes; then rounds of ``envs_per_round`` vmapped episodes
   with sampled residuals at the scheduled xi, each followed by
   ``updates_per_episode x envs_per_round`` RLPD updates on symmetric batches. Success (the
   residual's mean) is evaluated by the same collection on the harness's paired initial states,
   which reproduces the harness's M = 1 episodes exactly (``tests/test_pld.py``).
2. **Learn** (``learn/``, a dataset): ``learn_episodes`` hybrid episodes in which the base acts
   alone for T_base ~ Uniform{0..floor(probe_alpha T)} steps, then the specialist; the
   successful ones are written in ``envs.dataset``'s layout with the base's steps marked
   ``probe``.
3. **Distill** (``distill/``, a policy run; ``distill.json``): SFT of the base from its own
   weights on the Learn data, then the distilled base's M = 1 success against the base's on the
   same paired initial states (Wilson intervals, McNemar).

Collection runs as vmapped environments inside one compiled call (``envs.rollout.unroll``, the
harness's decision keys).
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
import numpy as np
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
    residual_actor,
    train_steps,
)
from core.checkpoint import restore_pytree, save_pytree
from core.config import to_dict
from core.io import read_json, write_json
from envs.dataset import OBS_KEYS as DATASET_OBS
from envs.dataset import save_dataset
from envs.experts import ALL_MODES, MODES, wrong_block
from envs.rollout import decision_keys, episode_keys, num_decisions, unroll
from policies.proposals import propose

OBS_KEYS = ("state", "instruction", "time")
"""what the residual and the critics read (images stay out of the buffers)"""


def residual_obs(obs: dict) -> dict:
    return {k: obs[k] for k in OBS_KEYS if k in obs}


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
    probe_alpha: float = 0.6
    """Learn stage: the base probes for T_base ~ Uniform{0..floor(alpha T)} steps before the
    specialist takes over (PLD's sweep: 0.6 best; 0 = the specialist alone)"""
    learn_episodes: int = 512
    """hybrid episodes collected by the Learn stage (0: probe only, no Learn or Distill)"""
    learn_noise: float = 0.0
    """the specialist's noise during Learn (0: its mean; 1: SAC samples)"""
    distill_steps: int = 2000
    """SFT updates of the base on the Learn data (0: no distillation)"""
    distill_lr: float = 3e-4
    distill_with_demos: bool = False
    """mix the base's original demonstrations into the distillation data"""

    def validate(self) -> None:
        w = "adapter.pld"
        self.sac.validate(f"{w}.sac")
        for f in ("offline_episodes", "envs_per_round", "buffer_capacity", "eval_episodes",
                  "eval_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{w}.{f} must be a positive int, got {v!r}")
        for f in ("xi_ramp_episodes", "pretrain_steps", "warmup_episodes", "online_episodes",
                  "updates_per_episode", "learn_episodes", "distill_steps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{w}.{f} must be an int >= 0, got {v!r}")
        if not 0.0 <= self.xi <= 2.0:
            raise ValueError(f"{w}.xi must be in [0, 2], got {self.xi}")
        if not 0.0 <= self.probe_alpha <= 1.0:
            raise ValueError(f"{w}.probe_alpha must be in [0, 1], got {self.probe_alpha}")
        if not self.learn_noise >= 0:
            raise ValueError(f"{w}.learn_noise must be >= 0, got {self.learn_noise}")
        if not self.distill_lr > 0:
            raise ValueError(f"{w}.distill_lr must be > 0, got {self.distill_lr}")
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
    mean, log_std = actor.apply({"params": params}, residual_obs(obs), base)
    delta = jnp.tanh(mean + noise * jnp.exp(log_std) * jax.random.normal(key, mean.shape))
    executed = compose(base, delta, xi)
    return chunk.at[:replan].set(executed.reshape(min(replan, h), a_dim)), base, executed


# ---------------------------------------------------------------------------------------------
# collection: vmapped episodes in one compiled call


@partial(jax.jit, static_argnames=("env", "policy", "actor", "replan", "decisions", "gamma",
                                   "record_steps"))
def collect(env, policy, actor, replan: int, decisions: int, gamma: float, pparams, aparams,
            xi, noise, keys, takeover=None, record_steps: bool = False):
    """Episodes from ``keys`` [E] with the residual at scale ``xi`` (0: the base alone) ->
    (transitions [E x D, ...] in ``algos.sac``'s layout, valid [E x D], per-episode
    {success, steps, progress} [E]). Decision keys are the harness's, so noise 0 reproduces
    its M = 1 episodes with this adapter (xi = 0: with none).

    ``takeover`` [E] (None: 0): the base acts alone at every decision that starts before that
    step (a probe), the residual from there on; probe decisions are not valid transitions (PLD
    does not replay them). ``record_steps``: the stats also hold every executed step
    (``steps_record``) for the dataset the Learn stage writes."""
    takeover = jnp.zeros(keys.shape[0], jnp.int32) if takeover is None else takeover
    probe = (lambda s: {"obs": _dataset_obs(env.observe(s)), "done": s.done,
                        "success": s.success, "progress": s.progress,
                        "wrong_block": wrong_block(env, s)}) if record_steps else None

    def episode(key, start):
        def decide(state, obs, k_episode, k):
            k_sample, _, k_select = decision_keys(k)
            context = policy.encode(pparams, obs)
            cands = propose(policy, pparams, context, k_sample, 1, "policy", 4, False)
            probing = state.t < start
            chunk, base, executed = apply_residual(
                actor, aparams, obs, cands.actions[0], replan, jnp.where(probing, 0.0, xi),
                jax.random.fold_in(k_select, 1), noise)
            rec = {"obs": residual_obs(obs), "base": base,
                   "action": executed, "probing": probing}
            if record_steps:
                rec["step_obs"] = _dataset_obs(obs)
            return chunk, rec

        state, success, progress, recs = unroll(env, key, decide, decisions, replan, probe)
        return recs, {"success": success, "steps": state.t, "progress": progress}

    recs, stats = jax.vmap(episode)(keys, takeover)
    tr, valid = to_transitions(recs, stats["success"], gamma ** replan)
    if record_steps:
        stats["steps_record"] = recs
    return tr, valid & ~recs["probing"].reshape(-1), stats


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

DATASET_OBS_KEYS = tuple(k for k in DATASET_OBS if k != "image")
"""observation fields the Learn stage's dataset stores (the base's SFT inputs and the clock)"""


def _dataset_obs(obs: dict) -> dict:
    return {k: obs[k] for k in DATASET_OBS_KEYS if k in obs}


def probe_lengths(key: jax.Array, episodes: int, alpha: float, max_steps: int) -> jax.Array:
    """PLD's Learn stage: how long the base acts alone in each episode,
    T_base ~ Uniform{0, ..., floor(alpha T)} [E] i32. The residual takes over at the first
    decision that starts at or after T_base (``collect``'s ``takeover``)."""
    return jax.random.randint(key, (episodes,), 0, math.floor(alpha * max_steps) + 1)


def hybrid_steps(recs: dict, success, action_dim: int, n_modes: int) -> tuple[dict, dict]:
    """``collect(record_steps=True)``'s per-decision records [E, D, ...] and episode success
    [E] -> (steps, episodes) of the successful episodes in ``envs.dataset``'s layout, every
    executed step one row, with ``probe`` marking the steps the base took alone. The expert
    ``mode`` is -1 (none: the policy acted) and ``mode_label`` zeros."""
    r = jax.tree.map(np.asarray, recs)
    after = r["probe"]  # the state after each executed step [E, D, R]
    n_ep, n_dec, n_rep = after["done"].shape
    # observations before each step: the decision's, then the one after the previous step
    before = jax.tree.map(lambda first, nxt: np.concatenate([first[:, :, None], nxt[:, :, :-1]],
                                                            2), r["step_obs"], after["obs"])
    live = ~np.concatenate([~r["alive"][:, :, None], after["done"][:, :, :-1]], 2)
    ok = np.asarray(success, bool)
    keep = (live & ok[:, None, None]).reshape(n_ep, -1)
    flat = lambda x: x.reshape(n_ep, n_dec * n_rep, *x.shape[3:])[keep]  # noqa: E731
    grid = lambda x: np.broadcast_to(x, live.shape)  # noqa: E731
    episode = np.cumsum(ok) - 1
    steps = {k: flat(v) for k, v in before.items()}
    steps.update(
        action=flat(r["action"].reshape(n_ep, n_dec, n_rep, action_dim)),
        reward=flat(after["success"] & live), done=flat(after["done"] & live),
        success=flat(after["success"]), progress=flat(after["progress"]),
        episode=flat(grid(episode[:, None, None])),
        t=flat(grid(np.arange(n_dec)[:, None] * n_rep + np.arange(n_rep))),
        decision=flat(grid(np.arange(n_rep) == 0)),
        probe=flat(grid(r["probing"][:, :, None])))
    n = len(steps["action"])
    steps["mode"] = np.full(n, -1, np.int32)
    steps["mode_label"] = np.zeros((n, n_modes), np.float32)
    episodes = {"mode": np.full(int(ok.sum()), -1, np.int32),
                "length": keep.sum(1)[ok].astype(np.int32),
                "success": np.ones(int(ok.sum()), bool),
                "wrong_block": (after["wrong_block"] & live).any((1, 2))[ok]}
    return steps, episodes


@dataclass(frozen=True)
class _Setup:
    """What every stage of one fit shares."""

    env: Any
    policy: Any
    actor: ResidualActor
    replan: int
    decisions: int
    action_dim: int
    sac: SACConfig

    def run(self, pparams, aparams, xi, noise, keys, takeover=None, record_steps=False):
        return collect(self.env, self.policy, self.actor, self.replan, self.decisions,
                       self.sac.gamma, pparams, aparams, xi, noise, keys, takeover,
                       record_steps)

    def success(self, pparams, aparams, xi, keys) -> np.ndarray:
        """Per-episode success [E] of the residual's mean (xi 0: the policy alone)."""
        return np.asarray(self.run(pparams, aparams, xi, 0.0, keys)[2]["success"])


def _setup(cfg: PLDConfig, ctx: BuildContext) -> _Setup:
    env, policy, replan = ctx.env, ctx.policy, ctx.replan or 1
    vocab = getattr(getattr(policy, "cfg", None), "vocab_size", 0) or 0
    sac = replace(cfg.sac, vocab_size=cfg.sac.vocab_size or int(vocab))
    action_dim = min(replan, policy.horizon) * env.spec.action_dim
    actor = residual_actor(sac, action_dim)
    return _Setup(env, policy, actor, replan, num_decisions(env.spec.max_steps, replan),
                  action_dim, sac)


def _probe(cfg: PLDConfig, su: _Setup, params: Any, key: jax.Array, out: str) -> None:
    """Stage 1: the residual specialist -> ``out``/actor and ``out``/curve.json."""
    env, sac_cfg, decisions = su.env, su.sac, su.decisions
    obs0 = _critic_obs(env)
    k_init, k_off, k_pre, k_loop = jax.random.split(key, 4)
    state = init_sac(sac_cfg, obs0, su.action_dim, k_init)
    run = partial(su.run, params)
    eval_keys = episode_keys(EVAL_SEED, cfg.eval_episodes)
    t0 = time.perf_counter()
    curve: list[dict] = []
    env_steps = 0

    def log_eval(phase: str, episodes: int, xi: float) -> None:
        tr, valid, stats = run(state.actor.params, xi, 0.0, eval_keys)
        s = float(stats["success"].mean())
        # how far the residual's mean moves the executed actions (its authority is xi)
        shift = float(jnp.abs(tr["action"] - tr["base"]).mean(-1)[valid].mean())
        curve.append({"phase": phase, "episodes": episodes, "env_steps": env_steps,
                      "xi": xi, "success": s, "action_shift": shift,
                      "seconds": time.perf_counter() - t0})
        print(f"pld {phase}: {episodes} episodes, {env_steps} env steps, xi {xi:.2f}: "
              f"success {s:.3f}, mean |executed - base| {shift:.3f} ({cfg.eval_episodes} "
              f"episodes; {time.perf_counter() - t0:.0f}s)", flush=True)

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
    ratio = None
    if not int(success.sum()) and sac_cfg.offline_ratio > 0:
        ratio = 0.0  # nothing to replay offline: online sampling only
        print("pld offline: no base rollout succeeded; the offline buffer is empty, so updates "
              "sample the online buffer only (offline_ratio 0)", flush=True)

    # 2. Cal-QL pre-training of the critic, bootstrapping through the base (xi = 0)
    if cfg.calql_alpha > 0 and cfg.pretrain_steps and ratio is None:
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
            state, info = train_steps(state, offline, online, k_up, n_upd, xi_learn, ratio)
            print(f"pld round {r + 1}/{warm_rounds + rl_rounds} ({'warm-up' if warm else 'rl'}):"
                  f" collected success {float(stats['success'].mean()):.3f}, q "
                  f"{float(info['q']):.3f}, critic loss {float(info['critic_loss']):.4f}, "
                  f"temperature {float(info['temperature']):.4f}, entropy "
                  f"{float(info['entropy']):.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        last = r == warm_rounds + rl_rounds - 1
        if not warm and ((r - warm_rounds + 1) % cfg.eval_every == 0 or last):
            log_eval("online", done_rl + cfg.envs_per_round, xi_at(cfg, done_rl + 1))
    save_pytree(os.path.join(out, "actor"), state.actor.params)
    write_json(os.path.join(out, "curve.json"),  # written last: it marks the stage finished
               {"curve": curve, "action_dim": su.action_dim, "replan": su.replan,
                "decisions": decisions, "final_xi": xi_at(cfg, cfg.online_episodes),
                "env_steps": env_steps, "seconds": time.perf_counter() - t0})


def _learn(cfg: PLDConfig, su: _Setup, params: Any, aparams: Any, xi: float, key: jax.Array,
           path: str) -> dict:
    """Stage 2: hybrid episodes (the base probes for T_base steps, then the specialist's mean
    acts; ``learn_noise`` > 0 samples it); the successful ones -> a dataset at ``path``."""
    t0 = time.perf_counter()
    k_len, k_eps = jax.random.split(key)
    n, max_steps = cfg.learn_episodes, su.env.spec.max_steps
    starts = probe_lengths(k_len, n, cfg.probe_alpha, max_steps)
    keys = episode_keys(int(jax.random.randint(k_eps, (), 0, 2**30)), n)
    _, _, stats = su.run(params, aparams, xi, cfg.learn_noise, keys, starts, True)
    success = np.asarray(stats["success"])
    steps, episodes = hybrid_steps(stats["steps_record"], success, su.env.spec.action_dim,
                                   len(MODES.get(getattr(su.env, "task", ""), ())) or 1)
    collected = {"episodes": n, "successes": int(success.sum()),
                 "env_steps": int(np.asarray(stats["steps"]).sum())}
    manifest = {
        "task": su.env.task, "variant": getattr(su.env, "variant", "nominal"),
        "source": "pld learn stage (hybrid: base probe, then the residual specialist)",
        "mix": {}, "segment": su.replan, "max_steps": int(max_steps), "image": False,
        "modes": list(ALL_MODES), "probe_alpha": cfg.probe_alpha, "xi": xi,
        "counts": {"episodes": int(success.sum()), "steps": len(steps["action"]),
                   "successes": int(success.sum())},
        "collected": collected, "success_rate": 1.0,
        "wrong_block_rate": float(np.mean(episodes["wrong_block"])) if success.any() else 0.0,
        "probe_step_share": float(np.mean(steps["probe"])) if success.any() else 0.0,
    }
    save_dataset(path, steps, episodes, manifest)
    print(f"pld learn: {collected['successes']}/{n} hybrid episodes succeeded (probe "
          f"T_base ~ U{{0..{math.floor(cfg.probe_alpha * max_steps)}}} steps), "
          f"{len(steps['action'])} steps kept, {manifest['probe_step_share']:.2f} of them "
          f"probe steps ({time.perf_counter() - t0:.0f}s)", flush=True)
    return manifest


def _distill(cfg: PLDConfig, su: _Setup, params: Any, demos: Any, learn_path: str,
             run_dir: str, key: jax.Array) -> dict:
    """Stage 3: SFT of the base on the Learn stage's data (with the original demonstrations
    when ``distill_with_demos``), starting from the base's weights; then the distilled base's
    own M = 1 success against the base's on the same paired initial states."""
    from algos.sft import TrainConfig, train_policy
    from algos.sft_data import chunk_data
    from core.stats import mcnemar, wilson_interval
    from envs.dataset import load_demos
    from policies.registry import load_policy, policy_name

    name = policy_name(su.policy)
    # the Learn data is the run's dataset of record (what fit-verifier uses by default)
    tcfg = TrainConfig(policy=name, **{name: su.policy.cfg}, tasks=(su.env.task,),
                       datasets=(os.path.abspath(learn_path),), steps=cfg.distill_steps,
                       lr=cfg.distill_lr, eval_episodes=0,
                       seed=int(jax.random.randint(key, (), 0, 2**30)))
    sets, names = [load_demos(learn_path)], [learn_path]
    if cfg.distill_with_demos:
        sets, names = [*sets, demos], [*names, "the base's demonstrations"]
    train_policy(tcfg, run_dir, data=chunk_data(tcfg, sets, names), env=su.env,
                 init_params=params, progress=False)
    _, distilled = load_policy(run_dir)
    keys = episode_keys(EVAL_SEED, cfg.eval_episodes)
    none = _actor_shell(su.actor, su.env)  # at xi 0 any residual acts as none
    base_s, dist_s = su.success(params, none, 0.0, keys), su.success(distilled, none, 0.0, keys)

    def rate(s: np.ndarray) -> dict:
        return {"success": float(s.mean()), "interval": wilson_interval(float(s.sum()), len(s))}

    result = {"episodes": cfg.eval_episodes, "eval_seed": EVAL_SEED, "base": rate(base_s),
              "distilled": rate(dist_s), "mcnemar": mcnemar(dist_s, base_s),
              "run_dir": os.path.abspath(run_dir)}
    print(f"pld distill: M=1 success {result['base']['success']:.3f} (base) -> "
          f"{result['distilled']['success']:.3f} (distilled), McNemar p "
          f"{result['mcnemar']['p_value']:.3g} on {cfg.eval_episodes} paired episodes",
          flush=True)
    return result


def _critic_obs(env) -> dict:
    """One observation of ``env`` as the residual and the critics read it (for shapes)."""
    return residual_obs(env.reset(jax.random.PRNGKey(0))[1])


def _actor_shell(actor: ResidualActor, env) -> Any:
    """A fresh residual's parameters: the structure a saved actor is restored into."""
    return actor.init(jax.random.PRNGKey(0), _critic_obs(env),
                      jnp.zeros(actor.action_dim))["params"]


def _fit(cfg: PLDConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    """Probe -> Learn -> Distill into ``out``; each stage's output marks it finished, so a rerun
    resumes after the last finished one (the distillation resumes from its checkpoints)."""
    cfg.validate()
    su = _setup(cfg, ctx)
    spec = to_dict(replace(cfg, sac=su.sac))
    pending = os.path.join(out, "fit_config.json")
    if os.path.isfile(pending) and read_json(pending) != spec:
        raise ValueError(f"adapter pld: {out} holds a fit with another config "
                         f"({pending}); use a new --out")
    write_json(pending, spec)
    k_probe, k_learn, k_distill = jax.random.split(key, 3)
    if not os.path.isfile(os.path.join(out, "curve.json")):
        _probe(cfg, su, params, k_probe, out)
    info = read_json(os.path.join(out, "curve.json"))
    aparams = restore_pytree(os.path.join(out, "actor"), _actor_shell(su.actor, su.env))
    learn_path = os.path.join(out, "learn")
    if cfg.learn_episodes and not os.path.isfile(os.path.join(learn_path, "manifest.json")):
        _learn(cfg, su, params, aparams, info["final_xi"], k_learn, learn_path)
    if cfg.learn_episodes and cfg.distill_steps and \
            not os.path.isfile(os.path.join(out, "distill.json")):
        if read_json(os.path.join(learn_path, "manifest.json"))["counts"]["episodes"]:
            result = _distill(cfg, su, params, demos, learn_path, os.path.join(out, "distill"),
                              k_distill)
        else:
            result = {"skipped": "the Learn stage kept no successful episode"}
            print(f"pld distill: skipped, {result['skipped']}", flush=True)
        write_json(os.path.join(out, "distill.json"), result)
    write_json(os.path.join(out, "config.json"), spec)  # marks the whole fit finished


def _build(cfg: PLDConfig, ctx: BuildContext) -> ResidualAdapter:
    fitted = fitted_config(ctx, PLDConfig, "adapter pld", "steerlab adapt pld")
    info = read_json(os.path.join(ctx.fitted_dir, "curve.json"))
    if info["replan"] != ctx.replan:
        raise ValueError(f"adapter pld: {ctx.fitted_dir} was fitted at eval.replan="
                         f"{info['replan']}, the run asks for {ctx.replan}")
    actor = residual_actor(fitted.sac, info["action_dim"])
    params = restore_pytree(os.path.join(ctx.fitted_dir, "actor"), _actor_shell(actor, ctx.env))
    return ResidualAdapter(actor, ctx.replan,
                           PLDState(params, jnp.float32(info["final_xi"])))


register_adapter(AdapterPlugin(ResidualAdapter, build=_build, config=PLDConfig, fit=_fit))

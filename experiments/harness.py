"""The rollout harness: encode → sample M candidates → score → select → execute h of H steps.

On the built-in suite the whole evaluation is one compiled call: ``vmap`` over episodes and
``lax.scan`` over decisions (and over the h executed steps inside a decision). Latency is split
into encode / sample / score / env on a separate uncompiled-loop pass over one environment,
because phases fused inside one XLA program cannot be timed apart. Gymnasium environments run
through the same ``decide`` in ``experiments.host_loop`` (B at a time, or one: ``evaluate_gym``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from algos.base import ExecuteChosen, learns
from envs.rollout import (
    decision_keys,
    episode_keys,
    execute_chunk,
    num_decisions,
    unroll,
)
from policies.proposals import PROPOSALS, propose
from verifiers.registry import SELECT_MODES, select

PRIVILEGED = ("env_state", "expert_chunk")


@dataclass(frozen=True)
class EvalConfig:
    M: int = 1
    """candidate chunks sampled per decision"""
    episodes: int = 50
    """evaluation episodes; episode i starts from the indexed seed (seed, i)"""
    replan: int = 4
    """steps of each selected chunk executed before the next decision (h <= H)"""
    selection: str = "argmax"
    """argmax, or softmax over scores / temperature (as V-GPS samples)"""
    temperature: float = 1.0
    """softmax temperature"""
    seed: int = 1000
    """evaluation seed, independent of the training seed"""
    max_steps: int = 0
    """episode time limit; 0 takes the task's default"""
    annotate_oracle: bool = True
    """also score every candidate with the simulator oracle to record the chosen-vs-best gap
    (on a suite with pure-JAX envs; a host-stepped simulator has no copyable state)"""
    classify_modes: bool = True
    """classify each executed chunk by its nearest scripted-expert mode, and (M > 2) record the
    Spearman rho between the verifier's scores and the candidates' L2 distance to the pi* chunk"""
    timing_decisions: int = 20
    """decisions timed phase by phase on one environment (0 skips the timing pass)"""
    proposal: str = "policy"
    """where the M candidates come from: policy (M policy samples) or gaussian (M draws from
    a Gaussian fitted to proposal_samples policy samples; ``policies.proposals``)"""
    proposal_samples: int = 4
    """N̂, the policy samples the gaussian proposal fits"""
    host_envs: int = 8
    """a host-stepped suite (a simulator, ``envs.host``): environments stepped together, each
    decision one vmapped call for all of them"""
    host_workers: int = 0
    """a host-stepped suite: worker processes the environments are spread over (0: in this
    process)"""

    def validate(self, horizon: int | None = None) -> None:
        if self.M < 1:
            raise ValueError(f"eval.M must be >= 1, got {self.M}")
        if self.episodes < 1:
            raise ValueError(f"eval.episodes must be >= 1, got {self.episodes}")
        if self.replan < 1:
            raise ValueError(f"eval.replan must be >= 1, got {self.replan}")
        if self.host_envs < 1:
            raise ValueError(f"eval.host_envs must be >= 1, got {self.host_envs}")
        if not 0 <= self.host_workers <= self.host_envs:
            raise ValueError(f"eval.host_workers must be in [0, eval.host_envs="
                             f"{self.host_envs}], got {self.host_workers}")
        if horizon is not None and self.replan > horizon:
            raise ValueError(
                f"eval.replan must be <= the policy's chunk length H={horizon}, got {self.replan}"
            )
        if self.selection not in SELECT_MODES:
            raise ValueError(f"eval.selection must be one of {SELECT_MODES}, got "
                             f"{self.selection!r}")
        if self.selection == "softmax" and not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")
        if self.max_steps < 0:
            raise ValueError(f"eval.max_steps must be >= 0, got {self.max_steps}")
        if self.timing_decisions < 0:
            raise ValueError(f"eval.timing_decisions must be >= 0, got {self.timing_decisions}")
        if self.proposal not in PROPOSALS:
            raise ValueError(f"eval.proposal must be one of {PROPOSALS}, got {self.proposal!r}")
        n = self.proposal_samples
        if self.proposal == "gaussian" and (isinstance(n, bool) or not isinstance(n, int)
                                            or n < 2):
            raise ValueError(f"eval.proposal_samples must be an int >= 2 (the Gaussian's spread "
                             f"comes from them), got {n!r}")


@dataclass(frozen=True)
class Setup:
    """Everything one evaluation closes over (static: hashable objects, not arrays)."""

    env: Any  # functional env (envs.base.FunctionalEnv)
    policy: Any  # policies.base.BasePolicy
    verifier: Any  # verifiers.base.Verifier
    cfg: EvalConfig
    oracle: Any = None  # an oracle_sim verifier for annotation, or None
    expert: Any = None  # envs.experts module when modes are classified / expert chunks needed
    adapter: Any = ExecuteChosen()  # algos.base.Adapter: what acts on the chosen candidate

    @property
    def max_steps(self) -> int:
        return self.cfg.max_steps or self.env.spec.max_steps

    @property
    def num_decisions(self) -> int:
        return num_decisions(self.max_steps, self.cfg.replan)


def verifier_obs(setup: Setup, obs: dict, env_state: Any, k_expert: jax.Array) -> dict:
    """The observation a verifier sees: the env's obs plus what it declared it needs."""
    out = dict(obs)
    needs = set(setup.verifier.requires)
    if "env_state" in needs:
        out["env_state"] = env_state
    if "expert_chunk" in needs:
        out["expert_chunk"] = setup.expert.expert_chunk(
            setup.env, env_state, 0, k_expert, setup.policy.horizon
        )
    return out


def proposal_args(setup: Setup) -> tuple:
    """``propose``'s (proposal, samples, features) for this run: features only for a
    verifier that reads them."""
    c = setup.cfg
    return c.proposal, c.proposal_samples, "features" in setup.verifier.requires


def candidates(setup: Setup, pparams, context, key, steer=None):
    """The decision's M candidates from the run's proposal (``policies.proposals``)."""
    return propose(setup.policy, pparams, context, key, setup.cfg.M, *proposal_args(setup),
                   steer=steer)


def decide(setup: Setup, pparams, vstate, obs, env_state, k_expert, key, astate=None,
           carry=None):
    """One decision for one env, sample → score → act: returns (the chunk to execute [H, A],
    the chosen index, scores [M], candidates). ``astate`` is the adapter's state; a test-time
    learner's ``carry`` (``algos.base``) steers the sampling, records the choice and is
    returned as a fifth value."""
    k_sample, k_score, k_select = decision_keys(key)
    context = setup.policy.encode(pparams, obs)
    steer = None
    if carry is not None:
        carry, steer = setup.adapter.before(carry, obs, context, env_state.progress,
                                            ~env_state.done)
    cands = candidates(setup, pparams, context, k_sample, steer)
    scores = setup.verifier.score(vstate, verifier_obs(setup, obs, env_state, k_expert), cands,
                                  k_score)
    index = select(scores, k_select, setup.cfg.selection, setup.cfg.temperature)
    # The act key is folded from the selection key, so adding the hook changed no other key.
    chunk = setup.adapter.act(astate, obs, context, cands, index, jax.random.fold_in(k_select, 1))
    if carry is None:
        return chunk, index, scores, cands
    return chunk, index, scores, cands, setup.adapter.after(carry, context, cands, index)


def rank_correlation(x: jax.Array, y: jax.Array) -> jax.Array:
    """Spearman's rho of two [M] vectors (ordinal ranks), jittable; 0 when either is constant."""

    def ranks(v):
        r = jnp.argsort(jnp.argsort(v)).astype(jnp.float32)
        return jnp.where(jnp.ptp(v) > 0, r - r.mean(), 0.0)

    rx, ry = ranks(x), ranks(y)
    return jnp.sum(rx * ry) / jnp.maximum(jnp.sqrt(jnp.sum(rx**2) * jnp.sum(ry**2)), 1e-12)


def run_episode(setup: Setup, pparams, vstate, key, astate=None, carry=None):
    """One full episode (``envs.rollout.unroll``) with the harness's probes; per-episode records.
    With a test-time learner's ``carry``: (records, the carry at the episode's end)."""
    env, h = setup.env, setup.cfg.replan
    classify = setup.expert is not None and setup.cfg.classify_modes

    def decision(state, obs, k_expert, k, learner=None):
        out = decide(setup, pparams, vstate, obs, state, k_expert, k, astate, learner)
        chunk, index, scores, cands = out[:4]
        rec = {"score": scores[index], "index": index}
        if classify or learner is not None:
            # the decision's progress bin; for a learner, the within-episode adaptation curve
            rec["progress"] = state.progress
        if setup.oracle is not None:
            oracle = setup.oracle.score(None, {**obs, "env_state": state}, cands, k)
            rec["oracle_gap"] = jnp.max(oracle) - oracle[index]
        if classify:
            # The executed part of the chunk, labelled by the same classifier the dataset uses
            # on its own chunks.
            rec["mode_weights"] = setup.expert.classify_chunk(env, state, chunk[:h])
            if setup.cfg.M > 2:
                # Does the verifier rank candidates by closeness to the pi* chunk? (TACO's
                # count-vs-distance check; < 0 when higher scores go with closer chunks)
                star = setup.expert.expert_chunk(env, state, 0, k_expert, chunk.shape[0])
                dist = jnp.sqrt(jnp.sum((cands.actions - star[None]) ** 2, axis=(1, 2)))
                rec["score_distance_rho"] = rank_correlation(scores, dist)
        return (chunk, rec) if learner is None else (chunk, rec, out[4])

    probe = (lambda s: setup.expert.wrong_block(env, s)) if classify else None
    if carry is not None:
        carry = setup.adapter.start_episode(carry)
    state, success, progress, recs, *final = unroll(env, key, decision, setup.num_decisions, h,
                                                    probe, carry)
    if probe is not None:
        recs["wrong_block"] = jnp.any(recs.pop("probe"), axis=-1)
    records = {
        "success": success,
        "progress": progress,
        "length": state.t,
        # steps whose action had a NaN/inf entry (the env executed its safe value instead)
        "nonfinite_actions": state.nonfinite_actions,
        **{f"decisions/{k}": v for k, v in recs.items()},
    }
    if carry is None:
        return records
    return {**records, **setup.adapter.episode_records(final[0])}, final[0]


def evaluate_compiled(setup: Setup, pparams, vstate, astate=None) -> dict[str, np.ndarray]:
    """All episodes in one compiled call (vmap over episodes); numpy per-episode records.

    A test-time learner starts every episode fresh (``begin``), or, when ``continual``, learns
    along ``streams`` streams of consecutive episodes (a scan over each stream's episodes, the
    carry passed on): stream s runs episodes s, s + S, s + 2S, ..., so episode i keeps its
    initial state and is paired with every other arm's episode i."""
    keys = episode_keys(setup.cfg.seed, setup.cfg.episodes)
    adapter, learner = setup.adapter, learns(setup.adapter)
    if not (learner and adapter.continual):
        def episode(p, v, k, a):
            if not learner:
                return run_episode(setup, p, v, k, a)
            return run_episode(setup, p, v, k, a, adapter.begin(a))[0]

        run = jax.jit(jax.vmap(episode, in_axes=(None, None, 0, None)))
        return jax.tree.map(np.asarray, jax.block_until_ready(run(pparams, vstate, keys, astate)))
    streams = adapter.streams
    if setup.cfg.episodes % streams:
        raise ValueError(f"eval.episodes ({setup.cfg.episodes}) must be a multiple of the "
                         f"continual learner's streams ({streams})")

    def stream(p, v, ks, a):
        def one(carry, k):
            records, carry = run_episode(setup, p, v, k, a, carry)
            return carry, records

        return jax.lax.scan(one, adapter.begin(a), ks)[1]

    # [episodes] -> [length, streams] -> per stream [length]: stream s holds i = s + S j
    by_stream = keys.reshape(-1, streams, *keys.shape[1:]).swapaxes(0, 1)
    state_axis = 0 if getattr(adapter, "stream_states", False) else None  # one per stream
    run = jax.jit(jax.vmap(stream, in_axes=(None, None, 0, state_axis)))
    recs = jax.block_until_ready(run(pparams, vstate, by_stream, astate))
    return jax.tree.map(lambda x: np.asarray(x).swapaxes(0, 1).reshape(-1, *x.shape[2:]), recs)


def _ms(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1e3
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


@functools.lru_cache(maxsize=64)
def _phase_fns(policy, env, M: int, replan: int, proposal: tuple):
    """The verifier-independent jitted phases, shared by every evaluation in this process (a
    grid times each M once per verifier; these compile once per M and proposal)."""
    encode = jax.jit(policy.encode)
    sample = jax.jit(lambda p, c, k: propose(policy, p, c, k, M, *proposal))
    act = jax.jit(lambda s, o, a: execute_chunk(env, s, o, a[:replan]))
    return encode, sample, act, jax.jit(env.reset)


def time_phases(setup: Setup, pparams, vstate, decisions: int, astate=None) -> dict[str, Any]:
    """Per-decision latency split by phase on one environment (batch 1), after compilation.

    Each phase is its own jitted call followed by ``block_until_ready``; ``score`` includes
    the selection and the adapter's ``act``. The first two
    decisions are discarded (they compile for the reset's and then the step's observation,
    whose weak types differ). Episodes restart when they end.
    """
    warmup = 2
    env, policy, verifier, cfg = setup.env, setup.policy, setup.verifier, setup.cfg
    encode, sample, act, reset = _phase_fns(policy, env, cfg.M, cfg.replan, proposal_args(setup))
    vobs = jax.jit(lambda o, s, k: verifier_obs(setup, o, s, k))

    @jax.jit
    def score(v, o, c, k, a, context):
        index = select(verifier.score(v, o, c, k), k, cfg.selection, cfg.temperature)
        return setup.adapter.act(a, o, context, c, index, k)

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, time.perf_counter() - t0

    key = jax.random.PRNGKey(cfg.seed)
    key, k_reset, k_expert = jax.random.split(key, 3)
    state, obs = reset(k_reset)
    phases: dict[str, list[float]] = {"encode": [], "sample": [], "score": [], "env": []}
    for i in range(decisions + warmup):
        key, k_sample, k_score = jax.random.split(key, 3)
        context, t_enc = timed(encode, pparams, obs)
        cands, t_sample = timed(sample, pparams, context, k_sample)
        t0 = time.perf_counter()
        chunk = jax.block_until_ready(score(vstate, vobs(obs, state, k_expert), cands, k_score,
                                            astate, context))
        t_score = time.perf_counter() - t0
        ((state, obs), (_, dones, _, _)), t_env = timed(act, state, obs, chunk)
        if i >= warmup:
            for name, t in zip(phases, (t_enc, t_sample, t_score, t_env)):
                phases[name].append(t)
        if bool(dones[-1]):
            key, k_reset = jax.random.split(key)
            state, obs = reset(k_reset)
    totals = [sum(ts) for ts in zip(*phases.values())]
    policy_s = np.median([a + b for a, b in zip(phases["encode"], phases["sample"])])
    return {
        "latency_ms": {**{k: _ms(v) for k, v in phases.items()}, "total": _ms(totals)},
        "candidates_per_s": float(cfg.M / policy_s),
        "timing_decisions": decisions,
    }


def time_learner(adapter, astate, calls: int = 20) -> dict[str, Any]:
    """A test-time learner's update latency on one environment (its ``update`` jitted alone,
    after compilation): what each ``interval`` decisions add to the decision's phases."""
    update = jax.jit(adapter.update)
    if getattr(adapter, "stream_states", False):  # stacked per stream: time the first
        astate = jax.tree.map(lambda x: x[0], astate)
    carry = adapter.begin(astate)
    carry = jax.block_until_ready(update(carry, jnp.float32(0.0)))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(update(carry, jnp.float32(0.0)))
        times.append(time.perf_counter() - t0)
    return {"learner_update_ms": _ms(times)}


def summarize(records: dict[str, np.ndarray], mode_names: tuple[str, ...] = ()) -> dict:
    """Run-level metrics from per-episode records."""
    from core.stats import wilson_interval

    success = np.asarray(records["success"], bool)
    low, high = wilson_interval(int(success.sum()), len(success))
    metrics = {
        "episodes": int(len(success)),
        "successes": int(success.sum()),
        "success_rate": float(success.mean()),
        "success_ci_low": float(low),
        "success_ci_high": float(high),
        "mean_length": float(np.mean(records["length"])),
        "mean_final_progress": float(np.mean(records["progress"])),
    }
    for count in ("nonfinite_actions", "nonfinite_obs"):  # inputs the env had to sanitize
        if count in records:
            metrics[count] = int(np.sum(records[count]))
    alive = records.get("decisions/alive")
    if alive is not None and "decisions/oracle_gap" in records:
        metrics["oracle_gap"] = float(records["decisions/oracle_gap"][alive].mean())
    if alive is not None and "decisions/mode_weights" in records and mode_names:
        metrics.update(mode_metrics(records, mode_names))
    if "decisions/progress" in records:  # the within-episode curve (frozen after the end)
        metrics["progress_by_decision"] = np.mean(records["decisions/progress"], 0).tolist()
    if "learner/updates" in records:
        metrics["learner_updates_per_episode"] = float(np.mean(records["learner/updates"]))
        metrics["learner_up_norm"] = float(np.mean(records["learner/up_norm"]))
    if "learner/noise_mean_norm" in records:
        metrics["learner_noise_mean_norm"] = float(np.mean(records["learner/noise_mean_norm"]))
    if alive is not None and "decisions/score_distance_rho" in records:
        metrics["score_distance_rho"] = float(records["decisions/score_distance_rho"][alive].mean())
    return metrics


def mode_metrics(records: dict[str, np.ndarray], mode_names: tuple[str, ...]) -> dict:
    """Executed-chunk mode shares (overall and by progress bin at the decision) and the
    wrong-block rate (episodes that ever held a block the instruction does not name)."""
    from envs.mixture import bin_names, mode_shares_by_bin, progress_bins

    alive = records["decisions/alive"]
    weights = records["decisions/mode_weights"][alive]
    shares = weights.mean(0) if len(weights) else np.zeros(len(mode_names))
    by_bin, counts = mode_shares_by_bin(progress_bins(records["decisions/progress"][alive]),
                                        weights)
    wrong = (records["decisions/wrong_block"] & alive).any(1)
    return {
        "mode_fraction": {m: float(c) for m, c in zip(mode_names, shares, strict=True)},
        "pi_star_fraction": float(shares[0]),
        "mode_shares_by_bin": {"modes": list(mode_names), "bins": bin_names(),
                               "decisions": counts.tolist(),
                               "shares": np.where(np.isnan(by_bin), None, by_bin).tolist()},
        "wrong_block_rate": float(wrong.mean()),
    }

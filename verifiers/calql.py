"""V-GPS's verifier: rank candidate chunks by a Cal-QL critic Q(s, chunk) learned offline on the
demonstrations' per-decision transitions (successful and failed modes both, sparse reward).

The critic (``algos.calql``) is separate from the policy: it reads the observation (state,
instruction, and the clock t/T that the base policy does not see) and the flattened chunk, so it
needs neither the policy's weights nor its features. Score = the minimum over the critic
ensemble. Argmax selection is the default; V-GPS samples from softmax(Q / beta) with beta = 1,
which is ``eval.selection=softmax eval.temperature=1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from algos.base import fitted_config
from algos.calql import CalQLConfig, CalQLState, init_calql, q_values, train_calql
from core.checkpoint import restore_pytree, save_pytree
from core.config import to_dict
from core.io import write_json
from policies.base import Candidates, sample_at_states
from verifiers.base import BuildContext, VerifierPlugin
from verifiers.registry import register


@dataclass(frozen=True)
class CriticConfig(CalQLConfig):
    """The learner with the verifier's defaults. V-GPS's released recipe (``CalQLConfig``'s
    defaults: its own actor, importance sampling, reward 0/1, 2000 warm-up steps) diverges on
    the built-in suite's 12.8k decisions within the few thousand updates a CPU affords (the
    actor stays near-uniform in 24 dimensions, its actions' Q sinks and drags the Bellman
    targets down with it). These defaults use the base policy's own candidates for pi (the
    chunks the verifier will rank), Cal-QL's sparse-reward scaling 10 r - 5, and a short
    warm-up; ``learner.policy_samples=actor learner.importance_sampling=true
    learner.reward_scale=1 learner.reward_bias=0 learner.warmup=2000`` is the released one."""

    policy_samples: str = "base"
    importance_sampling: bool = False
    reward_scale: float = 10.0
    reward_bias: float = -5.0
    warmup: int = 200
    steps: int = 5000


@dataclass(frozen=True)
class CalQLVerifierConfig:
    learner: CriticConfig = field(default_factory=CriticConfig)
    """the critic and its training (``algos.calql.CalQLConfig``, with ``CriticConfig``'s
    defaults)"""
    base_samples: int = 8
    """with learner.policy_samples=base: the base policy's candidates drawn once per decision
    state (at s and at s'), from which each update takes learner.n_actions"""

    def __post_init__(self):
        if isinstance(self.base_samples, bool) or not isinstance(self.base_samples, int) \
                or self.base_samples < 1:
            raise ValueError(f"verifier calql: base_samples must be a positive int, got "
                             f"{self.base_samples!r}")


class CalQLVerifier:
    """score = min_i Q_i(s, chunk) for every candidate; higher = better."""

    name = "calql"
    requires: tuple[str, ...] = ()

    def __init__(self, state: CalQLState):
        self.state = state

    def score(self, vstate: CalQLState, obs: dict, candidates: Candidates,
              key: jax.Array) -> jax.Array:
        actions = candidates.actions.reshape(candidates.actions.shape[0], -1)
        if actions.shape[-1] != vstate.action_dim:
            raise ValueError(f"verifier 'calql': candidate chunks have H*A={actions.shape[-1]} "
                             f"but the critic was fitted on {vstate.action_dim}")
        tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (actions.shape[0], *x.shape)), obs)
        return q_values(vstate, tiled, actions).min(0)


def _learner_config(cfg: CalQLVerifierConfig, ctx: BuildContext) -> CalQLConfig:
    # The policy's vocabulary, so a word the data never used still has an embedding.
    vocab = getattr(getattr(ctx.policy, "cfg", None), "vocab_size", 0) or 0
    return replace(cfg.learner, vocab_size=cfg.learner.vocab_size or int(vocab))


def _transitions(cfg: CalQLVerifierConfig, learner: CalQLConfig, ctx: BuildContext,
                 params: Any, demos: Any, key: jax.Array) -> dict:
    """The demonstrations' per-decision transitions, with the base policy's candidates at s and
    s' when the conservative term uses them."""
    tr = demos.transitions(ctx.policy.horizon, ctx.replan or 1, learner.gamma)
    if learner.policy_samples == "base":
        k_s, k_last = jax.random.split(key)
        bank = sample_at_states(ctx.policy, params, tr["obs"], k_s, cfg.base_samples)
        # s' is the next decision's observation except at an episode's last decision
        last = np.r_[tr["episode"][1:] != tr["episode"][:-1], True]
        bank_next = np.concatenate([bank[1:], bank[:1]])
        at_last = jax.tree.map(lambda x: np.asarray(x)[last], tr["next_obs"])
        bank_next[last] = sample_at_states(ctx.policy, params, at_last, k_last,
                                           cfg.base_samples)
        tr["base_chunks"], tr["base_next_chunks"] = bank, bank_next
    return tr


def _fit(cfg: CalQLVerifierConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    learner = _learner_config(cfg, ctx)
    k_bank, key = jax.random.split(key)
    tr = _transitions(cfg, learner, ctx, params, demos, k_bank)
    every = max(1, learner.steps // (10 * learner.updates_per_call))

    def log(row):
        if (row["step"] // learner.updates_per_call) % every == 0 or row["step"] == learner.steps:
            print(f"calql {row['step']}/{learner.steps}: bellman {row['bellman']:.4f} "
                  f"q_data {row['q_data']:.3f} q_policy {row['q_policy']:.3f} mc {row['mc']:.3f} "
                  f"bound_rate {row['bound_rate']:.3f}", flush=True)

    state, history = train_calql(tr, learner, key, log)
    save_pytree(os.path.join(out, "critic"), state.critic.params)
    write_json(os.path.join(out, "fit_info.json"),
               {"decisions": int(len(tr["reward"])), "history": history})
    write_json(os.path.join(out, "config.json"), to_dict(replace(cfg, learner=learner)))
    print(f"calql: critic fitted on {len(tr['reward'])} decisions, {learner.steps} updates")


def _init(cfg: CalQLVerifierConfig, ctx: BuildContext, key: jax.Array) -> CalQLVerifier:
    """An unfitted critic of the fitted one's shapes, from the env spec's example observation."""
    learner = _learner_config(cfg, ctx)
    obs = ctx.env.spec.example_obs()
    chunk = jnp.zeros((1, ctx.policy.horizon * ctx.env.spec.action_dim))
    data = {"obs": jax.tree.map(lambda x: x[None], obs), "action": chunk}
    return CalQLVerifier(init_calql(learner, data, key))


def _build(cfg: CalQLVerifierConfig, ctx: BuildContext) -> CalQLVerifier:
    fitted = fitted_config(ctx, CalQLVerifierConfig, "verifier calql",
                           "steerlab fit-verifier calql")
    shell = _init(fitted, ctx, jax.random.PRNGKey(0))
    params = restore_pytree(os.path.join(ctx.fitted_dir, "critic"), shell.state.critic.params)
    return CalQLVerifier(shell.state.replace(
        critic=shell.state.critic.replace(params=params)))


register(VerifierPlugin(CalQLVerifier, build=_build, config=CalQLVerifierConfig, fit=_fit,
                        init=_init))

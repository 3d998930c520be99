"""Reference verifiers: the floor (random), verifier-free baselines (consensus, likelihood) and
the upper bounds (oracle_action: distance to the expert's chunk; oracle_sim: the true outcome).

All scores are f32 [M], higher is better; ``obs`` is one unbatched observation dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from envs.rollout import execute_chunk
from policies.base import Candidates
from verifiers.base import BuildContext, VerifierPlugin
from verifiers.registry import register


def _flat(actions: jax.Array) -> jax.Array:  # [M, H, A] -> [M, H*A]
    return actions.reshape(actions.shape[0], -1)


def pairwise_l2(x: jax.Array) -> jax.Array:
    """x: [M, D] -> [M, M] Euclidean distances (exact zeros on the diagonal)."""
    sq = jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)
    # sqrt'(0) is infinite; the masked form keeps gradients finite.
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


class RandomVerifier:
    """Uniform scores from the key: selection is a uniformly random candidate."""

    name = "random"
    requires: tuple[str, ...] = ()

    def __init__(self):
        self.state = None

    def score(self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array) -> jax.Array:
        return jax.random.uniform(key, (candidates.actions.shape[0],))  # [M]


class ConsensusVerifier:
    """Medoid: score = -mean L2 distance of a candidate's chunk to the other candidates."""

    name = "consensus"
    requires: tuple[str, ...] = ()

    def __init__(self):
        self.state = None

    def score(self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array) -> jax.Array:
        m = candidates.actions.shape[0]
        d = pairwise_l2(_flat(candidates.actions))  # [M, M]
        return -jnp.sum(d, axis=1) / max(m - 1, 1)


class LikelihoodVerifier:
    """The policy's own log-probability of each candidate (AR token policies)."""

    name = "likelihood"
    requires: tuple[str, ...] = ("log_prob",)

    def __init__(self, policy: Any = None):
        if policy is not None and not getattr(policy, "has_log_prob", False):
            raise ValueError(
                f"verifier 'likelihood': policy {type(policy).__name__} has no log_prob "
                "(has_log_prob=False); use a policy with a likelihood (e.g. the AR policy)"
            )
        self.state = None

    def score(self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array) -> jax.Array:
        if candidates.log_prob is None:
            raise ValueError("verifier 'likelihood': candidates.log_prob is None; the policy "
                             "must provide a per-candidate log-probability")
        return candidates.log_prob.astype(jnp.float32)


class OracleActionVerifier:
    """-L2 distance to the expert's chunk at this state (obs["expert_chunk"], f32 [H, A])."""

    name = "oracle_action"
    requires: tuple[str, ...] = ("expert_chunk",)

    def __init__(self):
        self.state = None

    def score(self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array) -> jax.Array:
        if "expert_chunk" not in obs:
            raise ValueError("verifier 'oracle_action': obs has no 'expert_chunk' entry")
        expert = obs["expert_chunk"]
        if expert.shape != candidates.actions.shape[1:]:
            raise ValueError(f"verifier 'oracle_action': expert_chunk shape {expert.shape} != "
                             f"candidate chunk shape {candidates.actions.shape[1:]}")
        diff = _flat(candidates.actions - expert[None])
        return -jnp.sqrt(jnp.sum(diff**2, axis=-1))


class OracleSimVerifier:
    """Executes each candidate from a copy of the true simulator state and scores the outcome.

    score = progress after the chunk + success_bonus * success, so a succeeding candidate ranks
    above every failing one and failing ones rank by progress. Needs obs["env_state"] and the
    functional env at build time; ``horizon`` is how many steps of each chunk to run (the
    harness's replan interval), ``None`` = the whole chunk. On a host-stepped simulator the
    host loop computes the same scores by saving, stepping and restoring the simulator
    (``HostDriver.rollout_chunks``) and passes them in as obs["oracle_scores"] [M].
    """

    name = "oracle_sim"
    requires: tuple[str, ...] = ("env_state",)
    sim_rollout = True  # a host-stepped simulator may roll the candidates out for it

    def __init__(self, env: Any = None, horizon: int | None = None, success_bonus: float = 1.0):
        if env is None:
            raise ValueError("verifier 'oracle_sim': needs env=<functional env> at build time")
        if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"verifier 'oracle_sim': horizon must be a positive int or None, "
                             f"got {horizon!r}")
        self.env = env
        self.horizon = horizon
        self.success_bonus = float(success_bonus)
        self.state = None

    def score(self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array) -> jax.Array:
        if "oracle_scores" in obs:  # rolled out on the host (``experiments.host_loop``)
            return obs["oracle_scores"]
        if "env_state" not in obs:
            raise ValueError("verifier 'oracle_sim': obs has no 'env_state' entry")
        h_chunk = candidates.actions.shape[1]
        h = h_chunk if self.horizon is None else min(self.horizon, h_chunk)
        def rollout(chunk):  # [H, A] -> (success, progress) after h steps
            _, (_, _, succ, prog) = execute_chunk(self.env, obs["env_state"], None, chunk[:h])
            return succ[-1], prog[-1]  # the env freezes after done: the last step is the outcome

        succ, prog = jax.vmap(rollout)(candidates.actions)  # [M], [M]
        return prog + self.success_bonus * succ.astype(jnp.float32)


@dataclass(frozen=True)
class OracleSimConfig:
    success_bonus: float = 1.0
    """added to the progress of a candidate that succeeds within the executed steps"""


def _stateless(cls):
    return VerifierPlugin(cls, build=lambda cfg, ctx: cls())


register(_stateless(RandomVerifier))
register(_stateless(ConsensusVerifier))
register(VerifierPlugin(LikelihoodVerifier, build=lambda cfg, ctx: LikelihoodVerifier(ctx.policy)))
# oracle_action needs the expert's chunk at every decision: a reference for grids, not a quickstart
# arm (oracle_sim is the quickstart's upper bound).
register(VerifierPlugin(OracleActionVerifier, build=lambda cfg, ctx: OracleActionVerifier(),
                        quickstart=False))


def _build_oracle_sim(cfg: OracleSimConfig, ctx: BuildContext) -> OracleSimVerifier:
    return OracleSimVerifier(ctx.env, horizon=ctx.replan, success_bonus=cfg.success_bonus)


register(VerifierPlugin(OracleSimVerifier, build=_build_oracle_sim, config=OracleSimConfig))

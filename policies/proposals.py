"""Where a decision's M candidates come from (``eval.proposal``):

    policy    M samples of the policy (plain repeated sampling)
    gaussian  RoboMonkey's Gaussian perturbation (METHODS.md 3.4): fit a Gaussian to N̂ policy
              samples over the continuous dims, set the binary grip by majority vote over the
              N̂ samples, and draw the M candidates from the fit: N̂ policy queries, not M

A Gaussian draw is a chunk the policy did not sample, so it has no policy likelihood, and its
feature is the policy's one-step re-noise feature of that chunk (TACO's
add_and_denoise1step_get_feature, ``one_step_features``); ``check_proposal`` refuses the
pairings that cannot work when the run is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from policies.base import Candidates

GRIP = 2  # index of the binary grip dimension in the built-in suite's (dx, dy, grip)
PROPOSALS = ("policy", "gaussian")


def majority_vote(binary: jax.Array) -> jax.Array:
    """Per entry, whether at least half of the N samples are on (> 0): [N, ...] -> bool [...].
    A tie is on. Works for bool, {0, 1} and {-1, +1} samples."""
    return jnp.mean(binary > 0, axis=0) >= 0.5


def gaussian_proposals(samples: jax.Array, key: jax.Array, N: int) -> jax.Array:
    """N chunks from a per-dimension Gaussian fitted to policy samples [N̂, H, A] (a full
    covariance over H·A dims from N̂ ≪ H·A samples is singular); grip by majority vote."""
    mean, std = samples.mean(0), samples.std(0) + 1e-6  # [H, A]
    draws = mean + std * jax.random.normal(key, (N, *samples.shape[1:]))
    grip = jnp.where(majority_vote(samples[..., GRIP]), 1.0, -1.0)  # [H]
    draws = draws.at[..., GRIP].set(jnp.broadcast_to(grip, draws.shape[:-1]))
    return jnp.clip(draws, -1.0, 1.0)


def check_proposal(proposal: str, policy, requires: tuple[str, ...]) -> None:
    """Raises ValueError, naming the field, for a proposal this policy and verifier cannot use
    (the proposal's own fields are checked with the run config, ``EvalConfig.validate``)."""
    if proposal == "policy":
        return
    if policy.action_dim <= GRIP:
        raise ValueError(f"eval.proposal 'gaussian' votes on the grip, action dim {GRIP}; the "
                         f"policy's actions have {policy.action_dim} dims")
    if "log_prob" in requires:
        raise ValueError("eval.proposal 'gaussian' draws chunks the policy did not sample, so "
                         "they have no log-probability, which the verifier requires; use "
                         "eval.proposal=policy")
    if "features" in requires and not hasattr(policy, "one_step_features"):
        raise ValueError(f"eval.proposal 'gaussian' needs the policy's features of a given "
                         f"chunk (one_step_features), which the {type(policy).__name__} policy "
                         "does not offer; use eval.proposal=policy")


def propose(policy, params, context, key: jax.Array, M: int, proposal: str = "policy",
            samples: int = 4, features: bool = True, steer=None) -> Candidates:
    """A decision's M candidates (see the module doc). ``features``: compute the Gaussian
    draws' one-step features (a verifier that reads none skips their M expert passes; they
    are zeros then). The plain proposal is exactly ``policy.sample(params, context, key, M)``.
    ``steer`` is a test-time learner's steering of the policy's own samples (``algos.base``,
    ``policy.sample_steered``: a flow policy's initial-noise mean, the autoregressive policy's
    low-rank head update)."""
    if steer is not None:
        if proposal != "policy":
            raise ValueError("a test-time learner steers the policy's own samples: it needs "
                             f"eval.proposal=policy, got {proposal!r}")
        return policy.sample_steered(params, context, key, M, steer)
    if proposal == "policy":
        return policy.sample(params, context, key, M)
    k_base, k_draw, k_feat = jax.random.split(key, 3)
    base = policy.sample(params, context, k_base, samples)
    actions = gaussian_proposals(base.actions, k_draw, M)
    feats = (policy.one_step_features(params, context, actions, k_feat) if features
             else jnp.zeros((M, policy.feature_dim), actions.dtype))
    return Candidates(actions, feats)

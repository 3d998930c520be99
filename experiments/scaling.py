"""Offline sample-scaling study, as RoboMonkey does it.

On held-out dataset states, draw N candidates by (a) repeated policy sampling or (b) Gaussian
perturbation (fit a per-dimension Gaussian to N̂ policy samples over the continuous dims,
majority vote on the grip, draw the rest from it); select the candidate nearest the dataset's
ground-truth chunk (the ``oracle_action`` choice) and record its error. The best-of-N error
curve e(N) is fitted with a power law a·N^b, with bootstrap intervals over states.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from policies.proposals import gaussian_proposals
from verifiers.preferences import normalised_rmse

PROPOSALS = ("policy", "gaussian")


@dataclass(frozen=True)
class ScalingConfig:
    Ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    """candidate counts; every N is a prefix of one draw of max(Ns), so curves are nested"""
    states: int = 256
    """held-out dataset states"""
    n_hat: int = 8
    """policy samples the Gaussian proposal is fitted to"""
    offset: bool = False
    """fit e = c + a·N^b instead of a·N^b"""
    n_boot: int = 500
    """bootstrap resamples over states"""
    seed: int = 0

    def validate(self) -> None:
        if not self.Ns or min(self.Ns) < 1:
            raise ValueError(f"scaling.Ns must be positive integers, got {self.Ns}")
        if self.states < 2:
            raise ValueError(f"scaling.states must be >= 2, got {self.states}")
        if self.n_hat < 2:
            raise ValueError(f"scaling.n_hat must be >= 2, got {self.n_hat}")


def best_of_n_errors(policy, pparams, obs, target, valid, key, cfg: ScalingConfig, proposal: str):
    """Best-of-N oracle errors [len(Ns)] for one state."""
    n_max = max(cfg.Ns)
    k_policy, k_gauss = jax.random.split(key)
    context = policy.encode(pparams, obs)
    if proposal == "policy":
        cands = policy.sample(pparams, context, k_policy, n_max).actions
    else:
        fitted = policy.sample(pparams, context, k_policy, cfg.n_hat).actions
        cands = gaussian_proposals(fitted, k_gauss, n_max)
    err = normalised_rmse(cands, target, 1.0, valid)  # [n_max], RMSE over the valid steps
    running_min = jax.lax.cummin(err)
    return running_min[jnp.asarray(cfg.Ns) - 1]


def scaling_study(policy, pparams, chunks: dict, cfg: ScalingConfig, batch: int = 32) -> dict:
    """Runs both proposal methods over held-out states; returns curves and power-law fits."""
    from core.stats import fit_power_law

    cfg.validate()
    n = len(chunks["actions"])
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(n, size=min(cfg.states, n), replace=False))
    pick = lambda x: jnp.asarray(x[idx])
    obs = jax.tree.map(pick, chunks["obs"])
    target, valid = pick(chunks["actions"]), pick(chunks["valid"]).astype(jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), len(idx))
    out = {"Ns": list(cfg.Ns), "states": int(len(idx)), "n_hat": cfg.n_hat, "methods": {}}
    for proposal in PROPOSALS:
        fn = jax.jit(jax.vmap(
            lambda o, t, v, k, p=proposal: best_of_n_errors(policy, pparams, o, t, v, k, cfg, p)
        ))
        errors = np.concatenate([
            np.asarray(fn(*jax.tree.map(lambda x, s=s: x[s:s + batch], (obs, target, valid, keys))))
            for s in range(0, len(idx), batch)
        ])  # [states, len(Ns)]
        fit = fit_power_law(np.asarray(cfg.Ns), errors, offset=cfg.offset, n_boot=cfg.n_boot,
                            seed=cfg.seed)
        out["methods"][proposal] = {
            "error_mean": errors.mean(0).tolist(),
            "error_sem": (errors.std(0) / np.sqrt(len(errors))).tolist(),
            "fit": fit,
        }
    return out

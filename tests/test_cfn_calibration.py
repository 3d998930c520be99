"""Count calibration of the CFN: (1/d)||f||^2 tracks 1/n on duplicated synthetic features, and
the random prior keeps far-away features at a count near 1."""

from __future__ import annotations

from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from verifiers.cfn_model import CFNConfig, cfn_output, train_cfn


def duplicated_clusters(k, f, nmax, seed=0, jitter=0.01):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, f)).astype(np.float32)
    n = np.round(np.exp(rng.uniform(0, np.log(nmax), k))).astype(int)  # log-uniform in [1, nmax]
    x = np.repeat(centres, n, 0) + jitter * rng.normal(size=(n.sum(), f)).astype(np.float32)
    held = centres + jitter * rng.normal(size=centres.shape).astype(np.float32)
    ood = 3.0 * rng.normal(size=(200, f)).astype(np.float32)
    return x, n, held, ood


def calibration(cfg, k, f, nmax):
    x, n, held, ood = duplicated_clusters(k, f, nmax)
    st, _ = train_cfn(x, cfg)
    q = np.asarray(jnp.mean(cfn_output(st, jnp.asarray(held)) ** 2, -1))  # ||f||^2/d ~ 1/n
    q_ood = np.asarray(jnp.mean(cfn_output(st, jnp.asarray(ood)) ** 2, -1))
    rho = spearmanr(q, 1.0 / n).correlation
    slope = np.polyfit(np.log(n), np.log(q), 1)[0]
    return rho, slope, float(np.median(q_ood))


# Tolerance: the slope of log(||f||^2/d) on log n is shallower than -1 when the net cannot fit
# single-visit clusters exactly (finite capacity and training), so the assertion is a range
# rather than an exact -1. Tolerances are unchanged from the earlier hand-picked configs; with
# the shipped defaults the measured values are: fast rho 0.922, slope -0.82, OOD ||f||^2/d
# 0.65 (no prior 0.14); slow rho 0.981, slope -0.92, OOD 0.45 (no prior 0.02).
#
# Both variants run the SHIPPED defaults CFNConfig() (the head that fit_cfn deploys); the fast
# one only at reduced width, on a smaller problem.
FAST_CFG = replace(CFNConfig(), hidden_dim=32)


def test_count_calibration_fast():
    rho, slope, ood = calibration(FAST_CFG, k=50, f=16, nmax=50)
    rho_np, slope_np, ood_np = calibration(replace(FAST_CFG, use_prior=False), k=50, f=16,
                                           nmax=50)
    print(f"prior: rho={rho:.3f} slope={slope:.3f} ood={ood:.3f}; "
          f"no prior: rho={rho_np:.3f} slope={slope_np:.3f} ood={ood_np:.3f}")
    assert rho > 0.9
    assert -1.25 < slope < -0.7
    # Far from the data the prior keeps ||f||^2/d near 1; without it OOD norms shrink, i.e.
    # OOD inputs get spuriously large counts.
    assert abs(np.log(ood)) < 0.5 * abs(np.log(ood_np))
    assert ood_np < 0.5


@pytest.mark.slow
def test_count_calibration_slow():
    cfg = CFNConfig()  # the shipped defaults
    rho, slope, ood = calibration(cfg, k=200, f=32, nmax=200)
    _, _, ood_np = calibration(replace(cfg, use_prior=False), 200, 32, 200)
    print(f"rho={rho:.3f} slope={slope:.3f} ood prior={ood:.3f} no prior={ood_np:.3f}")
    assert rho > 0.9
    assert -1.25 < slope < -0.7
    assert abs(np.log(ood)) < 0.5 * abs(np.log(ood_np))

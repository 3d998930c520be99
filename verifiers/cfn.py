"""TACO's verifier: rank candidates by the CFN pseudo-count of the policy's own features.

Fitting collects the policy's features on its SFT dataset (``verifiers.features``), trains the
estimator (``verifiers.cfn_model``) and checks that the fitted head counts: refit with held-out
features duplicated k times, the squared output norm must fall like 1/k (``count_check``).
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.io import read_json, write_json
from policies.base import Candidates
from verifiers.base import BuildContext, VerifierPlugin
from verifiers.cfn_model import (
    CFNConfig,
    CFNState,
    cfn_loss,
    cfn_output,
    init_cfn,
    load_cfn,
    pseudo_counts,
    rademacher_targets,
    save_cfn,
    train_cfn,
)
from verifiers.features import collect_features, feature_spread
from verifiers.registry import register

# ---------------------------------------------------------------------------------------------
# does the fitted head count? (duplication check on the real features)

COUNT_CHECK_KS = (1, 2, 4, 8, 16, 32)
SLOPE_MAX = -0.5
"""pass: log(||f||^2/d) falls at least half as fast as log k (ideal count estimator: -1)"""
ENERGY_TOL = 0.2
"""pass: |E[f.c] - E[||f||^2]| <= ENERGY_TOL * E[||f||^2] over the training rows (for the MSE
optimum f_i = mean of the coin flips of i's copies, E[f.c] = E[||f||^2] = d E[1/n])"""


@jax.jit
def coin_flip_stats(state: CFNState, features: jax.Array) -> dict:
    """Eval-mode fit of a CFN on the rows it was trained on (row i has target c_i).

    features: [N, F] -> {"fc": E[f.c]/d, "ff": E[||f||^2]/d, "loss": E||f - c||^2/d}, so
    loss = ff - 2 fc + 1. fc/ff is the share of the output energy explained by the coin flips;
    a head that only carries the prior (or noise) has fc ~ 0."""
    f = cfn_output(state, features)
    c = rademacher_targets(jax.random.PRNGKey(state.config.target_seed),
                           jnp.arange(features.shape[0]), state.config.output_dim)
    return {"fc": jnp.mean(f * c), "ff": jnp.mean(f**2), "loss": cfn_loss(f, c)}


@jax.jit
def mean_sq_norm(state: CFNState, features: jax.Array) -> jax.Array:
    """||f(h)||^2 / d, the estimate of 1/n. features: [..., F] -> [...]."""
    lead = features.shape[:-1]
    f = cfn_output(state, features.reshape(-1, features.shape[-1]))
    return jnp.mean(f**2, axis=-1).reshape(lead)


def count_check_split(key: jax.Array, n: int, num_groups: int, group_size: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A random held-out set of num_groups * group_size rows: (held int [num_groups,
    group_size], rest int [n - num_groups * group_size], sorted)."""
    n_held = num_groups * group_size
    if n_held >= n:
        raise ValueError(f"count_check: {num_groups} x {group_size} held-out features need more "
                         f"than {n_held} features, got {n}")
    perm = np.asarray(jax.random.permutation(key, n))
    return perm[:n_held].reshape(num_groups, group_size), np.sort(perm[n_held:])


@partial(jax.jit, static_argnames=("num_dup",))
def duplicated_set(features: jax.Array, rest: jax.Array, dup_src: jax.Array,
                   dup_std: jax.Array, key: jax.Array, num_dup: int) -> jax.Array:
    """Training rows: features[rest] once each, then features[dup_src] (each held-out feature
    repeated k times) plus N(0, dup_std^2) per row (dup_std [num_dup, F]; 0 = exact copy).

    Every row is its own stored visit with its own coin-flip vector (train_cfn's target of row
    i is c_i), which is what makes the MSE optimum at a k-fold feature shrink as 1/k."""
    noise = dup_std * jax.random.normal(key, (num_dup, features.shape[1]), jnp.float32)
    return jnp.concatenate([features[rest], features[dup_src] + noise])


def log_log_slope(ks, q) -> float:
    """Least-squares slope of log q on log k."""
    return float(np.polyfit(np.log(np.asarray(ks, np.float64)),
                            np.log(np.maximum(np.asarray(q, np.float64), 1e-30)), 1)[0])


def count_check(
    features: np.ndarray | jax.Array, cfg: CFNConfig, key: jax.Array,
    perturb_std: np.ndarray | float | None = None, ks: tuple[int, ...] = COUNT_CHECK_KS,
    groups_per_k: int = 16, train_noise_std: np.ndarray | None = None,
) -> dict:
    """Does a CFN fitted with ``cfg`` count on these features?

    Random held-out features are split into one group of ``groups_per_k`` per k in ``ks``;
    one fresh CFN is fitted on the remaining features once each plus every held-out feature
    k times, each copy its own row with its own coin flips. For a count estimator the
    eval-mode ||f||^2/d at a held-out feature falls like 1/k (log-log slope -1) and the output
    energy on the training rows is the coin flips' (E[f.c] = E[||f||^2]).

    Variants: "exact" copies and, if ``perturb_std`` ([F] or scalar) is given, "perturbed"
    copies with N(0, perturb_std^2) noise on every copy (several samples of the policy at one
    state), queried at the clean feature. The variants use disjoint held-out groups in the
    same fit (one fit however many variants). ``train_noise_std`` is the fit's own training
    noise (``train_cfn``'s noise_std), as the deployed head was trained.

    Returns a JSON-able dict: per variant the per-k mean ||f||^2/d ("sq_norm_per_k"), the
    slope and "slope_pass" (slope <= SLOPE_MAX); over all training rows fc = E[f.c]/d,
    ff = E[||f||^2]/d, their ratio, the eval-mode loss and "energy_pass" (|fc - ff| <=
    ENERGY_TOL * ff); "passed" = the exact slope and the energy pass (the count property);
    "perturbed_passed" = the perturbed slope and the energy pass (None without perturb_std).
    """
    feats = jnp.asarray(features, jnp.float32)
    if feats.ndim != 2:
        raise ValueError(f"count_check: features must be [N, F], got {feats.shape}")
    n, F = feats.shape
    ks = tuple(int(k) for k in ks)
    if len(ks) < 2 or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"count_check: ks must be >= 2 distinct positive ints, got {ks}")
    if groups_per_k < 1:
        raise ValueError(f"count_check: groups_per_k must be >= 1, got {groups_per_k}")
    stds = {"exact": np.zeros((F,), np.float32)}
    if perturb_std is not None:
        std = np.asarray(perturb_std, np.float32)
        if std.ndim > 1 or (std.ndim == 1 and std.shape[0] != F) or np.any(~(std >= 0)):
            raise ValueError(f"count_check: perturb_std must be a scalar or [F={F}] of stds "
                             f">= 0, got shape {std.shape}")
        stds["perturbed"] = np.broadcast_to(std, (F,))
    names = list(stds)
    k_split, k_noise, k_fit = jax.random.split(key, 3)
    held, rest = count_check_split(k_split, n, len(names) * len(ks), groups_per_k)
    held = held.reshape(len(names), len(ks), groups_per_k)  # [variant, k, group]
    reps = np.broadcast_to(np.asarray(ks)[None, :, None], held.shape).reshape(-1)
    dup_src = np.repeat(held.reshape(-1), reps)
    # Rows are variant-major, so each variant's copies are one contiguous block.
    dup_std = np.repeat(np.stack([stds[v] for v in names]), int(np.sum(ks)) * groups_per_k, 0)
    x = duplicated_set(feats, jnp.asarray(rest), jnp.asarray(dup_src), jnp.asarray(dup_std),
                       k_noise, num_dup=len(dup_src))
    state, _ = train_cfn(x, cfg, k_fit, noise_std=train_noise_std)
    q = np.asarray(mean_sq_norm(state, feats[jnp.asarray(held)])).mean(axis=-1)  # [variant, k]
    st = {k: float(v) for k, v in coin_flip_stats(state, x).items()}
    energy_ok = bool(abs(st["fc"] - st["ff"]) <= ENERGY_TOL * st["ff"])
    out: dict = {"ks": list(ks), "groups_per_k": int(groups_per_k), "num_features": int(n),
                 "num_train_rows": int(x.shape[0]), "slope_max": SLOPE_MAX,
                 "energy_tol": ENERGY_TOL, "fc": st["fc"], "ff": st["ff"],
                 "fc_over_ff": st["fc"] / max(st["ff"], 1e-30), "loss": st["loss"],
                 "energy_pass": energy_ok}
    for i, v in enumerate(names):
        slope = log_log_slope(ks, q[i])
        out[v] = {"sq_norm_per_k": [float(a) for a in q[i]], "slope": slope,
                  "slope_pass": bool(slope <= SLOPE_MAX),
                  "perturb_std_rms": float(np.sqrt(np.mean(stds[v] ** 2)))}
    out["passed"] = out["exact"]["slope_pass"] and energy_ok
    out["perturbed_passed"] = (out["perturbed"]["slope_pass"] and energy_ok
                               if "perturbed" in out else None)
    return out


# ---------------------------------------------------------------------------------------------
# fitting from a policy and its SFT dataset


def fit_cfn(policy: Any, params: Any, dataset: Any, cfg: CFNConfig, key: jax.Array,
            out_dir: str | None = None, log: Any = None) -> CFNState:
    """Collects the policy's features on the SFT dataset (cfg.collect), trains the CFN, and
    saves it to out_dir if given. ``dataset``: a chunked dict (obs, actions, valid), as
    ``Demos.chunks(policy.horizon)`` returns.

    With ``cfg.count_check`` (and out_dir) it then runs ``count_check`` on the same features,
    perturbing the copies by the policy's own sampling spread (``feature_spread``), and writes
    out_dir/count_check.json; fit_info.json records the deployed head's eval-mode fit."""
    k_collect, k_train = jax.random.split(key)
    t0 = time.perf_counter()
    feats, collect_info = collect_features(policy, params, dataset, cfg.collect, k_collect)
    spread = feature_spread(policy, params, dataset, jax.random.fold_in(key, 2))
    noise_std = cfg.feature_noise * spread
    t1 = time.perf_counter()
    state, history = train_cfn(feats, cfg, k_train, log=log, noise_std=noise_std)
    fit = {k: float(v) for k, v in coin_flip_stats(state, jnp.asarray(feats)).items()}
    t2 = time.perf_counter()
    if out_dir is not None:
        train_counts = np.asarray(pseudo_counts(state, jnp.asarray(feats[:4096])))
        extra = {"collect": collect_info, "history": history,
                 "train_count_median": float(np.median(train_counts)),
                 "eval_loss": fit["loss"], "eval_fc": fit["fc"], "eval_ff": fit["ff"],
                 "spread_rms": float(np.sqrt(np.mean(spread**2))),
                 "collect_s": t1 - t0, "train_s": t2 - t1}
        if cfg.count_check:
            check = fit_count_check(feats, state.config, spread, noise_std,
                                    jax.random.fold_in(key, 1))
            write_json(os.path.join(out_dir, "count_check.json"), check)
            extra["count_check_passed"] = check.get("passed")
            extra["count_check_s"] = time.perf_counter() - t2
        save_cfn(state, out_dir, extra)
    return state


def fit_count_check(feats: np.ndarray, cfg: CFNConfig, spread: np.ndarray,
                    noise_std: np.ndarray, key: jax.Array) -> dict:
    """``count_check`` as fit_cfn runs it: the policy's sampling spread as the perturbation,
    the deployed head's training noise, and fewer held-out groups on small feature sets (at
    most half the features held out, over both variants)."""
    groups = min(16, feats.shape[0] // (4 * len(COUNT_CHECK_KS)))
    if groups < 1:
        return {"passed": None, "skipped": f"too few features ({feats.shape[0]})"}
    return count_check(feats, cfg, key, perturb_std=spread, groups_per_k=groups,
                       train_noise_std=noise_std)


# ---------------------------------------------------------------------------------------------
# the verifier


class CFNVerifier:
    """Pseudo-count d/||f(h)||^2 of each candidate's feature; higher = better supported."""

    name = "cfn"
    requires: tuple[str, ...] = ("features",)

    def __init__(self, state: CFNState | None = None, path: str | None = None):
        if (state is None) == (path is None):
            raise ValueError("verifier 'cfn': give exactly one of state=<CFNState> or "
                             "path=<fit-verifier output dir>")
        self.state = load_cfn(path) if path is not None else state

    def score(self, vstate: CFNState, obs: dict, candidates: Candidates,
              key: jax.Array) -> jax.Array:
        feats = candidates.features  # [M, F]
        if feats.shape[-1] != vstate.config.input_dim:
            raise ValueError(f"verifier 'cfn': candidate features have F={feats.shape[-1]} but "
                             f"the CFN was trained on F={vstate.config.input_dim}")
        return pseudo_counts(vstate, feats)


# ---------------------------------------------------------------------------------------------
# the plugin


def _fit(cfg: CFNConfig, ctx: BuildContext, params: Any, demos: Any, key: jax.Array,
         out: str) -> None:
    policy = ctx.policy
    log = lambda e, m: print(f"cfn epoch {e}: loss {m['loss']:.4f} |f| {m['f_norm']:.3f}")
    fit_cfn(policy, params, demos.chunks(policy.horizon), cfg, key, out, log=log)
    check_path = os.path.join(out, "count_check.json")
    if os.path.exists(check_path):
        c = read_json(check_path)
        if c.get("passed") is None:
            print(f"cfn count check: {c.get('skipped')}")
        else:
            pert = c.get("perturbed", {}).get("slope", float("nan"))
            print(f"cfn count check: {'PASSED' if c['passed'] else 'FAILED'} (log-log slope "
                  f"{c['exact']['slope']:.2f}, perturbed {pert:.2f}, need <= {SLOPE_MAX}; "
                  f"E[f.c]/E[|f|^2] = {c['fc_over_ff']:.2f}; eval loss {c['loss']:.3f})")


def _build(cfg: CFNConfig, ctx: BuildContext) -> CFNVerifier:
    if ctx.fitted_dir is None:
        raise ValueError("verifier cfn needs a fitted CFN (steerlab fit-verifier cfn)")
    return CFNVerifier(path=ctx.fitted_dir)


def _init(cfg: CFNConfig, ctx: BuildContext, key: jax.Array) -> CFNVerifier:
    return CFNVerifier(state=init_cfn(cfg, ctx.policy.feature_dim, key))


register(VerifierPlugin(CFNVerifier, build=_build, config=CFNConfig, fit=_fit, init=_init))

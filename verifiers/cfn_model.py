"""The Coin-Flipping-Network pseudo-count estimator: config, network, training, save/load.
The verifier that ranks candidates by it (TACO), its fit and its count check: ``verifiers.cfn``.

A residual MLP f is regressed onto a fixed Rademacher vector c_i in {-1,+1}^d per stored
feature i. For a feature seen n times the MSE optimum is the mean of n coin-flip vectors, so
E||f||^2 = d/n and the pseudo-count is n_hat = d / ||f||^2 (CFN, Lobel et al. 2023). TACO
executes the candidate with the largest count (anti-exploration).

    f(h) = g_theta(s*h) + (p(s*h) - mu) / sqrt(var + eps)     # s = input_scale (10 in TACO)

p is a frozen copy of the initial network (the random prior); mu/var are running per-dimension
statistics of its output over the training batches. Far from the data g_theta has not been
pushed anywhere in particular, and the standardised prior keeps ||f||^2/d near 1 (count ~ 1).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from core.checkpoint import restore_pytree, save_pytree
from core.config import from_dict, to_dict
from core.io import read_json, write_json
from verifiers.features import CollectConfig


@dataclass(frozen=True)
class CFNConfig:
    hidden_dim: int = 64
    """residual-MLP width H (TACO: 1536 on 1024-dim pi0.5 features; here the feature width, which
    keeps scoring under 5% of the policy's sampling time at M = 32)"""
    depth: int = 2
    """residual blocks (TACO: 3)"""
    output_dim: int = 20
    """d, the number of coin flips per feature"""
    dropout: float = 0.0
    """TACO: 0.1 (see the defaults note below this class)"""
    input_scale: float = 10.0
    """features are multiplied by this before both networks"""
    use_prior: bool = True
    """add the standardised random prior (ablation: False)"""
    prior_var_init: float = 0.01
    prior_eps: float = 1e-6
    max_lr: float = 1e-2
    """TACO: 1e-3"""
    div_factor: float = 25.0
    """one-cycle start lr = max_lr / div_factor"""
    final_div_factor: float = 1e4
    """one-cycle end lr = start lr / final_div_factor"""
    pct_start: float = 0.3
    batch_size: int = 128
    """TACO: 512"""
    grad_accum: int = 1
    """mini-batches per optimiser update; the lr schedule advances per mini-batch (TACO: 2)"""
    epochs: int = 150
    """TACO: 16"""
    target_seed: int = 0
    """seed of the per-index Rademacher targets"""
    input_dim: int = 0
    """feature dim F; 0 = taken from the data at fit time"""
    feature_noise: float = 0.0
    """Gaussian noise added to every training feature at every step, as a multiple of the
    policy's own per-dimension sampling spread (``verifiers.features.feature_spread``). The
    ablation asks whether a head trained so pools a candidate's feature with the visits of its
    state; on the built-in suite it does not (see the defaults note). 0 = exact features, as
    TACO trains"""
    collect: CollectConfig = CollectConfig()
    count_check: bool = True
    """after fit_cfn, refit on the features with held-out ones duplicated 1..32 times and write
    count_check.json (does the fitted head count? see ``count_check``); False skips it"""

    def __post_init__(self):
        for f in ("hidden_dim", "depth", "output_dim", "batch_size", "grad_accum", "epochs"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CFNConfig.{f} must be a positive int, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CFNConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"CFNConfig.pct_start must be in (0, 1), got {self.pct_start}")
        for f in ("max_lr", "div_factor", "final_div_factor", "prior_var_init", "prior_eps",
                  "input_scale"):
            if not getattr(self, f) > 0:
                raise ValueError(f"CFNConfig.{f} must be > 0, got {getattr(self, f)}")
        if self.input_dim < 0:
            raise ValueError(f"CFNConfig.input_dim must be >= 0, got {self.input_dim}")
        if not self.feature_noise >= 0:
            raise ValueError(f"CFNConfig.feature_noise must be >= 0, got {self.feature_noise}")


# Defaults note. TACO's optimisation (dropout 0.1, batch 512, grad_accum 2, 16 epochs, one-cycle
# max lr 1e-3) gives only 48 Adam updates on ~3000 features, and the head it leaves does not
# count: on the real default policy's features (3000 states of its SFT set, as the quickstart
# fits them) count_check gives E[f.c]/d = -0.001 against E[||f||^2]/d = 0.39 and a log-log
# slope of ||f||^2/d on the number of copies of a feature of -0.10 (ideal -1). Dropout off, one
# update per batch of 128, 150 epochs and max lr 1e-2 (3600 updates) at the same width and
# depth pass it: slope -0.88, E[f.c]/E[||f||^2] = 1.01, deployed eval loss 0.10 (was 1.47).
# hidden_dim and depth are unchanged, so the scoring cost at M = 32 is too. The head must not be
# outnumbered by the features: on the policy's full 49.5k-state set it gives slope -0.27 (fails;
# hidden_dim=128 passes at -0.62 but a fit then takes ~10 min), so keep collect.max_states near
# the quickstart's 3000 or widen the head. Copies perturbed by the policy's own sampling spread
# are not counted as the same state (slope ~ -0.03): at that spread a copy is as close to other
# dataset features as to its own, so that variant is reported, not required. Training on
# features noised at that spread (feature_noise) does not mend it, it only blurs the count:
# on the quickstart policy's features, feature_noise 0.5 gives exact slope -0.46 and perturbed
# +0.08 (E[f.c]/E[||f||^2] 1.23), 1.0 gives -0.12 and +0.07 with ||f||^2/d ~ 0.03 at every k,
# i.e. some 30 visits inside one spread of any feature whatever k is.


class CFNNet(nn.Module):
    """Residual MLP head (TACO cfn_net.py): in-proj, GELU, LN; blocks; linear to d."""

    hidden_dim: int
    depth: int
    output_dim: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [N, F] -> [N, d]
        dense = partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
                        bias_init=nn.initializers.zeros)
        # Exact GELU and LayerNorm eps 1e-5 match the torch defaults the head was built with.
        gelu = partial(nn.gelu, approximate=False)
        x = nn.LayerNorm(epsilon=1e-5)(gelu(dense(self.hidden_dim)(x)))
        for _ in range(self.depth):
            y = gelu(dense(4 * self.hidden_dim)(x))
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
            y = dense(self.hidden_dim)(y)
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
            x = nn.LayerNorm(epsilon=1e-5)(x + y)
        return dense(self.output_dim)(x)


def make_net(cfg: CFNConfig) -> CFNNet:
    return CFNNet(cfg.hidden_dim, cfg.depth, cfg.output_dim, cfg.dropout)


@struct.dataclass
class CFNState:
    params: Any
    prior_params: Any
    prior_mean: jax.Array  # f32 [d]
    prior_var: jax.Array  # f32 [d]
    prior_count: jax.Array  # f32 [], rows seen by the running statistics
    config: CFNConfig = struct.field(pytree_node=False)


def init_cfn(cfg: CFNConfig, input_dim: int, key: jax.Array) -> CFNState:
    if input_dim < 1:
        raise ValueError(f"init_cfn: input_dim must be >= 1, got {input_dim}")
    cfg = dataclasses.replace(cfg, input_dim=int(input_dim))
    params = make_net(cfg).init(key, jnp.zeros((1, input_dim), jnp.float32))["params"]
    d = cfg.output_dim
    return CFNState(
        params=params,
        # The prior is the initial network itself, frozen (a deep copy in TACO).
        prior_params=jax.tree.map(jnp.array, params),
        prior_mean=jnp.zeros((d,), jnp.float32),
        prior_var=jnp.full((d,), cfg.prior_var_init, jnp.float32),
        prior_count=jnp.zeros((), jnp.float32),
        config=cfg,
    )


# ---------------------------------------------------------------------------------------------
# pieces with known answers


def rademacher_targets(target_key: jax.Array, index: jax.Array, d: int) -> jax.Array:
    """index: int [N] -> f32 [N, d]; c_i depends only on (target_key, i), never on the epoch."""
    one = lambda i: jax.random.rademacher(jax.random.fold_in(target_key, i), (d,), jnp.float32)
    return jax.vmap(one)(index)


def cfn_loss(f: jax.Array, targets: jax.Array) -> jax.Array:
    """MSE averaged over rows and the d coordinates. f, targets: [N, d] -> []."""
    return jnp.mean((f - targets) ** 2)


def update_running_stats(
    mean: jax.Array, var: jax.Array, count: jax.Array, batch: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merges a batch [N, d] into running (population) mean/var over ``count`` rows.

    Equal to applying the per-row Welford rule of CFN/TACO
    (mean += delta/(n+1); var = (var*n + delta^2*n/(n+1))/(n+1)) row by row, in one
    vectorised step (Chan et al.'s parallel merge).
    """
    m = jnp.asarray(batch.shape[0], jnp.float32)
    b_mean = jnp.mean(batch, axis=0)
    b_var = jnp.mean((batch - b_mean) ** 2, axis=0)
    total = count + m
    delta = b_mean - mean
    new_mean = mean + delta * m / total
    new_var = (var * count + b_var * m + delta**2 * count * m / total) / total
    return new_mean, new_var, total


def one_cycle_lr(step: jax.Array, total_steps: int, max_lr: float, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4) -> jax.Array:
    """torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos", three_phase=False) at step.

    start max_lr/div_factor at step 0, max_lr at step pct_start*total-1, and
    max_lr/(div_factor*final_div_factor) at step total-1 (cosine in both phases).
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    step = jnp.asarray(step, jnp.float32)
    end1 = float(pct_start * total_steps) - 1.0
    end2 = float(total_steps) - 1.0

    def cos_anneal(start, end, pct):
        return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)

    up = cos_anneal(initial, max_lr, jnp.clip(step / max(end1, 1e-8), 0.0, 1.0))
    down = cos_anneal(max_lr, final, jnp.clip((step - end1) / max(end2 - end1, 1e-8), 0.0, 1.0))
    return jnp.where(step <= end1, up, down)


def make_optimizer(cfg: CFNConfig, total_minibatches: int) -> optax.GradientTransformation:
    """Adam on a one-cycle lr that advances per mini-batch, with gradient accumulation.

    The optimiser steps every ``grad_accum`` mini-batches while the schedule steps every
    mini-batch (as in TACO's loop), so update j uses the lr of mini-batch (j+1)*k - 1.
    """
    k = cfg.grad_accum

    def lr(count):
        return one_cycle_lr(count * k + k - 1, total_minibatches, cfg.max_lr, cfg.pct_start,
                            cfg.div_factor, cfg.final_div_factor)

    inner = optax.adam(lr)
    return optax.MultiSteps(inner, every_k_schedule=k) if k > 1 else inner


# ---------------------------------------------------------------------------------------------
# forward passes


def _standardised_prior(state: CFNState, xs: jax.Array, mean, var) -> jax.Array:
    cfg = state.config
    p = make_net(cfg).apply({"params": state.prior_params}, xs, train=False)
    return (p - mean) / jnp.sqrt(var + cfg.prior_eps)


def cfn_output(state: CFNState, features: jax.Array) -> jax.Array:
    """f(h) at evaluation (no dropout). features: [N, F] -> [N, d]."""
    cfg = state.config
    xs = features.astype(jnp.float32) * cfg.input_scale
    f = make_net(cfg).apply({"params": state.params}, xs, train=False)
    if cfg.use_prior:
        f = f + _standardised_prior(state, xs, state.prior_mean, state.prior_var)
    return f


def pseudo_counts(state: CFNState, features: jax.Array) -> jax.Array:
    """n_hat = d / ||f(h)||^2. features: [M, F] -> f32 [M]."""
    f = cfn_output(state, features)
    return state.config.output_dim / jnp.maximum(jnp.sum(f**2, axis=-1), 1e-12)


# ---------------------------------------------------------------------------------------------
# training


@partial(jax.jit, static_argnames=("num_batches", "total_minibatches"))
def _train_epoch(state: CFNState, opt_state, feats, noise_std, key, epoch, num_batches,
                 total_minibatches):
    """One epoch: a scan over ``num_batches`` mini-batches of a fresh permutation.

    feats: f32 [N, F]; noise_std f32 [F], the std of fresh Gaussian noise on every row of
    every mini-batch (0: exact features). The permutation is wrapped around so every
    mini-batch is full.
    """
    cfg = state.config
    net = make_net(cfg)
    opt = make_optimizer(cfg, total_minibatches)
    n = feats.shape[0]
    bsz = min(cfg.batch_size, n)
    n_feat = feats.shape[1]
    k_perm, k_drop = jax.random.split(jax.random.fold_in(key, epoch))
    k_noise = jax.random.fold_in(k_perm, 1)
    perm = jax.random.permutation(k_perm, n)
    idx = perm[jnp.arange(num_batches * bsz) % n].reshape(num_batches, bsz)
    target_key = jax.random.PRNGKey(cfg.target_seed)

    def body(carry, xs):
        st, opt_state = carry
        b_idx, i = xs
        noise = noise_std * jax.random.normal(jax.random.fold_in(k_noise, i), (bsz, n_feat))
        x = (feats[b_idx] + noise) * cfg.input_scale  # [B, F]
        targets = rademacher_targets(target_key, b_idx, cfg.output_dim)  # [B, d]
        if cfg.use_prior:
            p = net.apply({"params": st.prior_params}, x, train=False)
            mean, var, cnt = update_running_stats(st.prior_mean, st.prior_var,
                                                  st.prior_count, p)
            prior = (p - mean) / jnp.sqrt(var + cfg.prior_eps)
            st = st.replace(prior_mean=mean, prior_var=var, prior_count=cnt)
        else:
            prior = 0.0

        def loss_fn(params):
            g = net.apply({"params": params}, x, train=True,
                          rngs={"dropout": jax.random.fold_in(k_drop, i)})
            f = g + prior
            return cfn_loss(f, targets), jnp.mean(jnp.sqrt(jnp.sum(f**2, axis=-1)))

        (loss, fnorm), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
        updates, opt_state = opt.update(grads, opt_state, st.params)
        st = st.replace(params=optax.apply_updates(st.params, updates))
        return (st, opt_state), (loss, fnorm)

    (state, opt_state), (losses, fnorms) = jax.lax.scan(
        body, (state, opt_state), (idx, jnp.arange(num_batches)))
    return state, opt_state, {"loss": jnp.mean(losses), "f_norm": jnp.mean(fnorms)}


def train_cfn(
    features: np.ndarray | jax.Array, cfg: CFNConfig, key: jax.Array | None = None,
    log: Any = None, noise_std: np.ndarray | None = None,
) -> tuple[CFNState, list[dict]]:
    """Trains a fresh CFN on features [N, F] (row i gets coin-flip vector c_i).

    key defaults to PRNGKey(0). ``noise_std`` ([F] or scalar; None = 0): the std of the
    training-time noise on every feature (``cfg.feature_noise`` times the policy's spread, as
    ``fit_cfn`` computes it). Returns the state and one metrics dict per epoch;
    ``log(epoch, metrics)`` is called after each epoch if given.
    """
    feats = jnp.asarray(features, jnp.float32)
    if feats.ndim != 2 or feats.shape[0] < 1:
        raise ValueError(f"train_cfn: features must be [N, F] with N >= 1, got {feats.shape}")
    if cfg.input_dim not in (0, feats.shape[1]):
        raise ValueError(f"train_cfn: CFNConfig.input_dim={cfg.input_dim} but features have "
                         f"F={feats.shape[1]}")
    key = jax.random.PRNGKey(0) if key is None else key
    std = jnp.broadcast_to(jnp.asarray(0.0 if noise_std is None else noise_std, jnp.float32),
                           feats.shape[1:])
    k_init, k_train = jax.random.split(key)
    state = init_cfn(cfg, feats.shape[1], k_init)
    n = feats.shape[0]
    bsz = min(cfg.batch_size, n)
    num_batches = -(-n // bsz)
    total = cfg.epochs * num_batches
    opt_state = make_optimizer(state.config, total).init(state.params)
    history = []
    for epoch in range(cfg.epochs):
        state, opt_state, m = _train_epoch(state, opt_state, feats, std, k_train, epoch,
                                           num_batches=num_batches, total_minibatches=total)
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in m.items()},
               "prior_var_mean": float(jnp.mean(state.prior_var))}
        history.append(row)
        if log is not None:
            log(epoch + 1, row)
    return state, history


# ---------------------------------------------------------------------------------------------
# checkpoints


def _arrays(state: CFNState) -> dict:
    return {"params": state.params, "prior_params": state.prior_params,
            "prior_mean": state.prior_mean, "prior_var": state.prior_var,
            "prior_count": state.prior_count}


def save_cfn(state: CFNState, out_dir: str, extra: dict | None = None) -> str:
    """Writes out_dir/{config.json, ckpt/ (orbax), fit_info.json (if extra)}."""
    out_dir = os.path.abspath(out_dir)
    save_pytree(os.path.join(out_dir, "ckpt"), _arrays(state))
    write_json(os.path.join(out_dir, "config.json"), to_dict(state.config))
    if extra is not None:
        write_json(os.path.join(out_dir, "fit_info.json"), extra)
    return out_dir


def load_cfn(run_dir: str) -> CFNState:
    cfg = from_dict(CFNConfig, read_json(os.path.join(run_dir, "config.json"),
                                         "fit one with `steerlab fit-verifier cfn`"))
    template = init_cfn(cfg, cfg.input_dim, jax.random.PRNGKey(0))
    return template.replace(**restore_pytree(os.path.join(run_dir, "ckpt"), _arrays(template)))



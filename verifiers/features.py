"""Policy features for the SFT dataset, as TACO collects them for the CFN.

For each dataset (obs, chunk) the policy is queried and one feature is kept:
    search    N candidates (flow: one fixed noise bank shared by every state, seed 42;
              AR: N temperature samples); keep the feature of the candidate whose chunk is
              closest (L2 over the valid steps) to the dataset chunk ("high-fidelity search")
    single    one random sample's feature
    one_step  policy.one_step_features on the dataset chunk (flow only: the clean chunk noised
              to the last-step level, one denoising step)
The per-state work is one jitted ``vmap`` over a host batch of states.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from policies.base import map_state_batches

FEATURE_MODES = ("search", "single", "one_step")


@dataclass(frozen=True)
class CollectConfig:
    mode: Literal["search", "single", "one_step"] = "search"
    """how one feature per dataset state is chosen"""
    num_search: int = 50
    """N candidates per state for "search" (TACO: 50 for pi0.5, 16 for OpenVLA)"""
    noise_seed: int = 42
    """seed of the shared flow noise bank (TACO: 42)"""
    max_states: int | None = 3000
    """subsample this many dataset states (None = all). The default CFN head (width 64) counts
    on 3000 features (count-check slope -0.86) but not on all 49.5k of the default dataset
    (-0.27; width 128 reaches -0.62 at about four times the fit time)"""
    batch_states: int = 64
    """states per compiled host batch (bounds memory: batch_states * num_search chunks)"""

    def __post_init__(self):
        if self.mode not in FEATURE_MODES:
            raise ValueError(f"CollectConfig.mode {self.mode!r} is not one of "
                             f"{list(FEATURE_MODES)}")
        for f in ("num_search", "batch_states"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CollectConfig.{f} must be a positive int, got {v!r}")
        if self.max_states is not None and self.max_states < 1:
            raise ValueError(f"CollectConfig.max_states must be >= 1 or None, "
                             f"got {self.max_states}")


def takes_noise(policy: Any) -> bool:
    """Whether ``policy.sample`` accepts a fixed noise bank (flow policies)."""
    try:
        return "noise" in inspect.signature(policy.sample).parameters
    except (TypeError, ValueError):
        return False


def noise_bank(seed: int, n: int, horizon: int, action_dim: int) -> jax.Array:
    """The fixed [N, H, A] Gaussian bank reused for every state."""
    return jax.random.normal(jax.random.PRNGKey(seed), (n, horizon, action_dim), jnp.float32)


def chunk_distance(actions: jax.Array, chunk: jax.Array, valid: jax.Array) -> jax.Array:
    """L2 distance over valid steps. actions [M, H, A], chunk [H, A], valid [H] -> [M]."""
    w = valid.astype(jnp.float32)[None, :, None]
    return jnp.sqrt(jnp.sum(w * (actions - chunk[None]) ** 2, axis=(1, 2)))


def make_feature_fn(policy: Any, cfg: CollectConfig, horizon: int, action_dim: int):
    """A jitted fn(params, obs [B,...], chunk [B,H,A], valid [B,H], keys [B]) ->
    (features [B, F], distance of the kept candidate to the chunk [B])."""
    mode = cfg.mode
    flow = takes_noise(policy)
    if mode == "one_step" and not hasattr(policy, "one_step_features"):
        raise ValueError(f"CollectConfig.mode 'one_step' needs a policy with one_step_features; "
                         f"{type(policy).__name__} has none (use 'search' or 'single')")
    bank = None
    if flow and hasattr(policy, "make_noise"):
        # The policy's own generator: in its "bank" mode this is exactly the bank it uses at
        # inference, so collection and test-time candidates share their noises (as in TACO).
        bank = policy.make_noise(jax.random.PRNGKey(cfg.noise_seed), cfg.num_search)
    elif flow:
        bank = noise_bank(cfg.noise_seed, cfg.num_search, horizon, action_dim)

    def per_state(params, obs, chunk, valid, key):
        ctx = policy.encode(params, obs)
        if mode == "one_step":
            f = policy.one_step_features(params, ctx, chunk[None], key)[0]
            return f, jnp.zeros((), jnp.float32)
        if mode == "single":
            c = policy.sample(params, ctx, key, 1)
        elif flow:
            c = policy.sample(params, ctx, key, cfg.num_search, noise=bank)
        else:
            c = policy.sample(params, ctx, key, cfg.num_search)
        d = chunk_distance(c.actions, chunk, valid)  # [N]
        j = jnp.argmin(d)
        return c.features[j], d[j]

    return jax.jit(jax.vmap(per_state, in_axes=(None, 0, 0, 0, 0)))


def collect_features(
    policy: Any, params: Any, data: dict, cfg: CollectConfig, key: jax.Array
) -> tuple[np.ndarray, dict]:
    """Features [N, F] for a chunked dataset (``load_demos(path).chunks(H)``: obs, actions,
    valid). Returns (features, info) with the kept candidates' distances in info."""
    actions = np.asarray(data["actions"], np.float32)  # [N, H, A]
    n, horizon, action_dim = actions.shape
    if getattr(policy, "horizon", horizon) != horizon:
        raise ValueError(f"collect_features: dataset chunks have H={horizon} but the policy's "
                         f"horizon is {policy.horizon}")
    valid = np.asarray(data.get("valid", np.ones((n, horizon), bool)))
    obs = data["obs"]

    k_sub, k_q = jax.random.split(key)
    rows = np.arange(n)
    if cfg.max_states is not None and cfg.max_states < n:
        rows = np.sort(np.asarray(jax.random.permutation(k_sub, n)[: cfg.max_states]))
    fn = make_feature_fn(policy, cfg, horizon, action_dim)

    features, dist = map_state_batches(
        lambda d, keys: fn(params, d["obs"], d["actions"], d["valid"], keys),
        {"obs": obs, "actions": actions, "valid": valid}, k_q, cfg.batch_states, rows)
    features = features.astype(np.float32)
    info = {"mode": cfg.mode, "num_states": int(len(rows)), "num_search": cfg.num_search,
            "flow_noise_bank": takes_noise(policy), "kept_dist_mean": float(dist.mean()),
            "kept_dist_median": float(np.median(dist))}
    return features, info


def feature_spread(
    policy: Any, params: Any, data: dict, key: jax.Array, num_states: int = 16,
    num_samples: int = 16,
) -> np.ndarray:
    """The policy's own sampling spread of its feature, per dimension: f32 [F].

    At ``num_states`` random dataset states the policy draws ``num_samples`` candidates
    (``policy.sample`` as at test time: its own noise, e.g. the fixed bank); the per-state,
    per-dimension std across the candidates is averaged in quadrature over the states. This is
    how far apart the features of several visits of one state lie (the perturbation of
    ``verifiers.cfn.count_check``). One jitted ``vmap`` over the states."""
    if num_states < 1 or num_samples < 2:
        raise ValueError(f"feature_spread: need num_states >= 1 and num_samples >= 2, got "
                         f"{num_states}, {num_samples}")
    n = np.asarray(data["actions"]).shape[0]
    k_sub, k_q = jax.random.split(key)
    rows = np.sort(np.asarray(jax.random.permutation(k_sub, n)[: min(num_states, n)]))
    ob = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[rows]), data["obs"])
    keys = jax.random.split(k_q, len(rows))

    def per_state(params, obs, k):
        f = policy.sample(params, policy.encode(params, obs), k, num_samples).features
        return jnp.var(f.astype(jnp.float32), axis=0)  # [F]

    var = jax.jit(jax.vmap(per_state, in_axes=(None, 0, 0)))(params, ob, keys)
    return np.sqrt(np.asarray(jnp.mean(var, axis=0))).astype(np.float32)

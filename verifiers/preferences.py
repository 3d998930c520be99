"""Synthetic action preferences, as RoboMonkey builds them (Kwok et al. 2025; METHODS.md 3.1).

At one dataset state: sample N candidate chunks from the policy, cluster them to K
representatives (k-means; each representative is an actual sample, the member nearest its
centroid), form all K (K - 1) / 2 pairs and prefer the one with the lower normalised RMSE to a
reference chunk (the dataset's chunk, or the π* expert's ``obs["expert_chunk"]``), keeping both
errors for the margin term of ``algos.bradley_terry``.

Everything is pure JAX with static K and iteration counts: ``jax.vmap`` over states, then
``jax.jit``. Shapes are static, so ties (equal errors, e.g. two representatives that are the
same sample) are not dropped but flagged ``valid = False``; the learner weighs them zero.

The error scale: each action dimension is divided by a per-dimension ``scale`` before the RMSE,
so dimensions with different units count alike. ``dataset_scale`` gives the dataset's per-dim
standard deviation over valid steps (the default choice here: it also normalises a binary grip
of ±1, whose flip then costs (2 / std)² per step). A range (max - min) can be passed instead.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

INITS = ("kmeans++", "random")


# ---------------------------------------------------------------------------------------------
# k-means


def _sq_dist(x, c):  # [N, D], [K, D] -> [N, K]; exact (no expansion), N and K are small here
    return jnp.sum((x[:, None] - c[None]) ** 2, -1)


def _init_centroids(x, K, key, init):
    N = x.shape[0]
    if init == "random":  # K distinct samples
        return x[jax.random.choice(key, N, (K,), replace=False)]
    # k-means++ (Arthur & Vassilvitskii 2007): each next centre ∝ squared distance to the chosen
    k0, key = jax.random.split(key)
    c = jnp.zeros((K, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(k0, (), 0, N)])
    d2 = jnp.sum((x - c[0]) ** 2, -1)

    def body(k, carry):
        c, d2 = carry
        total = d2.sum()
        # all points on the chosen centres (e.g. identical samples): draw uniformly instead
        logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
        logits = jnp.where(total > 0, logits, 0.0)
        pick = x[jax.random.categorical(jax.random.fold_in(key, k), logits)]
        return c.at[k].set(pick), jnp.minimum(d2, jnp.sum((x - pick) ** 2, -1))

    return jax.lax.fori_loop(1, K, body, (c, d2))[0]


def _check(points, K, iters, init):
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"kmeans: iters must be an int >= 0, got {iters!r}")
    if points.ndim != 2:
        raise ValueError(f"kmeans: points must be [N, D], got shape {points.shape}")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= points.shape[0]:
        raise ValueError(f"kmeans: K must be an int with 1 <= K <= N={points.shape[0]}, got {K!r}")
    if init not in INITS:
        raise ValueError(f"kmeans: init must be one of {INITS}, got {init!r}")


@partial(jax.jit, static_argnames=("K", "iters", "init"))
def kmeans(points: jax.Array, K: int, key: jax.Array, iters: int = 20, init: str = "kmeans++"
           ) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means for a fixed number of iterations: points [N, D] -> (centroids [K, D],
    assignment i32 [N] to the nearest final centroid). An empty cluster keeps its centroid."""
    _check(points, K, iters, init)
    x = points.astype(jnp.float32)

    def step(_, c):
        onehot = jax.nn.one_hot(jnp.argmin(_sq_dist(x, c), 1), K, dtype=x.dtype)  # [N, K]
        count = onehot.sum(0)[:, None]
        return jnp.where(count > 0, (onehot.T @ x) / jnp.maximum(count, 1.0), c)

    c = jax.lax.fori_loop(0, iters, step, _init_centroids(x, K, key, init))
    return c, jnp.argmin(_sq_dist(x, c), 1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("K", "iters", "init"))
def kmeans_representatives(points: jax.Array, K: int, key: jax.Array, iters: int = 20,
                           init: str = "kmeans++") -> tuple[jax.Array, jax.Array]:
    """Per cluster, the index of its member nearest its centroid: points [N, D] -> (rep i32 [K],
    assignment i32 [N]). An empty cluster's representative is the sample nearest its (kept)
    centroid, which then also belongs to another cluster: a duplicate whose pairs are ties."""
    c, assign = kmeans(points, K, key, iters, init)
    d2 = _sq_dist(points.astype(jnp.float32), c)  # [N, K]
    member = assign[:, None] == jnp.arange(K)[None]
    has = member.any(0)
    rep = jnp.argmin(jnp.where(member | ~has[None], d2, jnp.inf), 0)
    return rep.astype(jnp.int32), assign


# ---------------------------------------------------------------------------------------------
# errors and pairs


def dataset_scale(actions: jax.Array, valid: jax.Array | None = None, eps: float = 1e-3
                  ) -> jax.Array:
    """Per action dim, the std of the dataset's actions over valid steps: actions [..., A],
    valid bool [...] -> [A], floored at ``eps`` so a constant dim does not divide by 0."""
    a = actions.reshape(-1, actions.shape[-1]).astype(jnp.float32)
    w = jnp.ones(a.shape[0]) if valid is None else valid.reshape(-1).astype(jnp.float32)
    w = (w / jnp.maximum(w.sum(), 1.0))[:, None]
    mean = jnp.sum(w * a, 0)
    return jnp.maximum(jnp.sqrt(jnp.sum(w * (a - mean) ** 2, 0)), eps)


def normalised_rmse(chunks: jax.Array, reference: jax.Array, scale: jax.Array,
                    valid: jax.Array | None = None) -> jax.Array:
    """RMSE to the reference over the valid steps, each dim divided by its scale:
    chunks [..., H, A], reference [H, A], scale [A], valid bool [H] (the reference chunk's
    real steps, ``Dataset.chunks``' ``valid``; None = all) -> [...]. With scale 1 it is the
    plain RMSE that the scaling study's oracle ranks by."""
    sq = jnp.mean(((chunks - reference) / scale) ** 2, -1)  # [..., H]
    v = jnp.ones(sq.shape[-1]) if valid is None else valid.astype(sq.dtype)
    return jnp.sqrt(jnp.sum(sq * v, -1) / jnp.maximum(v.sum(), 1.0))


def preference_pairs(candidates: jax.Array, reference: jax.Array, scale: jax.Array,
                     valid: jax.Array | None = None) -> dict:
    """All K (K - 1) / 2 unordered pairs of candidates [K, H, A], each ordered winner first by
    lower normalised RMSE -> dict of P = K (K - 1) / 2 entries: win, lose i32 [P] (indices into
    candidates), e_w <= e_l f32 [P], valid bool [P] (False for a tie, e_w == e_l, whose winner
    is then the lower index). Pairs run i < j in row-major order."""
    i, j = (jnp.asarray(t, jnp.int32) for t in np.triu_indices(candidates.shape[0], 1))
    e = normalised_rmse(candidates, reference, scale, valid)  # [K]
    first = e[i] <= e[j]
    return {"win": jnp.where(first, i, j), "lose": jnp.where(first, j, i),
            "e_w": jnp.minimum(e[i], e[j]), "e_l": jnp.maximum(e[i], e[j]),
            "valid": e[i] != e[j]}


@partial(jax.jit, static_argnames=("K", "iters", "init"))
def synthetic_preferences(samples: jax.Array, reference: jax.Array, scale: jax.Array,
                          key: jax.Array, K: int = 4, valid: jax.Array | None = None,
                          iters: int = 20, init: str = "kmeans++") -> dict:
    """One state's preferences: N policy samples [N, H, A] -> K representatives -> their pairs
    (``preference_pairs``, with win and lose indexing ``samples``) plus rep i32 [K]. Clustering
    runs on the scaled chunks, the same metric as the errors."""
    flat = (samples / scale).reshape(samples.shape[0], -1)
    rep, _ = kmeans_representatives(flat, K, key, iters, init)
    pairs = preference_pairs(samples[rep], reference, scale, valid)
    return {**pairs, "win": rep[pairs["win"]], "lose": rep[pairs["lose"]], "rep": rep}


def label_predictability(win: jax.Array, lose: jax.Array, references: jax.Array,
                         scale: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """How predictable a pair's label is when the reference is a random draw: win, lose [H, A],
    references [R, H, A] drawn like the reference was (e.g. more policy samples at the state,
    standing in for the data's conditional) -> the share of them under which ``win`` is the
    closer one (ties count half). A judge that knew that distribution exactly would be right on
    max(p, 1 - p) of such labels, so its mean over pairs caps the reachable accuracy."""
    e_w = normalised_rmse(references, win, scale, valid)  # RMSE is symmetric in its arguments
    e_l = normalised_rmse(references, lose, scale, valid)
    return jnp.mean((e_w < e_l) + 0.5 * (e_w == e_l), -1)

"""Statistics for result tables: Wilson intervals, power-law fits with bootstrap intervals, rank
correlation and the paired exact McNemar test. NumPy only (scipy is a dev dependency)."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z=1.96).

    ``n == 0`` carries no information, so the interval is the whole range (0, 1).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"successes/n: need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _loglog_fit(logn: np.ndarray, loge: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``log e = log a + b log N``; returns (a, b, r2 in log space)."""
    x_mean, y_mean = logn.mean(), loge.mean()
    sxx = np.sum((logn - x_mean) ** 2)
    b = np.sum((logn - x_mean) * (loge - y_mean)) / sxx
    log_a = y_mean - b * x_mean
    resid = loge - (log_a + b * logn)
    sst = np.sum((loge - y_mean) ** 2)
    r2 = 1.0 - np.sum(resid**2) / sst if sst > 0 else 1.0
    return float(np.exp(log_a)), float(b), float(r2)


# Exponents searched for the offset model; |b| near 0 makes N^b collinear with the offset.
_B_GRID = np.concatenate([-np.geomspace(8.0, 1e-3, 400), np.geomspace(1e-3, 8.0, 400)])


def _offset_sse(n: np.ndarray, e: np.ndarray, b: np.ndarray):
    """For each exponent in ``b``: the linear LS (c, a) of ``e = c + a N^b`` and its SSE."""
    x = n[None, :] ** b[:, None]  # [G, K]
    k = n.shape[0]
    sx, sy = x.sum(1), e.sum()
    sxx, sxy = (x * x).sum(1), (x * e[None]).sum(1)
    det = k * sxx - sx * sx
    det = np.where(np.abs(det) < 1e-300, np.nan, det)
    a = (k * sxy - sx * sy) / det
    c = (sy - a * sx) / k
    resid = e[None] - c[:, None] - a[:, None] * x
    sse = np.sum(resid**2, axis=1)
    return c, a, np.where(np.isfinite(sse), sse, np.inf)


def _offset_fit(n: np.ndarray, e: np.ndarray) -> tuple[float, float, float, float]:
    """``e = c + a N^b`` by a grid over b (exact linear LS for c, a) refined by golden section."""
    _, _, sse = _offset_sse(n, e, _B_GRID)
    i = int(np.argmin(sse))
    lo = _B_GRID[max(i - 1, 0)]
    hi = _B_GRID[min(i + 1, len(_B_GRID) - 1)]
    g = (math.sqrt(5) - 1) / 2
    f = lambda b: float(_offset_sse(n, e, np.array([b]))[2][0])
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(80):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = f(x2)
    b = (lo + hi) / 2
    c, a, sse = _offset_sse(n, e, np.array([b]))
    sst = np.sum((e - e.mean()) ** 2)
    r2 = 1.0 - sse[0] / sst if sst > 0 else 1.0
    return float(a[0]), float(b), float(c[0]), float(r2)


def _fit(n: np.ndarray, e: np.ndarray, offset: bool) -> dict:
    if offset:
        a, b, c, r2 = _offset_fit(n, e)
        return {"a": a, "b": b, "c": c, "r2": r2}
    if np.any(e <= 0):
        raise ValueError("e: a power law without offset needs positive errors (log-log fit)")
    a, b, r2 = _loglog_fit(np.log(n), np.log(e))
    return {"a": a, "b": b, "r2": r2}


def fit_power_law(
    N, e, offset: bool = False, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Fits ``e(N) = a·N^b`` (or ``c + a·N^b`` with ``offset=True``) with bootstrap intervals.

    ``e`` is either one curve [K] (bootstrap resamples points) or per-state curves [S, K]
    (bootstrap resamples states and fits their mean curve). Without offset the fit is least
    squares in log–log space and ``r2`` is measured there; with offset the fit is least squares
    in the original space and so is ``r2``. Returns a, b, (c), r2, a_ci, b_ci, (c_ci), n_boot.
    """
    n = np.asarray(N, dtype=np.float64)
    err = np.asarray(e, dtype=np.float64)
    if n.ndim != 1 or np.any(n <= 0):
        raise ValueError("N: expected a 1-D array of positive sample counts")
    if err.ndim not in (1, 2) or err.shape[-1] != n.shape[0]:
        raise ValueError(f"e: expected shape [{n.shape[0]}] or [S, {n.shape[0]}], got {err.shape}")
    min_points = 3 if offset else 2
    if len(np.unique(n)) < min_points:
        raise ValueError(f"N: need at least {min_points} distinct values for this fit")
    curve = err.mean(0) if err.ndim == 2 else err
    out = _fit(n, curve, offset)

    rng = np.random.default_rng(seed)
    keys = ["a", "b"] + (["c"] if offset else [])
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        if err.ndim == 2:
            rows = rng.integers(0, err.shape[0], err.shape[0])  # [S]
            n_b, e_b = n, err[rows].mean(0)
        else:
            idx = rng.integers(0, n.shape[0], n.shape[0])  # [K]
            n_b, e_b = n[idx], err[idx]
            if len(np.unique(n_b)) < min_points:
                continue  # degenerate resample: the fit is not identified
        try:
            fit = _fit(n_b, e_b, offset)
        except ValueError:
            continue
        for k in keys:
            samples[k].append(fit[k])
    alpha = (1.0 - level) / 2
    for k in keys:
        vals = np.asarray(samples[k])
        vals = vals[np.isfinite(vals)]
        if len(vals):
            q = np.quantile(vals, [alpha, 1 - alpha])
            out[f"{k}_ci"] = (float(q[0]), float(q[1]))
        else:
            out[f"{k}_ci"] = (float("nan"), float("nan"))
    out["n_boot"] = len(samples["b"])
    return out


def rankdata(x) -> np.ndarray:
    """Ranks starting at 1, ties get the average of their ranks (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values.
    new = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [len(x)]])
    avg = (starts + ends - 1) / 2.0 + 1.0  # mean of ranks start+1 .. end
    run_id = np.cumsum(new) - 1
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation with averaged ties; NaN when either input is constant."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D arrays of equal length, got {x.shape}, {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic, one final division)."""
    if n < 0:
        raise ValueError(f"n: need n >= 0, got {n}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar(a, b) -> dict:
    """Paired exact McNemar test of two per-episode success vectors (same initial states).

    ``n10`` counts episodes where ``a`` succeeds and ``b`` fails, ``n01`` the reverse. Under the
    null the discordant pairs split 50/50, so the two-sided exact p-value is
    ``min(1, 2·BinomCDF(min(n10, n01); n10 + n01, 1/2))`` (1 when there are no discordant pairs).
    Returns n, n10, n01, n11, n00, rate_a, rate_b, diff (rate_a - rate_b) and p_value.
    """
    x = np.asarray(a).astype(bool)
    y = np.asarray(b).astype(bool)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"a, b: expected two 1-D vectors of equal length, got {x.shape}, "
                         f"{y.shape}")
    n = int(x.size)
    n10, n01 = int(np.sum(x & ~y)), int(np.sum(~x & y))
    d = n10 + n01
    p = 1.0 if d == 0 else min(1.0, 2.0 * binom_cdf_half(min(n10, n01), d))
    rate_a = float(x.mean()) if n else float("nan")
    rate_b = float(y.mean()) if n else float("nan")
    return {"n": n, "n10": n10, "n01": n01, "n11": int(np.sum(x & y)),
            "n00": int(np.sum(~x & ~y)), "rate_a": rate_a, "rate_b": rate_b,
            "diff": rate_a - rate_b, "p_value": p}

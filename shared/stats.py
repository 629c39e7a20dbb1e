"""How sure a results table is: bootstrap CIs over users, paired differences, permutation tests.

The unit of sampling is the user: users are drawn from a population, their queries are not
independent of each other (one user's habit shapes all their answers). So a resample draws users
with replacement and pools *all* the queries of the drawn users, and the metric is recomputed on
that pool exactly as the point estimate is (LaMP's scorers pool over queries; shared/metrics.py).

Resampling is index arithmetic, not rescoring. Every LaMP metric is a function of sums over
queries: accuracy, MAE and ROUGE are means of per-query values, RMSE is the root of a mean of
squares (metrics.ROOT_MEAN_SQUARE), and macro-F1 is computed from per-label true/false positive
and false negative counts, which are sums too. So each query is scored once into a row of
*contributions*; a user's row sums them; a resample is a vector of user multiplicities w and its
pooled metric is pool(w @ sums, w @ counts). 40 users x 2000 resamples is one small matrix product.

A comparison of method A with reference B on the same users and queries uses the same resampled
users for both (the CI of the paired gain), and a paired permutation test: under the null that A
and B are exchangeable, swapping A's and B's answers for any user leaves the distribution of the
pooled gain unchanged. Swaps are enumerated exactly when 2^users is small, otherwise drawn.

Gains are signed by metrics.gain: positive = A is better, whatever the metric's direction.

Only numpy (and shared.metrics) is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from . import metrics

ScoreFn = Callable[[Sequence[str], Sequence[str]], Mapping[str, float]]
PerUser = Sequence[Sequence[str]] | Mapping[str, Sequence[str]]


class CI(NamedTuple):
    """A pooled score on all data (`mean`) and the bounds of its bootstrap interval."""

    mean: float
    lo: float
    hi: float


class Difference(NamedTuple):
    """Paired gain of A over B (positive = A better), its bootstrap interval and two-sided p."""

    gain: float
    lo: float
    hi: float
    p: float


# ---------------------------------------------------------------------------------------------
# A scorer split into per-query contributions and a pooling rule


@dataclass(frozen=True)
class PooledScorer:
    """A LaMP scorer as per-query contributions (rows of `contributions(preds, golds)`) plus the
    rule that turns their sums over any set of queries into that set's pooled scores.

    Calling it scores like the task itself: `PooledScorer(preds, golds) == task.score(...)`.
    """

    names: tuple[str, ...]
    contributions: Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (queries, k)
    pool: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]  # sums (..., k), counts (...)

    def __call__(self, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
        c = self.contributions(preds, golds)
        return {k: float(v) for k, v in self.pool(c.sum(axis=0), np.float64(len(c))).items()}


def _mean_pool(names: tuple[str, ...]) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    def pool(sums: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for j, name in enumerate(names):
            mean = sums[..., j] / counts
            out[name] = np.sqrt(mean) if name in metrics.ROOT_MEAN_SQUARE else mean
        return out

    return pool


def _classification(labels: Sequence[str]) -> PooledScorer:
    labels = list(labels)
    n = len(labels)

    def contributions(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
        # Columns: correct, then per label tp, fp, fn: everything macro-F1 needs, as sums.
        p, g = metrics.label_indices(preds, golds, labels)
        ks = np.arange(n)
        tp = (p[:, None] == ks) & (g[:, None] == ks)
        fp = (p[:, None] == ks) & (g[:, None] != ks)
        fn = (p[:, None] != ks) & (g[:, None] == ks)
        return np.concatenate([(p == g)[:, None], tp, fp, fn], axis=1).astype(np.float64)

    def pool(sums: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        tp, fp, fn = sums[..., 1:1 + n], sums[..., 1 + n:1 + 2 * n], sums[..., 1 + 2 * n:]
        denom = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)  # 0 for an absent label
        return {"accuracy": sums[..., 0] / counts, "f1": f1.mean(axis=-1) if n else np.zeros_like(counts)}

    return PooledScorer(("accuracy", "f1"), contributions, pool)


def _regression(scale: tuple[int, int]) -> PooledScorer:
    names = ("mae", "rmse")

    def contributions(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
        err = metrics.rating_errors(preds, golds, scale)
        # Each metric's per-query term: |e| pools as a mean; e^2 as the root of a mean.
        return np.stack([np.abs(err) if n not in metrics.ROOT_MEAN_SQUARE else err**2 for n in names], axis=1)

    return PooledScorer(names, contributions, _mean_pool(names))


def _generation() -> PooledScorer:
    names = ("rouge-1", "rouge-L")

    def contributions(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
        per = metrics.rouge_per_query(preds, golds)
        return np.stack([per[n] for n in names], axis=1)

    return PooledScorer(names, contributions, _mean_pool(names))


def pooled_scorer(task: Any) -> PooledScorer:
    """The PooledScorer of a task (anything with `.kind` and, for classification, `.labels`)."""
    if task.kind == "classification":
        return _classification(task.labels or ())
    if task.kind == "regression":
        return _regression(getattr(task, "scale", (1, 5)))
    if task.kind == "generation":
        return _generation()
    raise ValueError(f"shared/stats.py: no pooled scorer for task kind {task.kind!r}")


# ---------------------------------------------------------------------------------------------
# Users and resamples


def _users(per_user_preds: PerUser, per_user_golds: PerUser) -> tuple[list[list[str]], list[list[str]]]:
    """Aligned per-user lists; a mapping is aligned by user id. Users without queries are left out
    (they have nothing to score, and a resample of them would divide by zero)."""
    if isinstance(per_user_preds, Mapping):
        if not isinstance(per_user_golds, Mapping) or set(per_user_preds) != set(per_user_golds):
            raise ValueError("shared/stats.py: predictions and golds must be keyed by the same users")
        keys = list(per_user_preds)
        preds = [list(per_user_preds[k]) for k in keys]
        golds = [list(per_user_golds[k]) for k in keys]
    else:
        preds = [list(p) for p in per_user_preds]
        golds = [list(g) for g in (per_user_golds.values() if isinstance(per_user_golds, Mapping) else per_user_golds)]
    if len(preds) != len(golds):
        raise ValueError(f"shared/stats.py: {len(preds)} users with predictions but {len(golds)} with golds")
    for i, (p, g) in enumerate(zip(preds, golds)):
        if len(p) != len(g):
            raise ValueError(f"shared/stats.py: user #{i} has {len(p)} predictions but {len(g)} golds")
    kept = [(p, g) for p, g in zip(preds, golds) if g]
    if not kept:
        raise ValueError("shared/stats.py: no user has a query to score")
    return [p for p, _ in kept], [g for _, g in kept]


def resample_users(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_users) indices of users drawn with replacement. The same seed gives the same
    resamples, so every method of a run is measured on the same bootstrap worlds."""
    return np.random.default_rng(seed).integers(0, n_users, size=(n_boot, n_users))


def _multiplicities(draws: np.ndarray, n_users: int) -> np.ndarray:
    w = np.zeros((draws.shape[0], n_users), dtype=np.float64)
    np.add.at(w, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return w


def swaps(n_users: int, n_perm: int, seed: int) -> tuple[np.ndarray, bool]:
    """(rows, n_users) 0/1 matrix, 1 = swap that user's answers; and whether it is exact (all
    2^n_users swap patterns, when that is no more than n_perm) rather than n_perm random ones."""
    if n_users < 63 and 2**n_users <= n_perm:
        return ((np.arange(2**n_users)[:, None] >> np.arange(n_users)) & 1).astype(np.float64), True
    return np.random.default_rng([seed, 1]).integers(0, 2, size=(n_perm, n_users)).astype(np.float64), False


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _p_value(observed: float, permuted: np.ndarray, exact: bool) -> float:
    # A little slack so a permutation that reproduces the observed gain up to rounding counts.
    hits = int(np.sum(np.abs(permuted) >= abs(observed) - 1e-12 * max(1.0, abs(observed))))
    # Exact: the identity is one of the enumerated patterns. Drawn: add it (Phipson & Smyth 2010),
    # so p is never 0.
    return hits / len(permuted) if exact else (hits + 1) / (len(permuted) + 1)


# ---------------------------------------------------------------------------------------------
# Per-user sums: the fast path


@dataclass(frozen=True)
class UserSums:
    """One method's contributions summed per user: sums (users, k), counts (users,)."""

    sums: np.ndarray
    counts: np.ndarray


def user_sums(scorer: PooledScorer, per_user_preds: Sequence[Sequence[str]],
              per_user_golds: Sequence[Sequence[str]]) -> UserSums:
    """Score every query once (for ROUGE the only expensive step) and sum per user."""
    flat_p = [p for ps in per_user_preds for p in ps]
    flat_g = [g for gs in per_user_golds for g in gs]
    counts = np.asarray([len(g) for g in per_user_golds], dtype=np.float64)
    c = scorer.contributions(flat_p, flat_g)
    owner = np.repeat(np.arange(len(counts)), counts.astype(np.int64))
    sums = np.zeros((len(counts), c.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, c)
    return UserSums(sums, counts)


def _ci_from_sums(scorer: PooledScorer, s: UserSums, w: np.ndarray, alpha: float) -> dict[str, CI]:
    point = scorer.pool(s.sums.sum(axis=0), s.counts.sum())
    boot = scorer.pool(w @ s.sums, w @ s.counts)
    return {k: CI(float(point[k]), *_interval(boot[k], alpha)) for k in scorer.names}


def _diff_from_sums(scorer: PooledScorer, a: UserSums, b: UserSums, w: np.ndarray, signs: np.ndarray,
                    exact: bool, alpha: float) -> dict[str, Difference]:
    if not np.array_equal(a.counts, b.counts):
        raise ValueError("shared/stats.py: a paired comparison needs both methods on the same users' queries")
    n = a.counts.sum()
    pa, pb = scorer.pool(a.sums.sum(axis=0), n), scorer.pool(b.sums.sum(axis=0), n)
    ba, bb = scorer.pool(w @ a.sums, w @ a.counts), scorer.pool(w @ b.sums, w @ b.counts)
    # Swapping user u moves (b_u - a_u) from B's pool into A's; the counts do not change.
    delta = signs @ (b.sums - a.sums)
    qa = scorer.pool(a.sums.sum(axis=0) + delta, n)
    qb = scorer.pool(b.sums.sum(axis=0) - delta, n)
    out = {}
    for k in scorer.names:
        g = float(metrics.gain(pa[k], pb[k], k))
        lo, hi = _interval(metrics.gain(ba[k], bb[k], k), alpha)
        out[k] = Difference(g, lo, hi, _p_value(g, metrics.gain(qa[k], qb[k], k), exact))
    return out


# ---------------------------------------------------------------------------------------------
# Public entry points


def bootstrap_ci(per_user_preds: PerUser, per_user_golds: PerUser, score_fn: ScoreFn | PooledScorer, *,
                 n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, CI]:
    """Per metric: the pooled score on all users' queries and its (1 - alpha) percentile bootstrap
    interval over users (users drawn with replacement, their queries pooled, rescored).

    `score_fn(preds, golds) -> {metric: value}` is the task's scorer. A PooledScorer
    (`pooled_scorer(task)`) resamples by index arithmetic; any other callable is called on every
    resample's pooled queries (same resamples, same result, slower).
    """
    preds, golds = _users(per_user_preds, per_user_golds)
    draws = resample_users(len(preds), n_boot, seed)
    if isinstance(score_fn, PooledScorer):
        return _ci_from_sums(score_fn, user_sums(score_fn, preds, golds), _multiplicities(draws, len(preds)), alpha)
    point = score_fn([p for ps in preds for p in ps], [g for gs in golds for g in gs])
    boot: dict[str, list[float]] = {k: [] for k in point}
    for row in draws:
        s = score_fn([p for u in row for p in preds[u]], [g for u in row for g in golds[u]])
        for k in point:
            boot[k].append(s[k])
    return {k: CI(float(point[k]), *_interval(np.asarray(boot[k]), alpha)) for k in point}


def paired_difference(per_user_preds_a: PerUser, per_user_preds_b: PerUser, per_user_golds: PerUser,
                      score_fn: ScoreFn | PooledScorer, *, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, Difference]:
    """Per metric: the pooled gain of A over reference B on the same users and queries (positive =
    A better, metrics.gain), its bootstrap interval (the same resampled users for A and B) and a
    two-sided paired permutation p-value (per user, A's and B's answers swapped at random; all
    2^users patterns when that is at most n_perm)."""
    preds_a, golds = _users(per_user_preds_a, per_user_golds)
    preds_b, _ = _users(per_user_preds_b, per_user_golds)
    if len(preds_a) != len(preds_b) or any(len(x) != len(y) for x, y in zip(preds_a, preds_b)):
        raise ValueError("shared/stats.py: A and B must answer the same users' queries")
    n_users = len(golds)
    draws = resample_users(n_users, n_boot, seed)
    signs, exact = swaps(n_users, n_perm, seed)
    if isinstance(score_fn, PooledScorer):
        a, b = user_sums(score_fn, preds_a, golds), user_sums(score_fn, preds_b, golds)
        return _diff_from_sums(score_fn, a, b, _multiplicities(draws, n_users), signs, exact, alpha)

    def pooled(rows: Sequence[int], source: Sequence[Sequence[str]]) -> Mapping[str, float]:
        return score_fn([p for u in rows for p in source[u]], [g for u in rows for g in golds[u]])

    everyone = range(n_users)
    pa, pb = pooled(everyone, preds_a), pooled(everyone, preds_b)
    names = list(pa)
    boot: dict[str, list[float]] = {k: [] for k in names}
    for row in draws:
        sa, sb = pooled(row, preds_a), pooled(row, preds_b)
        for k in names:
            boot[k].append(metrics.gain(sa[k], sb[k], k))
    perm: dict[str, list[float]] = {k: [] for k in names}
    for s in signs:
        qa = pooled(everyone, [preds_b[u] if s[u] else preds_a[u] for u in everyone])
        qb = pooled(everyone, [preds_a[u] if s[u] else preds_b[u] for u in everyone])
        for k in names:
            perm[k].append(metrics.gain(qa[k], qb[k], k))
    out = {}
    for k in names:
        g = float(metrics.gain(pa[k], pb[k], k))
        out[k] = Difference(g, *_interval(np.asarray(boot[k]), alpha), _p_value(g, np.asarray(perm[k]), exact))
    return out


def compare_methods(scorer: PooledScorer, preds: Mapping[str, Sequence[Sequence[str]]],
                    golds: Sequence[Sequence[str]], references: Sequence[str], *, n_boot: int = 2000,
                    n_perm: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Every method's CI, and its paired difference against each reference, on one set of users.

    `preds[method]` and `golds` are per-user lists in the same user and query order. Every query is
    scored once per method; all methods share the same resampled users and the same swap patterns.
    Returns plain JSON-able data:
      {"users", "queries", "n_boot", "n_perm", "alpha", "seed", "permutation": "exact"|"random",
       "ci": {method: {metric: {"mean", "lo", "hi"}}},
       "vs": {reference: {method: {metric: {"gain", "lo", "hi", "p"}}}}}
    """
    names = list(preds)
    if not names:
        raise ValueError("shared/stats.py: no methods to compare")
    aligned = {m: _users(preds[m], golds) for m in names}
    g = aligned[names[0]][1]
    sums = {m: user_sums(scorer, aligned[m][0], aligned[m][1]) for m in names}
    n_users = len(g)
    w = _multiplicities(resample_users(n_users, n_boot, seed), n_users)
    signs, exact = swaps(n_users, n_perm, seed)
    out: dict[str, Any] = {"users": n_users, "queries": int(sum(len(x) for x in g)), "n_boot": n_boot,
                           "n_perm": len(signs), "alpha": alpha, "seed": seed,
                           "permutation": "exact" if exact else "random", "ci": {}, "vs": {}}
    for m in names:
        out["ci"][m] = {k: v._asdict() for k, v in _ci_from_sums(scorer, sums[m], w, alpha).items()}
    for ref in references:
        if ref not in sums:
            continue
        out["vs"][ref] = {m: {k: v._asdict() for k, v in
                              _diff_from_sums(scorer, sums[m], sums[ref], w, signs, exact, alpha).items()}
                          for m in names}
    return out


def significant(diff: Mapping[str, float]) -> bool:
    """Whether a difference's interval excludes zero."""
    return diff["lo"] > 0 or diff["hi"] < 0

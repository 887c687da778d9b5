"""Paired bootstrap over the holdout's users, for the gate (evaluation/gate.py).

Each resample draws the holdout's users with replacement (seeded by
``gate.bootstrap_seed``); candidate and champion are scored on the same
resample (paired). A resample is a count per user, and every metric is
computed in its weighted form from quantities prepared once (per-user sums,
score order), so 1000 resamples cost little more than a few passes over the
rows. :func:`rows_bootstrap` of one resample equals the metrics.py function
on that resample's rows (tests/test_gate_evidence.py holds it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .gate import LOWER_IS_BETTER, RANKING, parse_metric
from .metrics import auc, ranking_metrics

if TYPE_CHECKING:
    from ..config import GateConfig

Stat = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def paired_bootstrap(n_users: int, stat: Stat, metric: str, cfg: "GateConfig", chunk: int = 50) -> dict[str, Any]:
    """P(the candidate is worse than the champion minus the tolerance) over
    ``cfg.bootstrap_samples`` resamples (with replacement, seeded) of the
    ``n_users`` holdout users. ``stat(counts)``: ``counts[b, u]`` is how often
    resample b drew user u; it returns the candidate's and the champion's value
    per resample (the same users for both: paired). Resamples where either
    value is NaN are not counted (``samples``: those that were); none
    counted: ``p_worse`` None."""
    rng = np.random.default_rng(cfg.bootstrap_seed)
    lower = parse_metric(metric)[0] in LOWER_IS_BETTER
    cands, champs = [], []
    left = cfg.bootstrap_samples if n_users else 0
    while left > 0:
        b = min(chunk, left)
        draws = rng.integers(0, n_users, (b, n_users)) + np.arange(b)[:, None] * n_users
        c, ch = stat(np.bincount(draws.ravel(), minlength=b * n_users).reshape(b, n_users).astype(np.float64))
        cands.append(c)
        champs.append(ch)
        left -= b
    c = np.concatenate(cands) if cands else np.zeros(0)
    ch = np.concatenate(champs) if champs else np.zeros(0)
    ok = ~(np.isnan(c) | np.isnan(ch))
    c, ch = c[ok], ch[ok]
    if not len(c):
        return {"p_worse": None, "samples": 0, "diff_ci": None}
    tol = cfg.tolerance * (np.abs(ch) if cfg.tolerance_kind == "relative" else 1.0)
    worse = c > ch + tol if lower else c < ch - tol
    return {"p_worse": round(float(worse.mean()), 4), "samples": int(len(c)),
            "diff_ci": [round(float(q), 6) for q in np.quantile(c - ch, [0.025, 0.975])]}


def per_user_bootstrap(candidate: np.ndarray, champion: np.ndarray, metric: str,
                       cfg: "GateConfig") -> dict[str, Any]:
    """:func:`paired_bootstrap` of a metric that is a mean over users
    (ndcg@K, hr@K, …): ``candidate[u]`` / ``champion[u]`` are user u's values."""
    cand, champ = np.asarray(candidate, dtype=np.float64), np.asarray(champion, dtype=np.float64)
    n = len(cand)
    return paired_bootstrap(n, lambda w: (w @ cand / n, w @ champ / n), metric, cfg)


def rows_bootstrap(users: np.ndarray, labels: np.ndarray, candidate: np.ndarray, champion: np.ndarray,
                   metric: str, cfg: "GateConfig") -> dict[str, Any]:
    """:func:`paired_bootstrap` of a metric over rows (``candidate`` /
    ``champion``: scores for auc and gauc, probabilities for logloss): a
    resample weighs every row of a user by how often the user was drawn, the
    metric's weighted form (gauc: each user's AUC, weighted by rows × draws)."""
    base = parse_metric(metric)[0]
    _, user_of_row = np.unique(users, return_inverse=True)
    n = int(user_of_row.max()) + 1 if len(user_of_row) else 0
    y = labels.astype(np.float64)
    rows = np.bincount(user_of_row, minlength=n).astype(np.float64)
    if base == "logloss":  # a weighted mean of per-row losses: per user, their sum
        eps = 1e-7
        sums = [np.bincount(user_of_row, weights=-(y * np.log(np.clip(p, eps, 1 - eps))
                                                   + (1 - y) * np.log(np.clip(1 - p, eps, 1 - eps))), minlength=n)
                for p in (candidate, champion)]
        return paired_bootstrap(n, lambda w: (w @ sums[0] / (w @ rows), w @ sums[1] / (w @ rows)), metric, cfg)
    if base == "gauc":
        per = [_per_user_auc(user_of_row, n, y, s) for s in (candidate, champion)]
        valid = [np.where(np.isnan(a), 0.0, rows) for a in per]
        return paired_bootstrap(n, lambda w: tuple(
            (w @ (v * np.nan_to_num(a))) / np.where(w @ v > 0, w @ v, np.nan) for a, v in zip(per, valid)),
            metric, cfg)
    ranked = [_ranked(s, y, user_of_row) for s in (candidate, champion)]
    return paired_bootstrap(n, lambda w: tuple(_weighted_auc(r, w) for r in ranked), metric, cfg)


def _ranked(scores: np.ndarray, y: np.ndarray, user_of_row: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row's user and label in score order, and its tie group's first
    and last position (what :func:`_weighted_auc` needs, computed once)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    new = np.r_[True, s[1:] != s[:-1]]
    start = np.maximum.accumulate(np.where(new, np.arange(len(s)), 0))
    last = np.minimum.accumulate(np.where(np.r_[new[1:], True], np.arange(len(s)), len(s))[::-1])[::-1]
    return user_of_row[order], y[order], start, last


def _weighted_auc(ranked, w: np.ndarray) -> np.ndarray:
    """metrics.auc (ties count one half) under each resample's user counts
    ``w`` (b, users), a row weighing its user's count; NaN with one class."""
    user, y, start, last = ranked
    w = w[:, user]
    pos, neg = w * y, w * (1 - y)
    cum = np.cumsum(neg, axis=1)
    below = np.where(start > 0, cum[:, np.maximum(start - 1, 0)], 0.0)  # negatives in lower tie groups
    tied = cum[:, last] - below
    P, N = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((P > 0) & (N > 0), (pos * (below + 0.5 * tied)).sum(axis=1) / (P * N), np.nan)


def _per_user_auc(user_of_row: np.ndarray, n: int, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    order = np.argsort(user_of_row, kind="stable")
    bounds = np.searchsorted(user_of_row[order], np.arange(n + 1))
    return np.array([_auc_or_nan(y[order[a:b]], s[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])])


def bootstrap_metrics(metrics: list[str], cand: dict[str, Any], champ: dict[str, Any], labels: np.ndarray,
                      users: np.ndarray, gate: "GateConfig") -> dict[str, dict[str, Any]]:
    """:func:`paired_bootstrap` of every metric from what :func:`evaluate_models`
    kept per role (scores / probs on every row; top-k and relevant sets)."""
    res: dict[str, dict[str, Any]] = {}
    per_user: dict[tuple[int, int], list[dict[str, float]]] = {}  # (role, k) → each user's ranking metrics
    for m in metrics:
        base, k = parse_metric(m)
        if base in RANKING:
            if "top" not in cand or "top" not in champ:
                continue
            for i, r in enumerate((cand, champ)):
                if (i, k) not in per_user:
                    per_user[(i, k)] = [ranking_metrics(r["top"][u:u + 1], [r["relevant"][u]],
                                                        min(k, r["top"].shape[1])) for u in range(len(r["relevant"]))]
            res[m] = per_user_bootstrap(np.array([v[base] for v in per_user[(0, k)]]),
                                        np.array([v[base] for v in per_user[(1, k)]]), m, gate)
            continue
        key = "probs" if base == "logloss" else "scores"
        res[m] = rows_bootstrap(users, labels, cand[key], champ[key], m, gate)
    return res


def _auc_or_nan(y: np.ndarray, s: np.ndarray) -> float:
    try:
        return auc(y, s)
    except ValueError:  # a user with one class only: no AUC, left out of gauc
        return float("nan")

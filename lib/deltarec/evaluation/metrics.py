"""Recommendation / CTR metrics on numpy arrays (Python floats out, vectorised),
and the boolean row masks of the gate's slices. The pipeline scores on the
driver after one collect of tonight's rows, so there is no Spark version.

Labels are binary 0/1 (bools accepted). Scores only need to order examples;
probabilities must lie in [0, 1].
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

__all__ = ["auc", "logloss", "gauc", "ranking_metrics", "topk_from_scores", "slice_masks"]


# ----------------------------------------------------------------- validation
def _first_bad(mask: np.ndarray, arr: np.ndarray, name: str, what: str) -> None:
    if mask.any():
        i = int(np.flatnonzero(mask)[0])
        raise ValueError(f"{name} {what}, got {arr[i].item()!r} at index {i} ({int(mask.sum())} bad values)")


def _vec(x: Any, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has length {len(a)}, expected {n} (same as labels)")
    return a


def _labels(labels: Any) -> np.ndarray:
    y = _vec(labels, "labels")
    if len(y) == 0:
        raise ValueError("labels is empty")
    if y.dtype == bool:
        return y.astype(np.float64)
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"labels must be numeric 0/1, got dtype {y.dtype}")
    _first_bad(~((y == 0) | (y == 1)), y, "labels", "must be 0 or 1")
    return y.astype(np.float64)


def _scores(x: Any, name: str, n: int, prob: bool = False) -> np.ndarray:
    s = _vec(x, name, n).astype(np.float64)
    _first_bad(np.isnan(s), s, name, "must not be NaN")
    if prob:
        _first_bad((s < 0) | (s > 1), s, name, "must be probabilities in [0, 1]")
    return s


def _weights(w: Any, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n)
    w = _vec(w, "weights", n).astype(np.float64)
    _first_bad(~np.isfinite(w) | (w < 0), w, "weights", "must be finite and >= 0")
    return w


# ----------------------------------------------------------------- in-process
def auc(labels: Any, scores: Any, weights: Any = None) -> float:
    """ROC AUC: probability that a random positive scores above a random negative.

    Tied scores count one half (Mann-Whitney U / trapezoidal ROC, identical to
    ``sklearn.metrics.roc_auc_score``); optional non-negative sample weights.
    Raises ValueError if only one class is present (AUC is undefined).
    """
    y = _labels(labels)
    s = _scores(scores, "scores", len(y))
    w = _weights(weights, len(y))
    _, inv = np.unique(s, return_inverse=True)  # tie groups, ascending score
    pos = np.bincount(inv, weights=w * y)
    neg = np.bincount(inv, weights=w * (1 - y))
    P, N = pos.sum(), neg.sum()
    if P == 0 or N == 0:
        raise ValueError(f"AUC is undefined with only one class present: {P:g} positive and "
                         f"{N:g} negative (weighted) examples")
    neg_below = np.cumsum(neg) - neg
    return float(pos @ (neg_below + 0.5 * neg) / (P * N))


def logloss(labels: Any, probs: Any, eps: float = 1e-7, weights: Any = None) -> float:
    """Mean binary cross-entropy ``-[y log p + (1-y) log(1-p)]`` (weighted mean if weights).

    Probabilities are clipped to ``[eps, 1-eps]`` first, as sklearn's ``log_loss``
    does (sklearn uses the dtype's machine epsilon instead of ``eps``).
    """
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps!r}")
    y = _labels(labels)
    p = np.clip(_scores(probs, "probs", len(y), prob=True), eps, 1 - eps)
    w = _weights(weights, len(y))
    if w.sum() == 0:
        raise ValueError("weights sum to 0")
    with np.errstate(divide="ignore"):  # eps=0 with p in {0,1} -> inf, as it should
        loss = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    return float(np.average(loss, weights=w))


def gauc(users: Any, labels: Any, scores: Any) -> float:
    """Group AUC: per-user AUC averaged with each user's number of examples as weight.

    ``GAUC = sum_u n_u * AUC_u / sum_u n_u`` over users that have both a positive
    and a negative example; users with a single class are skipped (their AUC is
    undefined). Ties count one half, as in :func:`auc`. Returns nan if no user
    has both classes.
    """
    y = _labels(labels)
    s = _scores(scores, "scores", len(y))
    _, u = np.unique(_vec(users, "users", len(y)), return_inverse=True)
    order = np.lexsort((s, u))  # by user, then ascending score
    u, s, y = u[order], s[order], y[order]
    start = np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])]  # new (user, score) group
    gid = np.cumsum(start) - 1
    g_user = u[start]
    pos, neg = np.bincount(gid, weights=y), np.bincount(gid, weights=1 - y)
    before = np.cumsum(neg) - neg  # negatives in earlier groups, across all users
    first = np.r_[True, g_user[1:] != g_user[:-1]]
    user_base = np.zeros(g_user.max() + 1)
    user_base[g_user[first]] = before[first]
    neg_below = before - user_base[g_user]  # negatives of the same user scored lower
    num = np.bincount(g_user, weights=pos * (neg_below + 0.5 * neg))
    P, N = np.bincount(u, weights=y), np.bincount(u, weights=1 - y)
    ok = (P > 0) & (N > 0)
    if not ok.any():
        return float("nan")
    n = (P + N)[ok]
    return float(np.sum(n * num[ok] / (P[ok] * N[ok])) / n.sum())


def _ideal_dcg(k: int) -> np.ndarray:
    """``out[m]`` = DCG of m hits at ranks 1..m, for m = 0..k."""
    return np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]


def ranking_metrics(topk_items: np.ndarray, relevant: Sequence[set[int]] | tuple[Any, Any],
                    k: int) -> dict[str, float]:
    """HR@k, NDCG@k, recall@k and MRR@k of top-K lists, averaged over users.

    ``topk_items[u]`` holds user u's recommended item ids, best first (only the
    first k columns are used); ``relevant`` is a list of per-user sets of relevant
    item ids, or a CSR pair ``(indptr, indices)`` with user u's items in
    ``indices[indptr[u]:indptr[u+1]]``. Per user, with binary relevance and
    ranks starting at 1:

    * hr: 1 if any relevant item is in the top k, else 0;
    * ndcg: DCG / IDCG with DCG = sum over hits of 1/log2(rank+1) and IDCG the
      DCG of min(|relevant|, k) hits at ranks 1, 2, ...;
    * recall: hits / |relevant|;
    * mrr: 1/rank of the first hit within the top k (cut off at k), 0 if none.

    Users with an empty relevant set are excluded from every average (all values
    are nan if no user has one). An item repeated in a row counts only at its
    first position, so padding such as -1 repeated is harmless.
    """
    top = np.asarray(topk_items)
    if top.ndim != 2 or not np.issubdtype(top.dtype, np.integer):
        raise ValueError(f"topk_items must be a 2-D integer array, got shape {top.shape} dtype {top.dtype}")
    U, K = top.shape
    if not 1 <= k <= K:
        raise ValueError(f"k must be in [1, {K}] (topk_items has {K} columns), got {k!r}")
    top = top[:, :k]
    if isinstance(relevant, tuple):
        indptr, indices = np.asarray(relevant[0], dtype=np.int64), np.asarray(relevant[1])
    else:
        lens = np.fromiter(map(len, relevant), dtype=np.int64, count=len(relevant))
        indptr = np.r_[0, np.cumsum(lens)]
        indices = np.fromiter(itertools.chain.from_iterable(relevant), dtype=np.int64, count=int(lens.sum()))
    if len(indptr) != U + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise ValueError(f"relevant must describe {U} users (one per topk_items row); got indptr of "
                         f"length {len(indptr)} over {len(indices)} indices")
    if len(indices) and not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"relevant item ids must be integers, got dtype {indices.dtype}")
    # Encode (user, item) pairs as int64 keys over a dense item vocabulary.
    vocab = np.unique(np.r_[top.ravel(), indices].astype(np.int64))
    rel_users = np.repeat(np.arange(U), np.diff(indptr))
    rel_keys = np.unique(rel_users * len(vocab) + np.searchsorted(vocab, indices))
    n_rel = np.bincount(rel_keys // len(vocab), minlength=U)
    top_keys = (np.arange(U)[:, None] * len(vocab) + np.searchsorted(vocab, top)).ravel()
    first_seen = np.zeros(top_keys.size, dtype=bool)
    first_seen[np.unique(top_keys, return_index=True)[1]] = True
    hits = (np.isin(top_keys, rel_keys) & first_seen).reshape(U, k)
    ok = n_rel > 0
    if not ok.any():
        return dict.fromkeys(("hr", "ndcg", "recall", "mrr"), float("nan"))
    hits, n_rel = hits[ok], n_rel[ok]
    n_hit = hits.sum(axis=1)
    dcg = hits @ (1.0 / np.log2(np.arange(2, k + 2)))
    mrr = np.where(n_hit > 0, 1.0 / (hits.argmax(axis=1) + 1), 0.0)
    return {"hr": float(np.mean(n_hit > 0)), "ndcg": float(np.mean(dcg / _ideal_dcg(k)[np.minimum(n_rel, k)])),
            "recall": float(np.mean(n_hit / n_rel)), "mrr": float(np.mean(mrr))}


def topk_from_scores(scores: np.ndarray, k: int, item_ids: Any = None) -> np.ndarray:
    """Indices (or ``item_ids[index]``) of each row's k highest scores, best first.

    Uses ``argpartition`` then sorts the k candidates; equal scores are ordered
    by lower column index, including at the k-th boundary, so the result is
    deterministic. ``-inf`` can mask items out; NaN is rejected.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (users, items), got shape {s.shape}")
    U, N = s.shape
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}] (scores has {N} columns), got {k!r}")
    neg = -s.astype(np.float64, copy=False)
    if np.isnan(neg).any():
        r, c = np.argwhere(np.isnan(neg))[0]
        raise ValueError(f"scores must not be NaN, got nan at row {r}, column {c}")
    cand = np.argpartition(neg, k - 1, axis=1)[:, :k]
    # Rows whose k-th value is tied with unselected items: argpartition picked
    # arbitrary ones among the ties, so redo those rows with a stable sort.
    vals = np.take_along_axis(neg, cand, axis=1)
    kth = vals.max(axis=1, keepdims=True)
    tied = (neg == kth).sum(axis=1) > (vals == kth).sum(axis=1)
    if tied.any():
        cand[tied] = np.argsort(neg[tied], axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(neg, cand, axis=1)
    idx = np.take_along_axis(cand, np.lexsort((cand, vals), axis=1), axis=1)
    if item_ids is None:
        return idx
    item_ids = np.asarray(item_ids)
    if item_ids.shape != (N,):
        raise ValueError(f"item_ids must have shape ({N},) to match scores, got {item_ids.shape}")
    return item_ids[idx]


# ---------------------------------------------------------------------- slices
def slice_masks(*, new_users: Any = None, new_items: Any = None, by: Any = None,
                by_name: str = "column") -> dict[str, np.ndarray]:
    """Boolean row masks of the standard slices: ``all``, ``new_users``,
    ``new_items`` (rows whose flag is true) and one ``{by_name}={value}`` per
    distinct value of ``by``. Give at least one array; all must have one length."""
    arrays = {k: np.asarray(v) for k, v in (("new_users", new_users), ("new_items", new_items), ("by", by))
              if v is not None}
    if not arrays:
        raise ValueError("slice_masks needs at least one of new_users, new_items, by")
    n = {len(v) for v in arrays.values()}
    if len(n) != 1:
        raise ValueError(f"slice arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
    out = {"all": np.ones(n.pop(), dtype=bool)}
    for name in ("new_users", "new_items"):
        if name in arrays:
            out[name] = arrays[name].astype(bool)
    if "by" in arrays:
        for value in np.unique(arrays["by"]):
            out[f"{by_name}={value}"] = arrays["by"] == value
    return out

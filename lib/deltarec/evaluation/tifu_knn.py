"""TIFU-KNN: time-decayed personal item frequencies blended with the customer's
nearest neighbours' (Hu, He, Gao, Zhang: "Modeling Personalized Item
Frequency Information for Next-basket Recommendation", SIGIR 2020).

The strong published baseline for repeat-heavy next-basket data, as the
authors' code computes it:

1. A customer's baskets b_1..b_n (time order; a basket is one set of items:
   an item twice in one basket counts once) become binary vectors, basket j
   weighted ``within_decay ** (n - j)`` (the newest 1).
2. The baskets are split into ``groups`` consecutive groups as evenly as
   possible (the newer groups take the extra basket); with fewer baskets than
   groups each basket is a group. A group's vector is the mean of its
   baskets'.
3. The customer's vector is ``sum_g group_decay ** (groups - 1 - g) * group_g
   / real_groups`` (g = 0 the oldest group, real_groups the number formed).
4. The score of item i: ``alpha * own[i] + (1 - alpha) * mean of the
   neighbours' vectors [i]``, the neighbours being the ``neighbours``
   customers nearest by Euclidean distance (the customer included when it has
   a history, as in the authors' code).

A customer without history has no vector and gets the tie-break alone (the
popularity list, as ``personal`` does). Dense numpy: customers × catalogue
floats (4,000 × 4,000 for Online Retail: 64 MB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TifuParams", "Baskets", "baskets_of", "vectors_of", "tifu_vectors", "tifu_scores", "neighbour_mean",
           "lexicographic_tie_break"]


@dataclass(frozen=True)
class TifuParams:
    groups: int = 7
    within_decay: float = 0.9
    group_decay: float = 0.7
    neighbours: int = 300
    alpha: float = 0.7

    def __post_init__(self):
        if self.groups < 1 or self.neighbours < 1:
            raise ValueError(f"TIFU-KNN groups and neighbours must be >= 1, got {self.groups}, {self.neighbours}")
        for name in ("within_decay", "group_decay", "alpha"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"TIFU-KNN {name} must lie in [0, 1], got {v}")


def _index(values: Any, universe: Any) -> np.ndarray:
    import pandas as pd

    return pd.Index(np.asarray(universe)).get_indexer(np.asarray(values))


@dataclass(frozen=True)
class Baskets:
    """A purchase history as baskets, ready for any TIFU-KNN parameters
    (computing it is most of :func:`tifu_vectors`' cost; tuning reuses it)."""

    ids: np.ndarray  # customer ids, sorted
    n_items: int  # catalogue size
    customer: np.ndarray  # per distinct (customer, basket): the customer's position
    ordinal: np.ndarray  # its basket's position in the customer's time order (0 the oldest)
    count: np.ndarray  # the customer's number of baskets
    entries: np.ndarray  # per distinct (customer, basket, item): (the basket's row above, item column)


def baskets_of(users: Any, items: Any, baskets: Any, catalog: Any) -> Baskets:
    """:class:`Baskets` from parallel arrays of purchase lines: customer, item,
    basket key (anything that orders a customer's baskets in time, e.g. the
    order's timestamp). Items outside ``catalog`` are not counted (they still
    make a basket); an item twice in a basket counts once."""
    users, items, baskets = np.asarray(users), np.asarray(items), np.asarray(baskets)
    if not (users.shape == items.shape == baskets.shape):
        raise ValueError(f"users, items and baskets must be parallel arrays, got shapes {users.shape}, "
                         f"{items.shape}, {baskets.shape}")
    ids, u = np.unique(users, return_inverse=True)
    if not len(users):
        z = np.zeros(0, np.int64)
        return Baskets(ids, len(catalog), z, z, z, np.zeros((0, 2), np.int64))
    _, b = np.unique(baskets, return_inverse=True)  # basket keys ordered
    nb = int(b.max()) + 1
    ub = np.unique(u.astype(np.int64) * nb + b)  # distinct (customer, basket), by customer then time
    customer = ub // nb
    n = np.bincount(customer, minlength=len(ids))
    ordinal = np.arange(len(ub)) - np.r_[0, np.cumsum(n)[:-1]][customer]
    line_basket = np.searchsorted(ub, u.astype(np.int64) * nb + b)
    col = _index(items, catalog)
    keep = col >= 0
    trip = np.unique(line_basket[keep].astype(np.int64) * len(catalog) + col[keep])
    return Baskets(ids, len(catalog), customer, ordinal, n[customer],
                   np.stack([trip // len(catalog), trip % len(catalog)], 1))


def vectors_of(h: Baskets, params: TifuParams) -> tuple[np.ndarray, np.ndarray]:
    """(customer ids sorted, customers × catalogue float64 vectors) of ``h``."""
    out = np.zeros((len(h.ids), h.n_items))
    if not len(h.entries):
        return h.ids, out
    G, n_of, ordinal = params.groups, h.count, h.ordinal
    base, extra = n_of // G, n_of % G
    few = n_of < G
    cut = (G - extra) * base  # baskets in the older groups of size base; the newer `extra` have base + 1
    older = ordinal < cut
    group = np.where(few, ordinal, np.where(older, ordinal // np.maximum(base, 1),
                                            (G - extra) + (ordinal - cut) // (base + 1)))
    size = np.where(few, 1, np.where(older, base, base + 1))
    real = np.where(few, n_of, G)
    weight = (params.within_decay ** (n_of - 1 - ordinal) / size
              * params.group_decay ** (G - 1 - group) / real)
    tb, tc = h.entries[:, 0], h.entries[:, 1]
    out += np.bincount(h.customer[tb] * h.n_items + tc, weights=weight[tb], minlength=out.size).reshape(out.shape)
    return h.ids, out


def tifu_vectors(users: Any, items: Any, baskets: Any, catalog: Any, params: TifuParams
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(customer ids sorted, customers × catalogue float64 vectors) from parallel
    arrays of purchase lines (see :func:`baskets_of`)."""
    return vectors_of(baskets_of(users, items, baskets, catalog), params)


def tifu_scores(vectors: tuple[np.ndarray, np.ndarray], users: Any, params: TifuParams,
                tie_break: Any = None) -> np.ndarray:
    """(users × catalogue) TIFU-KNN scores from :func:`tifu_vectors`' output.
    ``tie_break`` (one value per catalogue item, e.g. the 7-day popularity)
    orders only what TIFU-KNN leaves tied (a customer without history: all of
    it): per row it is scaled to under half the smallest gap between distinct
    scores, so it never reorders two items TIFU-KNN tells apart."""
    ids, V = vectors
    users = np.asarray(users)
    rows = _index(users, ids)
    S = np.zeros((len(users), V.shape[1]))
    have = rows >= 0
    if have.any() and len(ids):
        Q = V[rows[have]]
        S[have] = params.alpha * Q
        if params.alpha < 1.0:
            S[have] += (1.0 - params.alpha) * neighbour_mean(V, Q, params.neighbours)
    if tie_break is not None:
        S = S + lexicographic_tie_break(S, tie_break)
    return S


def neighbour_mean(V: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    """Mean of the ``k`` rows of ``V`` nearest (Euclidean) to each row of ``Q``
    (ties broken by row order), as one matrix product with a 0/1 selection."""
    k = min(k, len(V))
    d = (Q * Q).sum(1)[:, None] + (V * V).sum(1)[None, :] - 2.0 * (Q @ V.T)
    order = np.lexsort((np.broadcast_to(np.arange(len(V)), d.shape), d), axis=1)[:, :k]
    pick = np.zeros_like(d)
    np.put_along_axis(pick, order, 1.0 / k, axis=1)
    return pick @ V


def lexicographic_tie_break(S: np.ndarray, tie_break: Any) -> np.ndarray:
    """What to add to ``S`` (rows × catalogue) so that ``tie_break`` (one value
    per column) orders equal scores of a row and nothing else."""
    t = np.asarray(tie_break, dtype=np.float64)
    if t.shape != (S.shape[1],):
        raise ValueError(f"tie_break must hold one value per catalogue item ({S.shape[1]}), got {t.shape}")
    span = float(t.max() - t.min()) if len(t) else 0.0
    if span <= 0:
        return np.zeros_like(S)
    gaps = np.diff(np.sort(S, axis=1), axis=1)
    gaps = np.where(gaps > 0, gaps, np.inf).min(1, initial=np.inf)
    gaps = np.where(np.isfinite(gaps), gaps, 1.0)
    return 0.5 * gaps[:, None] * (t - t.min())[None, :] / span

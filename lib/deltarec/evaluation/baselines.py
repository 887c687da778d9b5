"""Baselines deltarec is measured against (``benchmarks/nightly_quality.py``).

- :func:`item_counts`: how often each catalogue item was bought in a window
  (the most-popular baseline ranks by it);
- :func:`personal_scores`: each customer's own most-often-bought items first,
  topped up with the popular ones. Repeat purchases dominate retail data, so
  this simple rule is the one to beat; with ``half_life_days`` each purchase
  counts ``0.5 ** (age / half_life)`` (recent ones more: what a user tries first);
- TIFU-KNN (``tifu_knn.py``): time-decayed personal frequencies blended with
  the nearest customers' (Hu et al., SIGIR 2020);
- :class:`ImplicitALS`: Spark MLlib ALS with implicit feedback
  (``implicitPrefs=True``), fitted on all history: what many Spark users run today.

Every baseline returns a dense score matrix (users × catalogue, higher is
better), the same shape a deltarec model gives, so a benchmark ranks
(:func:`~deltarec.evaluation.metrics.topk_from_scores`) and samples negatives
for AUC identically for every strategy. Ids are any hashable values
(strings in deltarec); the catalogue order is the column order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import topk_from_scores

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["item_counts", "personal_scores", "personal_topk", "ImplicitALS"]


def _positions(ids: Any, universe: Any, name: str) -> np.ndarray:
    """Position of each id in ``universe`` (-1 when absent)."""
    import pandas as pd

    index = pd.Index(np.asarray(universe))
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise ValueError(f"{name} must not repeat ids; {dup!r} appears more than once")
    return index.get_indexer(np.asarray(ids))


def item_counts(items: Any, catalog: Any) -> np.ndarray:
    """Occurrences of each catalogue item in ``items`` (float64, catalogue order);
    ids outside the catalogue are not counted."""
    pos = _positions(items, catalog, "catalog")
    return np.bincount(pos[pos >= 0], minlength=len(catalog)).astype(np.float64)


def personal_scores(hist_users: Any, hist_items: Any, users: Any, catalog: Any,
                    popularity: Any, *, hist_times: Any = None, now: Any = None,
                    half_life_days: float = 0.0) -> np.ndarray:
    """(users × catalogue) scores of the personal-history baseline.

    ``score = own_count * (max(popularity) + 1) + popularity``: every item the
    user bought before ranks above every item they did not, the most often
    bought first (ties broken by popularity); the rest of the list is the
    popular items (``popularity``: one count per catalogue item, e.g.
    :func:`item_counts` over the last 7 days). A user without history gets the
    popularity ranking alone.

    ``half_life_days`` > 0: each purchase counts ``0.5 ** (age_days /
    half_life_days)`` instead of 1, its age measured from ``now`` back to
    ``hist_times`` (both numpy datetime64 or anything numpy converts to it).
    Own items still rank above every item the user never bought.
    """
    hist_users, hist_items = np.asarray(hist_users), np.asarray(hist_items)
    if hist_users.shape != hist_items.shape:
        raise ValueError(f"hist_users and hist_items must be parallel arrays, got shapes "
                         f"{hist_users.shape} and {hist_items.shape}")
    pop = np.asarray(popularity, dtype=np.float64)
    if pop.shape != (len(catalog),):
        raise ValueError(f"popularity must hold one value per catalogue item ({len(catalog)}), got shape {pop.shape}")
    if len(pop) and (pop.min() < 0 or not np.isfinite(pop).all()):
        raise ValueError("popularity must be finite and >= 0 (counts)")
    u = _positions(hist_users, users, "users")
    i = _positions(hist_items, catalog, "catalog")
    keep = (u >= 0) & (i >= 0)
    weight = np.ones(len(u))
    if half_life_days:
        if half_life_days < 0 or hist_times is None or now is None:
            raise ValueError(f"half_life_days={half_life_days}: needs to be > 0, with hist_times and now")
        age = (np.datetime64(now, "us") - np.asarray(hist_times, dtype="datetime64[us]")) / np.timedelta64(1, "D")
        if (age[keep] < 0).any():
            raise ValueError("hist_times holds purchases after now: the history must precede the scored time")
        weight = 0.5 ** (age / half_life_days)
    own = np.zeros((len(users), len(catalog)))
    np.add.at(own, (u[keep], i[keep]), weight[keep])
    if half_life_days:  # own items first however old: scale so the smallest own weight beats any popularity
        smallest = own[own > 0].min() if (own > 0).any() else 1.0
        own = own / smallest
    big = (pop.max() if len(pop) else 0.0) + 1.0
    return own * big + pop[None, :]


def personal_topk(hist_users: Any, hist_items: Any, users: Any, catalog: Any, popularity: Any,
                  k: int) -> np.ndarray:
    """Top-k catalogue ids per user of :func:`personal_scores`, best first."""
    return topk_from_scores(personal_scores(hist_users, hist_items, users, catalog, popularity), k,
                            np.asarray(catalog))


class ImplicitALS:
    """Spark MLlib ALS on implicit feedback: the confidence of a (user, item)
    pair is ``1 + alpha * n`` with ``n`` the number of times the user bought it.

    ``fit`` takes a DataFrame of interactions (one row per purchase); the
    factors are then collected to the driver (users × rank and items × rank
    floats) so that :meth:`scores` can rank any catalogue quickly.
    """

    def __init__(self, spark: "SparkSession", rank: int = 32, max_iter: int = 10, reg_param: float = 0.1,
                 alpha: float = 10.0, seed: int = 0):
        if rank < 1 or max_iter < 1:
            raise ValueError(f"ALS rank and max_iter must be >= 1, got rank={rank}, max_iter={max_iter}")
        if reg_param < 0 or alpha < 0:
            raise ValueError(f"ALS reg_param and alpha must be >= 0, got {reg_param}, {alpha}")
        self.spark = spark
        self.params = {"rank": rank, "max_iter": max_iter, "reg_param": reg_param, "alpha": alpha, "seed": seed}
        self.user_ids: np.ndarray | None = None
        self.item_ids: np.ndarray | None = None
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self.interactions = 0  # distinct (user, item) pairs in the last fit

    def fit(self, interactions: "DataFrame", user_col: str = "user_id", item_col: str = "item_id") -> "ImplicitALS":
        from pyspark.ml.feature import StringIndexer
        from pyspark.ml.recommendation import ALS
        from pyspark.sql import functions as F

        missing = {user_col, item_col} - set(interactions.columns)
        if missing:
            raise ValueError(f"interactions lack column(s) {sorted(missing)}; they have {interactions.columns}")
        counts = (interactions.where(F.col(user_col).isNotNull() & F.col(item_col).isNotNull())
                  .groupBy(user_col, item_col).agg(F.count(F.lit(1)).cast("float").alias("n")))
        # ALS wants integer ids: index the string ids (distributed, no collect).
        indexers = [StringIndexer(inputCol=c, outputCol=f"_{c}_ix", stringOrderType="alphabetAsc").fit(counts)
                    for c in (user_col, item_col)]
        data = counts
        for ix in indexers:
            data = ix.transform(data)
        data = data.select(F.col(f"_{user_col}_ix").cast("int").alias("u"),
                           F.col(f"_{item_col}_ix").cast("int").alias("i"), "n").cache()
        try:
            self.interactions = data.count()
            if self.interactions == 0:
                raise ValueError("ALS needs at least one interaction with a user and an item id; got none")
            p = self.params
            model = ALS(userCol="u", itemCol="i", ratingCol="n", implicitPrefs=True, rank=p["rank"],
                        maxIter=p["max_iter"], regParam=p["reg_param"], alpha=p["alpha"], seed=p["seed"],
                        nonnegative=False, coldStartStrategy="nan").fit(data)
            self.user_ids, self.user_factors = self._factors(model.userFactors, indexers[0].labelsArray[0])
            self.item_ids, self.item_factors = self._factors(model.itemFactors, indexers[1].labelsArray[0])
        finally:
            data.unpersist()
        return self

    @staticmethod
    def _factors(df: "DataFrame", labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        t = df.orderBy("id").toArrow()
        ids = t["id"].to_numpy()
        feats = t["features"].combine_chunks()
        vecs = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), -1)
        return np.asarray(labels, dtype=object)[ids], vecs

    def scores(self, users: Any, catalog: Any, fallback: Any = None) -> np.ndarray:
        """(users × catalogue) dot products of the factors. A user ALS has not
        seen gets ``fallback`` (one score per catalogue item, e.g. popularity;
        zeros when None); an item it has not seen scores below every known one."""
        if self.user_factors is None:
            raise RuntimeError("ImplicitALS.scores before fit(): fit it on the interactions first")
        users = np.asarray(users)
        u = _positions(users, self.user_ids, "ALS user ids")
        i = _positions(catalog, self.item_ids, "ALS item ids")
        out = np.zeros((len(users), len(catalog)))
        if fallback is not None:
            fb = np.asarray(fallback, dtype=np.float64)
            if fb.shape != (len(catalog),):
                raise ValueError(f"fallback must hold one score per catalogue item ({len(catalog)}), got {fb.shape}")
            out[:] = fb[None, :]
        known_u, known_i = u >= 0, i >= 0
        dots = self.user_factors[u[known_u]].astype(np.float64) @ self.item_factors[i[known_i]].T.astype(np.float64)
        rows = out[known_u]
        rows[:, known_i] = dots
        if known_i.any():
            floor = dots.min() - 1.0 if dots.size else -1.0
            rows[:, ~known_i] = floor
        out[known_u] = rows
        return out

    def topk(self, users: Any, catalog: Any, k: int, fallback: Any = None) -> np.ndarray:
        """Top-k catalogue ids per user, best first."""
        return topk_from_scores(self.scores(users, catalog, fallback), k, np.asarray(catalog))

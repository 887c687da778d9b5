"""Everything one champion serves, loaded completely before any request sees it.

A :class:`Snapshot` is immutable once built: the champion's network (checksums
verified), one version of the recommendations table as an in-memory Arrow index,
and the catalogue, user histories and (for a model that reads them) repeat
lists of the table versions that refresh read (recorded in its commit
metadata), for live scoring as of the refresh's time, so a live score equals
the table's. The server swaps whole snapshots, so a request sees one
champion's model and table or the other's.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .ids import bucket

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import RunRecord
    from .scorer import Catalog


class RecsIndex:
    """One version of the recommendations table, held as Arrow columns sorted
    by (user, rank) plus a dict from user key to its row span: a lookup is a
    dict hit and a slice, no scan."""

    def __init__(self, table: pa.Table):
        known = table.filter(pc.is_valid(table["user_id"]))
        known = known.sort_by([("user_id", "ascending"), ("rank", "ascending")])
        keys = known["user_id"].to_pylist()
        self.items = known["item_id"].combine_chunks() if known.num_rows else pa.array([], pa.string())
        self.scores = known["score"].to_numpy() if known.num_rows else np.zeros(0, np.float32)
        self.sources = known["source"].to_pylist()
        self.span: dict[str, tuple[int, int]] = {}
        start = 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or keys[i] != keys[start]:
                self.span[keys[start]] = (start, i)
                start = i
        pop = table.filter(pc.is_null(table["user_id"])).sort_by("rank")
        self.popular = list(zip(pop["item_id"].to_pylist(), (float(s) for s in pop["score"].to_pylist())))
        self.depth = max((b - a for a, b in self.span.values()), default=0)

    def __len__(self) -> int:
        return len(self.span)

    def get(self, key: str, k: int) -> tuple[list[tuple[str, float]], str, int] | None:
        """(top ``k`` rows, source, rows stored) of ``key``, or None when it has none."""
        span = self.span.get(key)
        if span is None:
            return None
        a, b = span
        stop = min(b, a + k)
        return (list(zip(self.items[a:stop].to_pylist(), self.scores[a:stop].tolist())), self.sources[a], b - a)


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    checkpoint_sha256: str
    table_version: int
    meta: dict[str, Any]
    loaded_at: dt.datetime
    load_seconds: float
    model: Any
    catalog: "Catalog"
    item_bucket: dict[str, int]  # every item ever seen → its hashed bucket
    histories: dict[str, list[str]]  # user key → stored history (item ids, oldest first)
    index: RecsIndex
    # user key → its repeat lists (features.repeats.plain_rows), scored as of repeat_as_of (µs), the
    # refresh's time; empty for a model that reads none
    repeats: dict[str, tuple] = field(default_factory=dict)
    repeat_as_of: int | None = None
    repeat_half_life_days: float = 0.0

    @property
    def max_k(self) -> int:
        return int(self.meta["max_k"])

    def unknown_items(self, items: list[str]) -> list[tuple[int, str]]:
        return [(i, x) for i, x in enumerate(items) if x not in self.item_bucket]

    def recommend(self, key: str, k: int) -> dict[str, Any]:
        """Top ``k`` for user ``key``: the table's rows; a user it does not know
        gets the popularity list (``fallback``); a ``k`` deeper than the table
        is scored live from the same model, history and catalogue."""
        return self.from_table(key, k) or self.score(key, [], k)

    def from_table(self, key: str, k: int) -> dict[str, Any] | None:
        """:meth:`recommend` when the table answers it; None when it takes the model."""
        hit = self.index.get(key, k)
        if hit is None:
            return {"items": self.index.popular[:k], "fallback": "popularity", "from": "table"}
        rows, source, stored = hit
        fallback = "popularity" if source == "popularity" else None
        if len(rows) >= k or stored < self.index.depth or fallback:
            return {"items": rows, "fallback": fallback, "from": "table"}
        return None

    def score(self, key: str, items: list[str], k: int) -> dict[str, Any]:
        """Top ``k`` from the model for ``key`` with ``items`` (known item ids,
        oldest first) appended to its stored history (and, for a model that
        reads the repeat lists, bought at the refresh's time)."""
        from .scorer import excluded, parse_exclude, repeat_items, top_items

        history = self.histories.get(key, []) + list(items)
        if not history:
            return {"items": self.index.popular[:k], "fallback": "popularity", "from": "table"}
        m = self.meta
        uidx = bucket(key, int(m["user_buckets"]), m.get("salt") or "")
        hidx = [self.item_bucket[i] if i in self.item_bucket else bucket(i, int(m["item_buckets"]))
                for i in history]
        K = repeat_items(self.model) if self.repeat_as_of is not None else 0  # None: no item_stats, no catalogue
        bought = list(zip(items, hidx[len(hidx) - len(items):]))
        rep = self.repeat_arrays(key, bought, K) if K else None
        (top,) = top_items(self.model, self.catalog, [uidx], [hidx], k,
                           [excluded(history, parse_exclude(m["exclude"]))], repeats=rep)
        return {"items": top, "fallback": None, "from": "model"}

    def repeat_arrays(self, key: str, bought: list[tuple[str, int]], k: int) -> dict[str, np.ndarray]:
        """``key``'s repeat lists with ``bought`` (item id, bucket) folded in, as of the refresh's time."""
        from ..features.repeats import feature_arrays, live_state

        at = self.repeat_as_of
        s = live_state(self.repeats.get(key), bought, at, self.repeat_half_life_days, k)
        return feature_arrays([s], [at], k, self.repeat_half_life_days)


def load_snapshot(lake: "LakeEngine", cfg: "Config", champion: "RunRecord", version: int,
                  meta: dict[str, Any], refreshed: int | None = None) -> Snapshot:
    """Load champion + table ``version`` (whose refresh ``meta``, committed as
    version ``refreshed``, names that champion) completely; raises on any
    problem, leaving nothing half-built. Users erased from the table since the
    refresh lose their stored history too (the refresh's user_state still has it)."""
    from ..features.repeats import plain_rows
    from ..pipeline.recommend import repeat_settings
    from .catalog import catalog_from_item_stats, scoring_time, user_histories
    from .scorer import repeat_items
    from ..train.checkpoint import load_model

    t0 = time.perf_counter()
    if meta.get("run_id") != champion.run_id or meta.get("checkpoint_sha256") != champion.checkpoint_sha256:
        raise ValueError(f"{cfg.recommend.table} version {version} was written by {meta.get('run_id')} "
                         f"(sha256 {meta.get('checkpoint_sha256')}), not champion {champion.run_id}")
    model = load_model(champion)
    recs = lake.read_arrow(cfg.recommend.table, version)
    wrong = pc.unique(recs.filter(pc.not_equal(recs["run_id"], champion.run_id))["run_id"]).to_pylist()
    if wrong:
        raise ValueError(f"{cfg.recommend.table} version {version} holds rows of {wrong}, not only of "
                         f"champion {champion.run_id}")
    stats = lake.read_arrow(cfg.lake.item_stats_table, meta["item_stats_version"])
    catalog, item_bucket = catalog_from_item_stats(stats, int(meta["catalog_days"]), int(meta["item_buckets"]))
    histories: dict[str, list[str]] = {}
    repeats: dict[str, tuple] = {}
    if meta.get("user_state_version") is not None:
        state = lake.read_arrow(cfg.lake.user_state_table, meta["user_state_version"])
        histories = user_histories(state)
        repeats = plain_rows(state) if repeat_items(model) else {}
    if refreshed is not None and refreshed != version:
        before = set(lake.read_arrow(cfg.recommend.table, refreshed)["user_id"].to_pylist())
        for user in before - set(recs["user_id"].to_pylist()):
            histories.pop(user, None)
            repeats.pop(user, None)
    index = RecsIndex(recs)
    return Snapshot(champion.run_id, champion.checkpoint_sha256, version, meta, dt.datetime.now(dt.timezone.utc),
                    round(time.perf_counter() - t0, 3), model, catalog, item_bucket, histories, index, repeats,
                    scoring_time(stats), repeat_settings(cfg, champion)[1])

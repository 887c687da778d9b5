"""What a recommendation refresh reads from the lake besides the users, as
plain Arrow / Python (no Spark): the catalogue, the popularity list, the ids
every item hashes to. The refresh (pipeline/recommend.py), the server and the
MLflow model build them with these same functions, so they agree.

Day windows count back from the newest time in the data, not the wall clock:
a lake of replayed 2011 purchases has a catalogue too.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .ids import bucket
from .scorer import Catalog


def _since(times: pa.ChunkedArray | pa.Array, days: int) -> pa.Array | None:
    """Mask of ``times`` within ``days`` of their maximum (None: no limit)."""
    if days <= 0 or len(times) == 0:
        return None
    newest = pc.max(times)
    if not newest.is_valid:
        return None
    cut = newest.as_py() - dt.timedelta(days=days)
    return pc.fill_null(pc.greater_equal(times, pa.scalar(cut, times.type)), False)


def item_buckets(item_ids: Iterable[str], buckets: int) -> dict[str, int]:
    """item id → hashed bucket (as the delta job hashes it)."""
    return {i: bucket(i, buckets) for i in item_ids}


def catalog_from_item_stats(item_stats: pa.Table, catalog_days: int, buckets: int) -> tuple[Catalog, dict[str, int]]:
    """(items seen in the last ``catalog_days`` days (0: all), bucket of every
    item ever seen) from the ``item_stats`` table."""
    ids = item_stats["item_id"]
    every = item_buckets(ids.drop_null().to_pylist(), buckets)
    mask = _since(item_stats["last_seen"], catalog_days)
    recent = (ids.filter(mask) if mask is not None else ids).drop_null().to_pylist()
    return Catalog.build(recent, [every[i] for i in recent]), every


def popular_items(rows: pa.Table, allowed: Iterable[str], days: int, n: int) -> list[tuple[str, float]]:
    """The ``n`` items of ``allowed`` with most rows (positive events: item_id,
    event_time) in the last ``days`` days, most first, ties by id; all time
    when the window holds none of them."""
    allowed = pa.array(sorted(set(allowed)), pa.string())
    if rows.num_rows == 0 or len(allowed) == 0 or n <= 0:
        return []
    rows = rows.filter(pc.is_in(rows["item_id"], value_set=allowed))
    mask = _since(rows["event_time"], days)
    window = rows.filter(mask) if mask is not None else rows
    if window.num_rows == 0:
        window = rows
    counts = window.group_by("item_id").aggregate([("item_id", "count")])
    ids = np.asarray(counts["item_id"].to_pylist(), dtype=object)
    cnt = counts["item_id_count"].to_numpy()
    order = np.lexsort((ids.astype(str), -cnt))[:n]
    return [(str(ids[i]), float(cnt[i])) for i in order]


def scoring_time(item_stats: pa.Table) -> int | None:
    """When a refresh scores, in µs since the epoch: the start of the UTC day
    after the newest ``last_seen`` (the data's clock; the day a model trained
    on that data ranks for), or None for an empty table. The repeat lists are
    scored as of it, by the refresh and by the server and the MLflow model that
    read the same item_stats."""
    from ..features.repeats import US_PER_DAY, day_start, to_micros

    newest = pc.max(item_stats["last_seen"]).as_py() if item_stats.num_rows else None
    return None if newest is None else day_start(to_micros(newest)) + US_PER_DAY


def user_histories(user_state: pa.Table) -> dict[str, list[str]]:
    """user key → its stored history (item ids, oldest first)."""
    keys = user_state["user_id"].to_pylist()
    hist = user_state["history_ids"].to_pylist()
    return {k: list(h or []) for k, h in zip(keys, hist) if k is not None}

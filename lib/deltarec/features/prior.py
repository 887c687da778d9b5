"""The slices of history a night needs, found by Spark joins: the event
index of earlier runs (read by the executors, ``LakeEngine.read_on_executors``)
joined with tonight's keys (night-sized: broadcast), so the driver never
holds history-sized data. The delta job (``pipeline/delta_job.py``) hands
them to ``validate``. Pure DataFrame work; the only I/O is the index read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .cancellations import latest_purchases
from .validate import CANCEL, CONSUMED_CHANGES, EVENT_CHANGES

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from ..lake.engine import LakeEngine


def tonight_keys(changes: "DataFrame") -> "DataFrame":
    """Tonight's consumed change rows, key columns only (night-sized: what is
    broadcast into the joins with the history-sized tables)."""
    from pyspark.sql import functions as F

    return changes.where(F.col("_change_type").isin(*CONSUMED_CHANGES)).select(
        "_change_type", "event_id", "user_id", "item_id", "event_type", "event_time",
        F.col("_commit_version").cast("long").alias("source_version"))


def prior_index(lake: "LakeEngine", keys: "DataFrame", first: int, table: str,
                materialize: "Callable[[DataFrame], DataFrame] | None" = None):
    """The slices of the event index of earlier runs (``source_version <
    first``) tonight needs, as Spark joins of the index (read by the
    executors) with tonight's keys (broadcast): (the ids among tonight's
    inserts consumed before — duplicates; every row of the events tonight's
    updates and deletes refer to, and of the purchases tonight's
    cancellations could retract).

    The history-sized index is scanned twice, whatever the night: once
    narrow (its three key columns) for the events tonight's ids and
    (user, item) pairs name, once whole for those events' rows only (every
    row: an event judged by its newest row may have moved to another pair).
    Both results are night-sized; ``materialize`` (e.g. ``Held.cut``) holds
    them, as several slices read each. Four scans, two of them decoding every
    column of every row, made this the one stage that grew with the history
    (``benchmarks/delta_scaling.py``)."""
    from pyspark.sql import functions as F

    if not lake.exists(table):
        return None, None
    c = F.col
    hold = materialize or (lambda df: df)
    index = lake.read_on_executors(table).where(c("source_version") < first)
    ct = c("_change_type")
    inserts = keys.where(ct == "insert").select("event_id", F.lit(True).alias("_dup")).dropDuplicates(["event_id"])
    changed = keys.where(ct.isin("update_postimage", "delete") & c("event_id").isNotNull()).select(
        "event_id", F.lit(True).alias("_changed")).dropDuplicates(["event_id"])
    cancels = keys.where(ct.isin(*EVENT_CHANGES) & F.coalesce(c("event_type") == CANCEL, F.lit(False)))
    pairs = cancels.select("user_id", "item_id", F.lit(True).alias("_pair")).dropDuplicates(
        ["user_id", "item_id"])  # null keys match nothing
    flag = lambda name: F.coalesce(c(name), F.lit(False))  # noqa: E731
    named = hold(index.select("event_id", "user_id", "item_id")
                 .join(F.broadcast(inserts), "event_id", "left").join(F.broadcast(changed), "event_id", "left")
                 .join(F.broadcast(pairs), ["user_id", "item_id"], "left")
                 .where(flag("_dup") | flag("_changed") | flag("_pair"))
                 .select("event_id", flag("_dup").alias("_dup"), flag("_changed").alias("_changed"),
                         flag("_pair").alias("_pair")))
    ids = named.where(c("_dup")).select("event_id")
    wanted = named.where(c("_changed") | c("_pair")).select("event_id", "_changed").dropDuplicates(["event_id"])
    rows_of = hold(index.join(F.broadcast(wanted), "event_id"))  # every row of those events
    prior = rows_of.where(c("_changed")).select(*index.columns)
    # only the purchase each cancellation picks among the pair's other events
    # (the rest of a popular pair's history stays on the executors): the final
    # choice among it and tonight's purchases is validate's, by the same rule
    rows = rows_of.where(~c("_changed")).select(*index.columns)
    picked = latest_purchases(cancels, rows).select("event_id").distinct()
    return ids, prior.unionByName(rows.join(F.broadcast(picked), "event_id", "left_semi"))

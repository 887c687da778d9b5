"""The cancellation rule, in one place: which purchase a cancellation (Online
Retail's ``C`` invoices, ``event_type = 'cancel'``) retracts.

In Spark, on the executors: the night's cancellations and the index rows of
the events that could be retracted grow with the night (a 200k-event night
carried 73k such rows), so the rule runs where they are, and the driver
holds none of them. Two uses: ``validate`` applies the whole rule
(:func:`cancellation_matches`) to tonight's accepted cancellations, and the
delta job's history lookup (``features/prior.py``) keeps, of earlier runs'
rows, only the purchases :func:`latest_purchases` picks. Pure DataFrame
work: no I/O.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import schemas

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

INDEX = schemas.EVENT_INDEX.names

# What cancellation_matches returns: the cancellation (id, version, time) and the purchase it retracts.
MATCHES = ("_cancel_id", "_cv", "event_id", "user_id", "item_id", "_purchase_time", "event_time")


def latest_purchases(cancels: "DataFrame", rows: "DataFrame") -> "DataFrame":
    """For each cancellation (``cancels``: event_id, user_id, item_id,
    event_time, source_version), the purchase it would take among ``rows``
    (EVENT_INDEX rows: every row known of the events that could be
    retracted): an event is judged by its newest row (highest
    source_version; at one version, a row no longer in force first),
    whatever (user, item) that row has — a purchase corrected to another
    item no longer holds the old pair; of the trained purchases of the
    cancellation's user and item at or before it in time and in version, the
    latest (ties: the newer version, then the larger event id). Columns:
    ``MATCHES``; several cancellations may pick one purchase here."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    trained = F.coalesce(c("trained"), F.lit(False))
    newest = rows.withColumn("_n", F.row_number().over(
        Window.partitionBy("event_id").orderBy(c("source_version").desc_nulls_last(), trained.asc())))
    held = newest.where((c("_n") == 1) & trained & (c("event_type") == "purchase") & c("event_time").isNotNull()
                        & c("user_id").isNotNull() & c("item_id").isNotNull()).select(
        "event_id", "user_id", "item_id", c("event_time").alias("_purchase_time"), c("source_version").alias("_sv"))
    x = cancels.select(c("event_id").alias("_cancel_id"), "user_id", "item_id", "event_time",
                       c("source_version").alias("_cv")).dropna(subset=["event_time", "user_id", "item_id", "_cv"])
    cand = x.join(held, ["user_id", "item_id"]).where(
        (c("_purchase_time") <= c("event_time")) & (c("_sv") <= c("_cv")))
    best = cand.withColumn("_n", F.row_number().over(Window.partitionBy("_cancel_id").orderBy(
        c("_purchase_time").desc(), c("_sv").desc(), c("event_id").desc())))
    return best.where(c("_n") == 1).select(*MATCHES)


def cancellation_matches(canc: "DataFrame", known: "DataFrame") -> "DataFrame":
    """The rule on tonight's accepted cancellations ``canc`` against
    ``known`` (EVENT_INDEX rows of earlier runs and tonight's): each
    cancellation takes its :func:`latest_purchases` pick, and one
    cancellation retracts one purchase — when several pick the same one, the
    earliest cancellation (time, version, id) claims it and the others match
    nothing. One row per match, columns ``MATCHES``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    # only the events that ever held a cancelled (user, item): the rest of `known` is not read twice
    pairs = canc.select("user_id", "item_id").distinct()
    ids = known.join(F.broadcast(pairs), ["user_id", "item_id"], "left_semi").select("event_id").distinct()
    rows = known.join(F.broadcast(ids), "event_id", "left_semi").select(*INDEX)
    picks = latest_purchases(canc, rows)
    claims = picks.withColumn("_m", F.row_number().over(
        Window.partitionBy("event_id").orderBy(c("event_time"), c("_cv"), c("_cancel_id"))))
    return claims.where(c("_m") == 1).select(*MATCHES)

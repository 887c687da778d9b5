"""Incremental per-user and per-item state: tonight's rows of ``user_state`` and
``item_stats`` from the state as of before tonight plus tonight's accepted
events and retractions. Pure DataFrame → DataFrame; no I/O.

The rows are *absolute* values computed from the pre-night snapshot (not
"count + n" increments), so the MERGE that writes them can be repeated — a
rerun, or a crashed run's retry over a longer range — and leaves the table as
one application would. Only users and items touched tonight are computed, so
a night's cost follows the night, not the history.

History is what a user did: a retraction does not remove an item from the
history (the retraction example carries the correction to the model), it
counts in ``retractions`` (and lowers the item's ``popularity``). The
whole-history repeat lists (``repeat_*``, ``repeats.py``; with
``features.repeat_items`` > 0) are counts, not a history: a retraction takes
its purchase out of them. A state row written before they existed reads as
empty lists.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import schemas
from . import repeats
from .examples import bucket, label, positive, spark_type

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from ..config import FeaturesConfig


def _typed(df: "DataFrame", schema) -> "DataFrame":
    from pyspark.sql import functions as F

    return df.select(*[F.col(f.name).cast(spark_type(f.type)) for f in schema])


def next_user_state(base: "DataFrame", events: "DataFrame", retractions: "DataFrame",
                    cfg: "FeaturesConfig") -> "DataFrame":
    """USER_STATE rows of the users touched tonight. ``base``: USER_STATE before
    tonight (any superset of the touched users)."""
    from pyspark.sql import functions as F

    c = F.col
    N = cfg.history_length
    new = events.where(c("new")) if "new" in events.columns else events
    # The history takes what teaches the model (label not null), in time order.
    seq = new.withColumn("_l", label(cfg)).where(c("_l").isNotNull()).withColumn(
        "_e", F.struct("event_time", "source_version", "event_id", "item_id"))
    hist = seq.groupBy("user_id").agg(F.sort_array(F.collect_list("_e")).alias("_seq"))
    hist = hist.select("user_id", F.transform("_seq", lambda e: e["item_id"]).alias("_t_ids"))
    counts = events.groupBy("user_id").agg(
        F.sum(c("new").cast("long") if "new" in events.columns else F.lit(1)).alias("_t_events"),
        F.min("event_time").alias("_t_first"), F.max("event_time").alias("_t_last"),
        F.max("source_version").alias("_t_v"))
    rcounts = retractions.groupBy("user_id").agg(F.count(F.lit(1)).alias("_t_retr"),
                                                 F.max("source_version").alias("_r_v"))
    touched = counts.join(rcounts, "user_id", "full").join(hist, "user_id", "left")
    b = base.select("user_id", *[(c(n) if n in base.columns else F.lit(None)).alias("_b_" + n)
                                 for n in schemas.USER_STATE.names if n != "user_id"])
    s = touched.join(b, "user_id", "left")
    if cfg.repeat_items:
        adds = new.where(F.coalesce(positive(cfg), F.lit(False))).select(
            "user_id", "event_time", "item_id", bucket(c("item_id"), cfg.item_buckets).alias("item_idx"))
        rep = repeats.state_rows(base, adds, retractions, cfg.repeat_half_life_days, cfg.repeat_items)
        s = s.join(rep.select("user_id", *[c(n).alias("_r_" + n) for n in repeats.STATE_COLUMNS]), "user_id", "left")
        # a customer touched tonight without a purchase or retraction keeps the lists as they were
        kept = [F.when(c("_r_repeat_as_of").isNotNull() | c("_r_repeat_ids").isNotNull(), c("_r_" + n))
                .otherwise(c("_b_" + n)).alias(n) for n in repeats.STATE_COLUMNS]
    else:
        kept = [F.lit(None).alias(n) for n in repeats.STATE_COLUMNS]
    empty = F.array().cast("array<string>")
    ids = F.concat(F.coalesce(c("_b_history_ids"), empty), F.coalesce(c("_t_ids"), empty))
    ids = F.slice(ids, F.greatest(F.size(ids) - F.lit(N - 1), F.lit(1)), F.lit(N)) if N else empty
    out = s.select(
        "user_id", bucket(c("user_id"), cfg.user_buckets, cfg.salt).alias("user_idx"),
        ids.alias("history_ids"),
        F.transform(ids, lambda i: bucket(i, cfg.item_buckets)).alias("history_idx"),
        (F.coalesce(c("_b_events"), F.lit(0)) + F.coalesce(c("_t_events"), F.lit(0))).alias("events"),
        (F.coalesce(c("_b_retractions"), F.lit(0)) + F.coalesce(c("_t_retr"), F.lit(0))).alias("retractions"),
        F.least(c("_b_first_seen"), c("_t_first")).alias("first_seen"),
        F.greatest(c("_b_last_seen"), c("_t_last")).alias("last_seen"),
        F.greatest(c("_t_v"), c("_r_v")).alias("source_version"),
        *kept,
    )
    return _typed(out, schemas.USER_STATE)


def next_item_stats(base: "DataFrame", events: "DataFrame", retractions: "DataFrame", cfg: "FeaturesConfig",
                    texts: "DataFrame | None" = None) -> "DataFrame":
    """ITEM_STATS rows of the items touched tonight. ``texts``: item_id, text
    (the items table) to hash and compare with the hash seen before."""
    from pyspark.sql import functions as F

    c = F.col
    new = events.where(c("new")) if "new" in events.columns else events
    counts = new.withColumn("_l", label(cfg)).where(c("_l").isNotNull()).groupBy("item_id").agg(
        F.count(F.lit(1)).alias("_t_pop"))
    seen = events.groupBy("item_id").agg(F.min("event_time").alias("_t_first"), F.max("event_time").alias("_t_last"),
                                         F.max("source_version").alias("_t_v"))
    rcounts = retractions.groupBy("item_id").agg(F.count(F.lit(1)).alias("_t_retr"),
                                                 F.max("source_version").alias("_r_v"))
    touched = seen.join(counts, "item_id", "left").join(rcounts, "item_id", "full")
    if texts is not None:
        touched = touched.join(texts.select("item_id", F.sha2(c("text"), 256).alias("_hash")), "item_id", "left")
    else:
        touched = touched.withColumn("_hash", F.lit(None).cast("string"))
    b = base.select("item_id", *[c(n).alias("_b_" + n) for n in schemas.ITEM_STATS.names if n != "item_id"])
    s = touched.join(b, "item_id", "left")
    out = s.select(
        "item_id", bucket(c("item_id"), cfg.item_buckets).alias("item_idx"),
        (F.coalesce(c("_b_popularity"), F.lit(0)) + F.coalesce(c("_t_pop"), F.lit(0))
         - F.coalesce(c("_t_retr"), F.lit(0))).alias("popularity"),
        F.least(c("_b_first_seen"), c("_t_first")).alias("first_seen"),
        F.greatest(c("_b_last_seen"), c("_t_last")).alias("last_seen"),
        F.coalesce(c("_hash"), c("_b_text_hash")).alias("text_hash"),
        F.coalesce(c("_b_text_hash").isNotNull() & c("_hash").isNotNull() & (c("_hash") != c("_b_text_hash")),
                   F.lit(False)).alias("text_changed"),
        F.greatest(c("_t_v"), c("_r_v")).alias("source_version"),
    )
    return _typed(out, schemas.ITEM_STATS)

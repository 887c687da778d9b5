"""Training examples from accepted events: hashed ids, labels, seeded negatives.
Pure DataFrame → DataFrame; no I/O."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import schemas

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from ..config import FeaturesConfig

POSITIVE_EVENT_TYPES = ("purchase", "click", "rating")


def bucket(col: "Column", buckets: int, salt: str = "") -> "Column":
    """Stable id → [0, buckets) hashing, the same on every engine and night."""
    from pyspark.sql import functions as F

    if salt:
        col = F.concat(F.lit(salt), col)
    return F.pmod(F.xxhash64(col), F.lit(buckets)).cast("long")


def with_indices(df: "DataFrame", cfg: "FeaturesConfig") -> "DataFrame":
    return df.withColumn("user_idx", bucket(df["user_id"], cfg.user_buckets, cfg.salt)).withColumn(
        "item_idx", bucket(df["item_id"], cfg.item_buckets)
    )


def catalog(items: "DataFrame", cfg: "FeaturesConfig") -> "DataFrame":
    """Items with a dense position 0..n-1 (ordered by id, so stable) and a bucket."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    pos = F.row_number().over(Window.orderBy("item_id")) - 1
    return items.select("item_id").distinct().withColumn("pos", pos).withColumn(
        "item_idx", bucket(F.col("item_id"), cfg.item_buckets)
    )


def build_examples(accepted: "DataFrame", items: "DataFrame", cfg: "FeaturesConfig", run_id: str) -> "DataFrame":
    """Positives (label 1) for each accepted event plus ``cfg.negatives`` items
    drawn uniformly from the catalog (label 0). The draw is a hash of
    (event id, j, seed): a rerun gives the same negatives whatever the
    partitioning."""
    from pyspark.sql import functions as F

    c = F.col
    pos = with_indices(accepted.where(c("event_type").isin(*POSITIVE_EVENT_TYPES)), cfg).select(
        c("event_id"), c("user_id"), c("item_id"), c("user_idx"), c("item_idx"),
        F.lit(1.0).alias("label"), F.lit(1.0).alias("weight"), c("event_time"),
    )
    out = pos
    if cfg.negatives > 0:
        cat = catalog(items, cfg)
        n = cat.count()
        if n > 0:
            draws = pos.select(
                "event_id", "user_id", "user_idx", "event_time",
                F.explode(F.sequence(F.lit(0), F.lit(cfg.negatives - 1))).alias("j"),
            ).withColumn("pos", F.pmod(F.xxhash64(c("event_id"), c("j"), F.lit(cfg.seed)), F.lit(n)))
            neg = draws.join(F.broadcast(cat), "pos").select(
                F.concat(c("event_id"), F.lit(":n"), c("j").cast("string")).alias("event_id"),
                c("user_id"), c("item_id"), c("user_idx"), c("item_idx"),
                F.lit(0.0).alias("label"), F.lit(1.0).alias("weight"), c("event_time"),
            )
            out = pos.unionByName(neg)
    # Stored in a seeded hash order, so any contiguous slice (a worker's shard)
    # is a uniform sample of positives and negatives.
    out = out.orderBy(F.xxhash64(c("event_id"), F.lit(cfg.seed)))
    return out.select(F.lit(run_id).alias("run_id"), *[c(n) for n in schemas.TRAINING_EXAMPLES.names[1:]]).select(
        *[c(f.name).cast(_spark_type(f.type)) for f in schemas.TRAINING_EXAMPLES]
    )


def _spark_type(t) -> str:
    import pyarrow as pa

    return {pa.string(): "string", pa.int64(): "long", pa.float32(): "float"}.get(t, "timestamp")

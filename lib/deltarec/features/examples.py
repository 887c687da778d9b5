"""Training examples from a night's events and retractions: hashed ids, labels
by event type, the user's history, seeded negatives, time-decayed weights and
the holdout flag. Pure DataFrame → DataFrame; no I/O.

- Labels: ``features.positive_event_types`` → 1; a ``rating`` event → 1 when
  ``rating >= features.rating.threshold`` (default: the scale's midpoint), else
  an explicit 0 — or, with ``features.rating.label=graded``, its place on the
  scale in [0, 1]; with ``features.rating.weight=rating`` its distance towards
  its end of the scale is the weight. Any other accepted type teaches nothing
  (it still counts in the state).
- History: the user's last ``features.history_length`` items before the
  event's day (``features.history_before=day``: as a nightly model serves it)
  or strictly before its time (``=time``), oldest first: ``user_state`` as of
  before tonight, then tonight's earlier events. Never the rest of its own
  basket (same user and time). Retractions carry the pre-night history.
- Negatives (``features.negatives`` per positive): ``uniform`` over the
  catalogue or ``popularity``-weighted by ``item_stats``; plus
  ``features.history_negatives`` from the user's own past items,
  importance-weighted (see ``_history_negatives``). The draw is a hash of
  (event id, j, seed): a rerun gives the same examples whatever the partitioning.
- Weights: 1 (retractions ``features.retraction_weight``), times
  ``0.5 ** (age / time_decay_half_life_days)`` where age is measured back from
  the night's newest event (0 = no decay), so reruns give the same weights.
- Holdout: a hash of the *source* event id, so an event, its negatives and its
  retractions fall on the same side.
- Repeat lists (``features.repeat_items`` > 0): the customer's whole-history
  items with decayed counts as of the event's basket (``repeats.py``);
  negatives copy their positive's, retractions carry none.

(Over 300 lines: labels, histories, negatives and weights are one table's
columns and share its joins; splitting them would scatter one contract.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import schemas
from . import repeats

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame

    from ..config import FeaturesConfig

POPULARITY_SLOTS = 1 << 16  # resolution of the popularity-weighted draw


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
    from pyspark.sql import functions as F

    # The catalogue is broadcast to every task that draws negatives, so numbering
    # it in one sorted array costs no more than that; a window without a partition
    # would do the same but warn on every run. Structs keep a null id (first, as
    # the sort of a window would put it).
    ids = items.select("item_id").distinct().agg(F.sort_array(F.collect_list(F.struct("item_id"))).alias("_ids"))
    return ids.select(F.posexplode("_ids").alias("pos", "_id")).select(
        F.col("_id.item_id").alias("item_id"), "pos",
        bucket(F.col("_id.item_id"), cfg.item_buckets).alias("item_idx"))


def positive(cfg: "FeaturesConfig") -> "Column":
    """Whether an event is a positive (negatives are drawn for it; null: no example)."""
    from pyspark.sql import functions as F

    c = F.col
    return (F.when(c("event_type") == "rating", c("rating") >= F.lit(cfg.rating.cut))
            .when(c("event_type").isin(*cfg.positive_event_types), F.lit(True)))


def label(cfg: "FeaturesConfig") -> "Column":
    """The label of an event by its type (null: no example)."""
    from pyspark.sql import functions as F

    c, r = F.col, cfg.rating
    graded = (c("rating") - F.lit(r.min)) / F.lit(r.max - r.min)
    rated = graded if r.label == "graded" else positive(cfg).cast("double")
    return (F.when(c("event_type") == "rating", rated)
            .when(c("event_type").isin(*cfg.positive_event_types), F.lit(1.0))
            .cast("float"))


def weight(cfg: "FeaturesConfig") -> "Column":
    """An event example's weight before time decay: 1, or with
    ``features.rating.weight=rating`` how far a rating lies towards its end of
    the scale (a 10 on 0-10 weighs 1.0, a 6 weighs 0.6; a 0 weighs 1.0, a 4 0.6)."""
    from pyspark.sql import functions as F

    c, r = F.col, cfg.rating
    if r.weight == "none":
        return F.lit(1.0)
    span = F.lit(r.max - r.min)
    towards = F.when(c("rating") >= F.lit(r.cut), (c("rating") - F.lit(r.min)) / span).otherwise(
        (F.lit(r.max) - c("rating")) / span)
    return F.when(c("event_type") == "rating", towards).otherwise(F.lit(1.0))


def trained_types(cfg: "FeaturesConfig") -> list[str]:
    """Event types that produce an event example."""
    return sorted(set(cfg.positive_event_types) | {"rating"})


def holdout(source_event_id: "Column", cfg: "FeaturesConfig") -> "Column":
    from pyspark.sql import functions as F

    cut = int(round(cfg.holdout_fraction * 1_000_000))
    return F.pmod(F.xxhash64(F.lit("holdout"), source_event_id), F.lit(1_000_000)) < F.lit(cut)


def _last(arr: "Column", n: int) -> "Column":
    """The last ``n`` elements of an array (all when shorter)."""
    from pyspark.sql import functions as F

    return F.slice(arr, F.greatest(F.size(arr) - F.lit(n - 1), F.lit(1)), F.lit(n))


def popularity_slots(spark, stats: "DataFrame", cfg: "FeaturesConfig") -> "DataFrame":
    """(slot, item_id, item_idx) for slots 0..POPULARITY_SLOTS-1, each item holding
    a share of slots proportional to its popularity: a uniform slot is a
    popularity-weighted item. Built on the driver from the (catalogue-sized)
    item statistics."""
    import numpy as np
    import pyarrow as pa

    t = stats.where("popularity > 0").select("item_id", "popularity").orderBy("item_id").toArrow()
    if t.num_rows == 0:
        return None
    cum = np.cumsum(t["popularity"].to_numpy().astype(np.float64))
    points = (np.arange(POPULARITY_SLOTS) + 0.5) / POPULARITY_SLOTS * cum[-1]
    pick = np.searchsorted(cum, points, side="right")
    ids = pa.array(t["item_id"].to_numpy(zero_copy_only=False)[pick].astype(object), pa.string())
    df = spark.createDataFrame(pa.table({"slot": pa.array(np.arange(POPULARITY_SLOTS), pa.int64()), "item_id": ids}))
    from pyspark.sql import functions as F

    return df.withColumn("item_idx", bucket(F.col("item_id"), cfg.item_buckets))


def _history_negatives(pos: "DataFrame", cfg: "FeaturesConfig", n_items: int) -> "DataFrame":
    """``features.history_negatives`` label-0 rows per positive, each an item
    drawn (seeded hash) from the distinct items of the positive's history other
    than its own. A uniform negative (``features.negatives`` of them over
    ``n_items``) almost never lands in a history, so the loss never compares a
    customer's past items with each other: it cannot tell a staple from a
    one-off. The weight makes a history item's expected negative weight that of
    the uniform draws (negatives / n_items), so these rows add samples, not a
    different optimum (in-history items' total negative weight doubles: a
    constant log 2 against items outside the history)."""
    from pyspark.sql import functions as F

    c = F.col
    past = F.filter(F.array_distinct(F.arrays_zip(c("history_ids"), c("history_idx"))),
                    lambda e: e["history_ids"] != c("item_id"))
    draws = (pos.where(c("_positive"))
             .select("event_id", "user_id", "user_idx", "event_time", "history_ids", "history_idx",
                     *repeats.EXAMPLE_COLUMNS, past.alias("_past"))
             .where(F.size("_past") > 0)
             .withColumn("j", F.explode(F.sequence(F.lit(0), F.lit(cfg.history_negatives - 1)))))
    at = F.pmod(F.xxhash64(c("event_id"), c("j"), F.lit(cfg.seed), F.lit("history")), F.size("_past")) + 1
    weight = F.lit(float(cfg.negatives)) * F.size("_past") / F.lit(float(n_items * cfg.history_negatives))
    return draws.withColumn("_e", F.element_at(c("_past"), at.cast("int"))).select(
        F.concat(c("event_id"), F.lit(":h"), c("j").cast("string")).alias("event_id"),
        c("user_id"), c("_e.history_ids").alias("item_id"), c("user_idx"), c("_e.history_idx").alias("item_idx"),
        F.lit(0.0).alias("label"), weight.cast("float").alias("weight"), c("event_time"),
        F.lit("negative").alias("kind"), "history_ids", "history_idx", *repeats.EXAMPLE_COLUMNS,
        c("event_id").alias("src"))


def _no_repeats(alias: bool = True) -> list["Column"]:
    """Empty repeat lists (typed as TRAINING_EXAMPLES has them)."""
    from pyspark.sql import functions as F

    cols = [F.array().cast(spark_type(schemas.TRAINING_EXAMPLES.field(n).type)) for n in repeats.EXAMPLE_COLUMNS]
    return [e.alias(n) for e, n in zip(cols, repeats.EXAMPLE_COLUMNS)] if alias else cols


def _with_repeats(ev: "DataFrame", base: "DataFrame", cfg: "FeaturesConfig") -> "DataFrame":
    """``ev`` (with ``_basket``) plus each event's whole-history repeat lists as
    of its basket (``repeats.example_rows``; empty with ``features.repeat_items=0``)."""
    from pyspark.sql import functions as F

    c = F.col
    if not cfg.repeat_items:
        return ev.select("*", *_no_repeats())
    lines = ev.select("user_id", "event_time", "item_id", "item_idx", "_basket", "_positive")
    rep = repeats.example_rows(base, lines, cfg.repeat_half_life_days, cfg.repeat_items)
    ev = ev.withColumn("_basket_us", F.unix_micros(c("_basket"))).join(rep, ["user_id", "_basket_us"], "left")
    return ev.select(*[n for n in ev.columns if n not in repeats.EXAMPLE_COLUMNS and n != "_basket_us"],
                     *[F.coalesce(c(n), e).alias(n) for n, e in zip(repeats.EXAMPLE_COLUMNS, _no_repeats(False))])


def build_examples(events: "DataFrame", retractions: "DataFrame", items: "DataFrame", cfg: "FeaturesConfig",
                   run_id: str, *, history: "DataFrame | None" = None,
                   item_stats: "DataFrame | None" = None) -> "DataFrame":
    """TRAINING_EXAMPLES rows of one run.

    ``events``: BEHAVIOR_EVENTS + source_version (+ ``new``: false for a
    correction that changed nothing trainable); ``retractions``: event_id (the
    retracted event), user_id, item_id, event_time, source_version;
    ``items``: the catalogue for uniform negatives; ``history``: user_id,
    history_ids, history_idx before tonight; ``item_stats``: item_id,
    popularity for popularity-weighted negatives."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    spark = events.sparkSession
    N = cfg.history_length
    if "new" in events.columns:
        events = events.where(c("new"))
    ev = with_indices(events.withColumn("label", label(cfg)).withColumn("_positive", positive(cfg))
                      .where(c("label").isNotNull()), cfg)
    empty_s, empty_l = F.array().cast("array<string>"), F.array().cast("array<bigint>")
    if history is None:
        history = spark.createDataFrame([], "user_id string, history_ids array<string>, history_idx array<bigint>")
    base = history
    history = history.select("user_id", c("history_ids").alias("_h_ids"), c("history_idx").alias("_h_idx"))
    ev = ev.join(history, "user_id", "left")
    ev = ev.withColumn("_basket", F.date_trunc("day", c("event_time"))
                       if cfg.history_before == "day" else c("event_time"))
    ev = _with_repeats(ev, base, cfg)
    if N > 0:
        # The history an event is trained with is the one it would be served
        # with: everything before its day (features.history_before=day; the
        # nightly job serves tomorrow from the state as of tonight), or before
        # its time (=time). Never the rest of its own basket (same user and
        # time: one invoice), which never repeats within it: with those lines
        # in the history the model learned that a just-seen item is *not*
        # bought. Nor, by day, the same day's earlier orders (a re-order after
        # a cancellation, a split order), which made "bought minutes ago" the
        # strongest signal in training and one that serving never sees.
        # Per basket: its last N items (time, version, id order); then the last
        # N items of the N baskets before it (each basket has >= 1 item).
        line = F.struct("event_time", "source_version", "event_id", "item_id", "item_idx")
        baskets = ev.groupBy("user_id", "_basket").agg(_last(F.sort_array(F.collect_list(line)), N).alias("_b"))
        w = Window.partitionBy("user_id").orderBy("_basket").rowsBetween(-N, -1)
        baskets = baskets.select("user_id", "_basket",
                                 _last(F.flatten(F.collect_list("_b").over(w)), N).alias("_before"))
        ev = ev.join(baskets, ["user_id", "_basket"], "left")
        before = F.coalesce(c("_before"), F.array().cast(baskets.schema["_before"].dataType))
        ev = ev.withColumn("history_ids", _last(F.concat(F.coalesce(c("_h_ids"), empty_s),
                                                         F.transform(before, lambda e: e["item_id"])), N))
        ev = ev.withColumn("history_idx", _last(F.concat(F.coalesce(c("_h_idx"), empty_l),
                                                         F.transform(before, lambda e: e["item_idx"])), N))
    else:
        ev = ev.withColumn("history_ids", empty_s).withColumn("history_idx", empty_l)
    R = list(repeats.EXAMPLE_COLUMNS)
    cols = ["event_id", "user_id", "item_id", "user_idx", "item_idx", "label", "weight", "event_time",
            "kind", "history_ids", "history_idx", *R, "src"]
    pos = ev.select(c("event_id"), c("user_id"), c("item_id"), c("user_idx"), c("item_idx"), c("label"),
                    weight(cfg).alias("weight"), c("event_time"), F.lit("event").alias("kind"),
                    "history_ids", "history_idx", *R, c("event_id").alias("src"), c("_positive"))

    ret = with_indices(retractions, cfg).join(history, "user_id", "left").select(
        F.concat(c("event_id"), F.lit(":r"), c("source_version").cast("string")).alias("event_id"),
        c("user_id"), c("item_id"), c("user_idx"), c("item_idx"), F.lit(0.0).alias("label"),
        F.lit(cfg.retraction_weight).alias("weight"), c("event_time"), F.lit("retraction").alias("kind"),
        (_last(F.coalesce(c("_h_ids"), empty_s), N) if N else empty_s).alias("history_ids"),
        (_last(F.coalesce(c("_h_idx"), empty_l), N) if N else empty_l).alias("history_idx"),
        # a retraction is the correction of one purchase, not a repeat decision: no repeat lists
        *_no_repeats(), c("event_id").alias("src"))
    out = pos.drop("_positive").unionByName(ret)

    if cfg.negatives > 0:
        draws = pos.where(c("_positive")).select(
            "event_id", "user_id", "user_idx", "event_time", "history_ids", "history_idx", *R,
            F.explode(F.sequence(F.lit(0), F.lit(cfg.negatives - 1))).alias("j"))
        h = F.xxhash64(c("event_id"), c("j"), F.lit(cfg.seed))
        table, key = None, None
        if cfg.negative_sampling == "popularity" and item_stats is not None:
            table = popularity_slots(spark, item_stats, cfg)
            key = "slot"
            draws = draws.withColumn("slot", F.pmod(h, F.lit(POPULARITY_SLOTS)))
        if table is None:  # uniform (or no popularity known yet)
            table, key = catalog(items, cfg), "pos"
            n = table.count()
            draws = draws.withColumn("pos", F.pmod(h, F.lit(max(n, 1)))) if n else None
        if draws is not None:
            neg = draws.join(F.broadcast(table.select(key, "item_id", "item_idx")), key).select(
                F.concat(c("event_id"), F.lit(":n"), c("j").cast("string")).alias("event_id"),
                c("user_id"), c("item_id"), c("user_idx"), c("item_idx"),
                F.lit(0.0).alias("label"), F.lit(1.0).alias("weight"), c("event_time"),
                F.lit("negative").alias("kind"), "history_ids", "history_idx", *R, c("event_id").alias("src"))
            out = out.unionByName(neg.select(*cols))
        if cfg.history_negatives > 0 and N > 0 and key == "pos" and n:
            out = out.unionByName(_history_negatives(pos, cfg, n).select(*cols))

    if cfg.time_decay_half_life_days > 0:
        ref = events.select(F.max("event_time").alias("_ref")).unionByName(
            retractions.select(F.max("event_time").alias("_ref"))).agg(F.max("_ref").alias("_ref"))
        age_days = (c("_ref").cast("double") - c("event_time").cast("double")) / 86400.0
        out = out.crossJoin(F.broadcast(ref)).withColumn(
            "weight", c("weight") * F.pow(F.lit(0.5), F.greatest(age_days, F.lit(0.0)) / cfg.time_decay_half_life_days)
        ).drop("_ref")
    out = out.withColumn("holdout", holdout(c("src"), cfg))
    # Stored in a seeded hash order, so any contiguous slice (a worker's shard)
    # is a uniform sample of positives and negatives.
    out = out.orderBy(F.xxhash64(c("event_id"), F.lit(cfg.seed)))
    return out.select(F.lit(run_id).alias("run_id"), *[c(n) for n in schemas.TRAINING_EXAMPLES.names[1:]]).select(
        *[c(f.name).cast(spark_type(f.type)) for f in schemas.TRAINING_EXAMPLES]
    )


def spark_type(t) -> str:
    """Spark's type name (``DataType.simpleString()``) of a lake schema's Arrow type:
    the one mapping between the two (the lake's schemas are Arrow)."""
    import pyarrow as pa

    if pa.types.is_list(t):
        return f"array<{spark_type(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return "timestamp" if t.tz else "timestamp_ntz"
    names = {pa.string(): "string", pa.int64(): "bigint", pa.float32(): "float", pa.float64(): "double",
             pa.bool_(): "boolean"}
    if t not in names:
        raise ValueError(f"no Spark type for Arrow type {t} in the lake's schemas: add it to spark_type")
    return names[t]


def epoch_micros(col: "pa.ChunkedArray | pa.Array") -> "pa.ChunkedArray | pa.Array":
    """Arrow timestamps (any unit or zone) as int64 microseconds since the epoch, UTC."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(pc.cast(col, pa.timestamp("us", "UTC")), pa.int64())

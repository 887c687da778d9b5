"""Validation and change semantics of a night's change feed. Every consumed row
(insert, update post-image, delete) is accepted or quarantined with a reason,
never dropped. Pure DataFrame → DataFrame; no I/O. Longer than ~300 lines:
the reasons, their details and the change semantics are one contract, read
together.

What each change means for training (a model already trained on an event
cannot "untrain" it, so a change to the past reaches the trainer as a new,
explicit example; the contract's *retraction example*: label 0, weight
``features.retraction_weight``, kind ``retraction``):

- **insert**: a new event.
- **update** (post-image; its pre-image is at the same ``_commit_version``): a
  correction that replaces the earlier event. When user, item or event type
  (or the rating) changed and the earlier event was trained on, the old (user, item) gets a
  retraction example and the post-image is a new event. When none of them
  changed (a corrected quantity or price), nothing new is trained; the event
  index and the state are updated.
- **delete**: a retraction of the event, when it was consumed before (tonight
  or in an earlier run); a delete of an event never consumed (or quarantined)
  is quarantined as ``unmatched_retraction``.
- **cancellation** (``event_type = 'cancel'``; Online Retail invoices starting
  with ``C``): a retraction of the matching purchase — same user and item, the
  most recent one at or before the cancellation that is still in force, from
  the event index of earlier runs or tonight's events; one cancellation
  retracts one purchase. No match: ``unmatched_cancellation``. The rule is
  ``features/cancellations.py`` (in Spark: nothing of it reaches the driver).

"Before" is known from the event index (``EVENT_INDEX``): one row per consumed
change, the newest row of an event id being its current state. It is also what
duplicate event ids are checked against across runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lake import schemas
from .cancellations import cancellation_matches
from .examples import spark_type
from .ids import invisible_id, normalize_ids
from .values import BAD_TIMESTAMP, NON_FINITE_NUMBER, OUT_OF_RANGE, value_checks  # noqa: F401 (reason codes)

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import Column, DataFrame

    from ..config import ValidationConfig

# Reason codes, in the order they are checked: a row gets the first that applies.
NULL_EVENT_ID = "null_event_id"
TYPE_MISMATCH = "type_mismatch"  # a mapped source value that does not cast (detail says which)
MALFORMED_ID = "malformed_id"  # too long, control characters, or not validation.id_pattern
NON_POSITIVE_QUANTITY = "non_positive_quantity"  # outside a cancellation
NON_POSITIVE_PRICE = "non_positive_price"
NULL_USER_ID = "null_user_id"
NULL_ITEM_ID = "null_item_id"
NULL_EVENT_TIME = "null_event_time"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
RATING_OUT_OF_RANGE = "rating_out_of_range"  # outside features.rating [min, max]
FUTURE_TIMESTAMP = "future_timestamp"
TOO_LATE = "too_late"
DUPLICATE_EVENT_ID = "duplicate_event_id"  # within the night, or consumed by an earlier run
UNMATCHED_CANCELLATION = "unmatched_cancellation"
UNMATCHED_RETRACTION = "unmatched_retraction"  # a delete of an event never consumed

CANCEL = "cancel"
EVENT_CHANGES = ("insert", "update_postimage")
CONSUMED_CHANGES = EVENT_CHANGES + ("delete",)
EVENTS = schemas.BEHAVIOR_EVENTS.names
INDEX = schemas.EVENT_INDEX.names


class QuarantineThresholdExceeded(RuntimeError):
    pass


@dataclass
class Validated:
    accepted: "DataFrame"  # accepted change rows: EVENTS + source_version, change_type, outcome
    events: "DataFrame"  # events to learn from: EVENTS + source_version, change_type, new (false: unchanged correction)
    retractions: "DataFrame"  # event_id (retracted), user_id, item_id, event_type, event_time, source_version, cause
    index: "DataFrame"  # EVENT_INDEX rows of tonight's accepted changes
    quarantined: "DataFrame"  # QUARANTINE_EVENTS columns (run_id set)
    checked: "DataFrame | None" = None  # the cached rows the above derive from (unpersist when done)
    cached: tuple = ()  # every DataFrame cached here, `checked` included (unpersist when done)


def _blank(c: "Column") -> "Column":
    from pyspark.sql import functions as F

    return c.isNull() | (F.trim(c) == "")


def _malformed(c: "Column", cfg: "ValidationConfig") -> "Column":
    from pyspark.sql import functions as F

    bad = (F.length(c) > cfg.max_id_length) | c.rlike("[\\x00-\\x1f\\x7f]")
    if cfg.id_pattern:
        bad = bad | ~c.rlike(f"^(?:{cfg.id_pattern})$")
    return ~_blank(c) & F.coalesce(bad, F.lit(False))  # a blank id has its own reason (null_*)


def _first_reason(checks: list) -> "Column":
    from pyspark.sql import functions as F

    reason = F.lit(None).cast("string")
    for code, cond in reversed(checks):
        reason = F.when(cond, F.lit(code)).otherwise(reason)
    return reason


def _rating_checks(is_delete: "Column", scale: "tuple[float, float] | None") -> list:
    """A rating outside the configured scale (an 11 or a -1 on 0..10) would
    become a label beyond [0, 1] or a silent positive: quarantined."""
    from pyspark.sql import functions as F

    if scale is None:
        return []
    r = F.col("rating")
    return [(RATING_OUT_OF_RANGE, ~is_delete & r.isNotNull() & ((r < F.lit(scale[0])) | (r > F.lit(scale[1]))))]


def _detail(cfg: "ValidationConfig", scale: "tuple[float, float] | None") -> "Column":
    """What was wrong with which column, for every reason a row can get here
    (the unmatched ones say theirs where they are decided)."""
    from pyspark.sql import functions as F

    c = F.col

    def show(name):
        return F.concat(F.lit(f"{name}="), F.coalesce(c(name).cast("string"), F.lit("null")))

    def malformed_which():
        parts = [F.when(_malformed(c(n), cfg), F.concat(show(n), F.lit(
            f" is malformed (over {cfg.max_id_length} characters, a control character"
            + (f", or not validation.id_pattern" if cfg.id_pattern else "") + ")")))
            for n in ("event_id", "user_id", "item_id")]
        return F.concat_ws("; ", *parts)

    details = {
        NULL_EVENT_ID: F.lit("event_id is null or blank (source.columns.event_id or a source.key column is null)"),
        TYPE_MISMATCH: c("_bad"),
        MALFORMED_ID: malformed_which(),
        NON_POSITIVE_QUANTITY: F.concat(show("quantity"), F.lit(" is not positive (and the row is no cancellation)")),
        NON_POSITIVE_PRICE: F.concat(show("price"), F.lit(" is not positive")),
        NULL_USER_ID: F.lit("user_id is null or blank"),
        NULL_ITEM_ID: F.lit("item_id is null or blank"),
        NULL_EVENT_TIME: F.lit("event_time is null"),
        UNKNOWN_EVENT_TYPE: F.concat(show("event_type"), F.lit(
            f" is not in validation.allowed_event_types {list(cfg.allowed_event_types)} (map yours with "
            "source.event_types)")),
        FUTURE_TIMESTAMP: F.concat(show("event_time"), F.lit(" is after its commit at "),
                                   c("_commit_timestamp").cast("string"),
                                   F.lit(f" plus validation.future_tolerance_minutes={cfg.future_tolerance_minutes}")),
        TOO_LATE: F.concat(show("event_time"), F.lit(f" is over validation.horizon_days={cfg.horizon_days} days "
                                                     "before its commit at "), c("_commit_timestamp").cast("string")),
        DUPLICATE_EVENT_ID: F.concat(show("event_id"), F.lit(" was inserted before (tonight or by an earlier run)")),
    }
    if scale is not None:
        details[RATING_OUT_OF_RANGE] = F.concat(show("rating"), F.lit(
            f" is outside features.rating [min={scale[0]}, max={scale[1]}]"))
    out = F.lit(None).cast("string")
    for code, text in details.items():
        out = F.when(c("_reason") == code, text).otherwise(out)
    return out


def validate(changes: "DataFrame", cfg: "ValidationConfig", run_id: str, *,
             trained_types: list[str] | tuple[str, ...] = ("purchase", "click", "rating"),
             prior_ids: "DataFrame | None" = None, prior: "DataFrame | None" = None,
             rating_scale: "tuple[float, float] | None" = None,
             materialize: "Callable[[DataFrame], DataFrame] | None" = None) -> Validated:
    """Split change-feed rows into accepted changes (and what they mean) and
    quarantined rows.

    ``trained_types``: event types that produce an event example (so a later
    change to them needs a retraction). ``prior_ids``: event ids consumed by
    earlier runs (column ``event_id``), night-sized: at least those among
    tonight's inserts (``features.prior.prior_index`` gives exactly these);
    it is broadcast. ``prior``: EVENT_INDEX rows of earlier
    runs — at least every row of the event ids updated or deleted tonight and
    of the events that ever held a (user, item) cancelled tonight.
    ``rating_scale``: (min, max) of ``features.rating``; a rating outside it is
    quarantined (None: any rating). ``materialize``: how the intermediates
    every output reads are held (default: cached; the delta job cuts their
    plans, ``pipeline/held.py``); they are returned in ``cached`` for the
    caller to release."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    spark = changes.sparkSession
    if "_bad" not in changes.columns:
        changes = changes.withColumn("_bad", F.lit(None).cast("string"))
    idx_schema = ", ".join(f"{f.name} {spark_type(f.type)}" for f in schemas.EVENT_INDEX)
    if prior is None:
        prior = spark.createDataFrame([], idx_schema)
    prior = prior.select(*INDEX)
    if prior_ids is None:
        prior_ids = prior.select("event_id")

    rows = changes.where(c("_change_type").isin(*CONSUMED_CHANGES)).withColumn(
        "source_version", c("_commit_version").cast("long"))
    rows = normalize_ids(rows, cfg)
    invisible, invisible_detail = invisible_id(cfg)
    is_delete = c("_change_type") == "delete"
    is_cancel = F.coalesce(c("event_type") == CANCEL, F.lit(False))
    tol = F.expr(f"INTERVAL {int(cfg.future_tolerance_minutes)} MINUTES")
    # What a row *is* (an adjustment) comes before whether it can be attributed:
    # in Online Retail every negative-quantity adjustment also lacks a customer,
    # and "adjustment" is the useful reason. A delete only needs its event id:
    # the row it removes was judged when it arrived.
    values = value_checks(cfg, is_delete)
    checks = [
        (NULL_EVENT_ID, _blank(c("event_id"))),
        (TYPE_MISMATCH, ~is_delete & c("_bad").isNotNull()),
        (MALFORMED_ID, _malformed(c("event_id"), cfg)
         | (~is_delete & (_malformed(c("user_id"), cfg) | _malformed(c("item_id"), cfg))) | invisible),
        *[(code, cond) for code, cond, _ in values[:2]],  # before the sign checks: -inf is not "non-positive"
        (NON_POSITIVE_QUANTITY, ~is_delete & ~is_cancel & c("quantity").isNotNull() & (c("quantity") <= 0)),
        (NON_POSITIVE_PRICE, ~is_delete & c("price").isNotNull() & (c("price") <= 0)),
        (NULL_USER_ID, ~is_delete & _blank(c("user_id"))),
        (NULL_ITEM_ID, ~is_delete & _blank(c("item_id"))),
        (NULL_EVENT_TIME, ~is_delete & c("event_time").isNull()),
        (BAD_TIMESTAMP, values[2][1]),
        (UNKNOWN_EVENT_TYPE, ~is_delete & ~is_cancel
         & ~F.coalesce(c("event_type").isin(*cfg.allowed_event_types), F.lit(False))),
        *_rating_checks(is_delete, rating_scale),
        # An event cannot happen after it was committed (plus clock skew).
        (FUTURE_TIMESTAMP, ~is_delete & (c("event_time") > c("_commit_timestamp") + tol)),
    ]
    if cfg.horizon_days > 0:
        checks.append((TOO_LATE, ~is_delete & (
            c("event_time") < c("_commit_timestamp") - F.expr(f"INTERVAL {int(cfg.horizon_days)} DAYS"))))
    rows = rows.withColumn("_reason", _first_reason(checks))
    detail = F.when(c("_reason") == TYPE_MISMATCH, c("_bad")).when(c("_reason") == MALFORMED_ID, invisible_detail)
    for code, _, what in values:
        detail = detail.when(c("_reason") == code, what)
    rows = rows.withColumn("_detail", detail)

    # Duplicate inserts: within the night the first commit wins; an id consumed
    # by an earlier run is a duplicate too. (Update post-images reuse their
    # event's id by design: they are corrections, not duplicates.)
    ins = (c("_change_type") == "insert") & c("_reason").isNull()
    rows = rows.withColumn("_ins", ins)
    first = Window.partitionBy("event_id", "_ins").orderBy(c("source_version"), c("event_time"), c("order_id"))
    # prior_ids is night-sized (the ids among tonight's inserts that earlier
    # runs consumed: features/prior.py finds them): broadcast as it is.
    seen = prior_ids.select("event_id", F.lit(True).alias("_seen")).dropDuplicates(["event_id"])
    rows = rows.join(F.broadcast(seen), "event_id", "left")
    rows = rows.withColumn("_reason", F.when(
        ins & ((F.row_number().over(first) > 1) | F.coalesce(c("_seen"), F.lit(False))),
        F.lit(DUPLICATE_EVENT_ID)).otherwise(c("_reason"))).drop("_seen", "_ins")
    rows = rows.withColumn("_detail", F.coalesce(c("_detail"), _detail(cfg, rating_scale)))  # theirs, else ours
    # Held (``materialize``): `rows`, the lookup every output below shares
    # (the earlier state of changed events) and the cancellations' matches,
    # so each is computed once however many outputs are read — on a small
    # night each Spark job is mostly fixed cost.
    hold = materialize or (lambda df: df.cache())
    rows = hold(rows)

    ok = rows.where(c("_reason").isNull())
    trained = F.coalesce(c("event_type").isin(*trained_types), F.lit(False))
    evt = ok.where(~is_delete & ~is_cancel).withColumn("trained", trained)
    # What is known about each event id before a change at version v: the newest
    # index row of an earlier run, or an earlier accepted change of tonight.
    known = prior.unionByName(evt.select(*INDEX))
    lookups = ok.where(is_delete | (c("_change_type") == "update_postimage")).select(
        "event_id", c("source_version").alias("_v"))
    prev = (known.join(F.broadcast(lookups), "event_id")
            .where(c("source_version") < c("_v"))
            .withColumn("_rn", F.row_number().over(
                Window.partitionBy("event_id", "_v").orderBy(c("source_version").desc(), c("trained").asc())))
            .where(c("_rn") == 1)
            .select(*[c(n).alias("_p_" + n) for n in INDEX], "_v"))
    prev = hold(prev)

    # -- updates: replace the earlier event
    # (joins by column name: both sides derive from `rows`, so Column objects would be ambiguous)
    on_prev = (c("event_id") == c("_p_event_id")) & (c("source_version") == c("_v"))
    post = evt.where(c("_change_type") == "update_postimage").join(prev, on_prev, "left")
    # A corrected rating changes the label: it is a change like a new user or item.
    same = ((c("user_id") == c("_p_user_id")) & (c("item_id") == c("_p_item_id"))
            & (c("event_type") == c("_p_event_type")) & c("rating").eqNullSafe(c("_p_rating")))
    had_prev = c("_p_source_version").isNotNull()
    post = post.withColumn("new", ~F.coalesce(had_prev & same, F.lit(False)))
    upd_retract = post.where(had_prev & c("new") & c("_p_trained")).select(
        "event_id", c("_p_user_id").alias("user_id"), c("_p_item_id").alias("item_id"),
        c("_p_event_type").alias("event_type"), c("event_time"), "source_version", F.lit("update").alias("cause"))

    # -- deletes: retract the event when it was consumed
    dele = ok.where(is_delete).join(prev, on_prev, "left")
    del_ok = dele.where(c("_p_source_version").isNotNull())
    del_retract = del_ok.where(c("_p_trained")).select(
        "event_id", c("_p_user_id").alias("user_id"), c("_p_item_id").alias("item_id"),
        c("_p_event_type").alias("event_type"), c("_commit_timestamp").alias("event_time"), "source_version",
        F.lit("delete").alias("cause"))
    del_bad = dele.where(c("_p_source_version").isNull())

    # -- cancellations: retract the most recent matching purchase still in force (features/cancellations.py)
    canc = ok.where(is_cancel)
    matches = hold(cancellation_matches(canc, known))
    canc = canc.join(matches.select("_cancel_id", "_cv"),
                     (c("event_id") == c("_cancel_id")) & (c("source_version") == c("_cv")), "left")
    canc_ok = canc.where(c("_cancel_id").isNotNull()).drop("_cancel_id", "_cv")
    canc_bad = canc.where(c("_cancel_id").isNull()).drop("_cancel_id", "_cv")
    canc_retract = matches.select("event_id", "user_id", "item_id", F.lit("purchase").alias("event_type"),
                                  "event_time", c("_cv").alias("source_version"), F.lit("cancel").alias("cause"))

    retractions = upd_retract.unionByName(del_retract).unionByName(canc_retract)
    events = evt.where(c("_change_type") == "insert").withColumn("new", F.lit(True)).select(
        *EVENTS, "source_version", "_change_type", "new").unionByName(
        post.select(*EVENTS, "source_version", "_change_type", "new"))
    events = events.withColumnRenamed("_change_type", "change_type")

    def outcome(df, what):
        return df.select(*EVENTS, "source_version", c("_change_type").alias("change_type"),
                         (what if not isinstance(what, str) else F.lit(what)).alias("outcome"))

    accepted = (outcome(evt.where(c("_change_type") == "insert"), "event")
                .unionByName(outcome(post, F.when(c("new"), "event").otherwise("correction")))
                .unionByName(outcome(del_ok, F.when(c("_p_trained"), "retraction").otherwise("delete")))
                .unionByName(outcome(canc_ok, "cancellation")))

    # Tonight's index rows: every accepted change, plus "no longer in force" rows
    # for what a delete or a cancellation retracted.
    index = (evt.select(*INDEX)
             .unionByName(del_ok.select("event_id", c("_p_user_id").alias("user_id"), c("_p_item_id").alias("item_id"),
                                        c("_p_event_type").alias("event_type"), c("_p_event_time").alias("event_time"),
                                        c("_p_rating").alias("rating"), F.lit(False).alias("trained"), "source_version"))
             .unionByName(canc_ok.select(*[c(n) for n in INDEX if n != "trained"], F.lit(False).alias("trained"))
                          .select(*INDEX))
             .unionByName(matches.select("event_id", "user_id", "item_id", F.lit("purchase").alias("event_type"),
                                         c("_purchase_time").alias("event_time"), F.lit(None).cast("double").alias("rating"),
                                         F.lit(False).alias("trained"),
                                         c("_cv").alias("source_version"))))

    def quarantine(df, reason):
        return df.select(
            F.lit(run_id).alias("run_id"), (F.lit(reason) if isinstance(reason, str) else reason).alias("reason"),
            c("source_version").cast("long").alias("source_version"), c("_change_type").alias("change_type"),
            *[c(n) for n in EVENTS], c("_detail").alias("detail"))

    quarantined = (quarantine(rows.where(c("_reason").isNotNull()), c("_reason"))
                   .unionByName(quarantine(del_bad.withColumn("_detail", F.lit("no consumed event with this id")),
                                           UNMATCHED_RETRACTION))
                   .unionByName(quarantine(canc_bad.withColumn("_detail", F.lit(
                       "no purchase of this user and item in force at or before the cancellation")),
                       UNMATCHED_CANCELLATION)))
    return Validated(accepted, events, retractions, index, quarantined, rows, (rows, prev, matches))


def check_threshold(counts: dict[str, int], consumed: int, max_fraction: float) -> None:
    """Fail loudly when too much of the night is bad, listing counts per reason."""
    bad = sum(counts.values())
    if consumed and bad / consumed > max_fraction:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise QuarantineThresholdExceeded(
            f"{bad} of {consumed} rows ({bad / consumed:.1%}) were quarantined, above "
            f"validation.max_quarantine_fraction={max_fraction:.0%}: {detail}. Nothing was trained or "
            "committed; fix the source or raise the threshold"
        )

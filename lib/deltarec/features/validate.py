"""Validation of a night's change feed: every row is accepted or quarantined
with a reason, never dropped. Pure DataFrame → DataFrame; no I/O."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lake import schemas

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from ..config import ValidationConfig

# Reason codes, in the order they are checked: a row gets the first that applies.
NULL_EVENT_ID = "null_event_id"
RETRACTION = "retraction_not_supported"  # a deleted source row (retractions: issue "delta jobs")
CANCELLED_INVOICE = "cancelled_invoice"
NON_POSITIVE_QUANTITY = "non_positive_quantity"
NON_POSITIVE_PRICE = "non_positive_price"
NULL_USER_ID = "null_user_id"
NULL_ITEM_ID = "null_item_id"
NULL_EVENT_TIME = "null_event_time"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
FUTURE_TIMESTAMP = "future_timestamp"
TOO_LATE = "too_late"
DUPLICATE_EVENT_ID = "duplicate_event_id"

# Change types that carry an event to train on; the pre-image of an update is
# the row being replaced and is not an event of its own.
EVENT_CHANGES = ("insert", "update_postimage")
CONSUMED_CHANGES = EVENT_CHANGES + ("delete",)


class QuarantineThresholdExceeded(RuntimeError):
    pass


@dataclass
class Validated:
    accepted: "DataFrame"  # BEHAVIOR_EVENTS columns + source_version
    quarantined: "DataFrame"  # QUARANTINE_EVENTS columns (run_id set)


def _blank(c: "Column") -> "Column":
    from pyspark.sql import functions as F

    return c.isNull() | (F.trim(c) == "")


def validate(changes: "DataFrame", cfg: "ValidationConfig", run_id: str) -> Validated:
    """Split change-feed rows into accepted events and quarantined rows."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    rows = changes.where(c("_change_type").isin(*CONSUMED_CHANGES))
    tol = F.expr(f"INTERVAL {int(cfg.future_tolerance_minutes)} MINUTES")
    # What a row *is* (a retraction, a cancellation, an adjustment) comes before
    # whether it can be attributed: in Online Retail every negative-quantity
    # adjustment also lacks a customer, and "adjustment" is the useful reason.
    checks = [
        (NULL_EVENT_ID, _blank(c("event_id"))),
        (RETRACTION, c("_change_type") == "delete"),
        (CANCELLED_INVOICE, c("event_type") == "cancel"),
        (NON_POSITIVE_QUANTITY, c("quantity").isNotNull() & (c("quantity") <= 0)),
        (NON_POSITIVE_PRICE, c("price").isNotNull() & (c("price") <= 0)),
        (NULL_USER_ID, _blank(c("user_id"))),
        (NULL_ITEM_ID, _blank(c("item_id"))),
        (NULL_EVENT_TIME, c("event_time").isNull()),
        (UNKNOWN_EVENT_TYPE, ~F.coalesce(c("event_type").isin(*cfg.allowed_event_types), F.lit(False))),
        # An event cannot happen after it was committed (plus clock skew).
        (FUTURE_TIMESTAMP, c("event_time") > c("_commit_timestamp") + tol),
    ]
    if cfg.horizon_days > 0:
        checks.append((TOO_LATE, c("event_time") < c("_commit_timestamp") - F.expr(f"INTERVAL {int(cfg.horizon_days)} DAYS")))
    reason = F.lit(None).cast("string")
    for code, cond in reversed(checks):
        reason = F.when(cond, F.lit(code)).otherwise(reason)
    rows = rows.withColumn("_reason", reason)
    # Duplicates among otherwise valid rows of this batch: the first commit wins.
    rows = rows.withColumn("_valid", c("_reason").isNull())
    first = Window.partitionBy("event_id", "_valid").orderBy(c("_commit_version"), c("event_time"), c("order_id"))
    rows = rows.withColumn(
        "_reason",
        F.when(c("_valid") & (F.row_number().over(first) > 1), F.lit(DUPLICATE_EVENT_ID)).otherwise(c("_reason")),
    )
    events = [F.col(n) for n in schemas.BEHAVIOR_EVENTS.names]
    accepted = rows.where(c("_reason").isNull()).select(*events, c("_commit_version").alias("source_version"))
    quarantined = rows.where(c("_reason").isNotNull()).select(
        F.lit(run_id).alias("run_id"), c("_reason").alias("reason"),
        c("_commit_version").cast("long").alias("source_version"), c("_change_type").alias("change_type"), *events,
    )
    return Validated(accepted, quarantined)


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

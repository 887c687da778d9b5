"""Checks of values a source system can hold but no real event has: NaN or
±inf numbers, absurd prices and quantities, timestamps like 0001-01-01 or
9999-12-31 (valid in Delta; left in, one such row stops every night at the
same version). Each is a quarantine reason with a detail naming the column
and value. Used by ``validate.py``; Spark expressions only, no I/O.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column

    from ..config import ValidationConfig

NON_FINITE_NUMBER = "non_finite_number"  # NaN or ±inf in price or rating (Spark orders NaN above every number)
OUT_OF_RANGE = "out_of_range"  # price or quantity above validation.max_price / max_quantity
BAD_TIMESTAMP = "bad_timestamp"  # event_time outside validation.min_event_time..max_event_time


def value_checks(cfg: "ValidationConfig", is_delete: "Column") -> list[tuple[str, "Column", "Column"]]:
    """(reason, condition, detail) of values a source can hold but no event
    has: non-finite or absurd numbers, timestamps outside the configured range
    (0001-01-01 or 9999-12-31 are valid Delta timestamps; left in, one such row
    would stop every night at the same version). A delete is not judged: the
    row it removes was judged when it arrived."""
    from pyspark.sql import functions as F

    c = F.col

    def non_finite(name):
        return c(name).isNotNull() & (F.isnan(c(name)) | (F.abs(c(name)) == F.lit(float("inf"))))

    def named(*names):  # "price=NaN": the first named column that is bad, and its value
        return lambda conds: F.coalesce(*[F.when(cond, F.concat(F.lit(n + "="), c(n).cast("string")))
                                         for n, cond in zip(names, conds)])

    finite = [non_finite("price"), non_finite("rating")]
    big = [F.coalesce(c("price") > F.lit(float(cfg.max_price)), F.lit(False)),
           F.coalesce(c("quantity") > F.lit(int(cfg.max_quantity)), F.lit(False))]
    t = c("event_time")
    lo, hi = F.lit(cfg.min_event_time).cast("timestamp"), F.lit(cfg.max_event_time).cast("timestamp")
    return [
        (NON_FINITE_NUMBER, ~is_delete & (finite[0] | finite[1]), named("price", "rating")(finite)),
        (OUT_OF_RANGE, ~is_delete & (big[0] | big[1]), named("price", "quantity")(big)),
        (BAD_TIMESTAMP, ~is_delete & ((t < lo) | (t >= hi)),
         F.concat(F.lit("event_time="), F.date_format(t, "yyyy-MM-dd HH:mm:ss"),
                  F.lit(f" outside {cfg.min_event_time}..{cfg.max_event_time}"))),
    ]

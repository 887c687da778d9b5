"""A source table's change feed → rows in deltarec's behaviour schema.

Two things happen before validation, both pure DataFrame work:

- **Schema drift.** A column added to the source is carried along and ignored;
  a column the job reads whose type changed fails the run with
  :class:`SchemaDriftError` naming the column, its old and its new type
  (casting silently would train on garbage).
- **Bring your own table.** With ``source.columns`` set, each change row is
  mapped onto ``BEHAVIOR_EVENTS`` following the :class:`ColumnMapping`.
  Values that do not cast to the behaviour type (a rating ``"five"``) are kept
  as null and described in ``_bad``: validation quarantines them as
  ``type_mismatch`` instead of the cast failing the job or dropping the row.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import schemas
from ..lake.engine import CHANGE_COLUMNS
from .examples import spark_type

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame
    from pyspark.sql.types import StructType

    from ..config import ColumnMapping


class SchemaDriftError(RuntimeError):
    """A source column the job reads changed type."""


# Spark type names of the behaviour schema's columns.
BEHAVIOR_TYPES = {f.name: spark_type(f.type) for f in schemas.BEHAVIOR_EVENTS}


def check_drift(table: str, current: "StructType", before: "StructType | None", read: set[str] | None = None) -> None:
    """Fail when a column the job reads (``read``; all when None) has a type in
    ``current`` different from ``before`` (the table's schema at the last
    consumed version) — or, for a table in the behaviour schema, from that."""
    old = {f.name: f.dataType.simpleString() for f in before.fields} if before is not None else {}
    if read is None:  # the table is in deltarec's behaviour schema: that is the contract
        old = {**old, **BEHAVIOR_TYPES}
        read = set(BEHAVIOR_TYPES)
    changed = []
    for f in current.fields:
        if f.name in read and f.name in old and f.dataType.simpleString() != old[f.name]:
            changed.append(f"{f.name!r} was {old[f.name]} and is now {f.dataType.simpleString()}")
    if changed:
        raise SchemaDriftError(
            f"source table {table!r} changed the type of column(s) the delta job reads: {'; '.join(changed)}. "
            "Restore the old type upstream, or map a new column (source.columns) and run again"
        )
    missing = sorted(read - {f.name for f in current.fields})
    if missing:
        raise SchemaDriftError(
            f"source table {table!r} has no column(s) {', '.join(map(repr, missing))} that the delta job reads "
            f"(it has: {', '.join(f.name for f in current.fields)}); fix source.columns"
        )


def mapped_columns(m: "ColumnMapping") -> set[str]:
    names = [m.event_id, m.user_id, m.item_id, m.event_time, m.order_id, m.quantity, m.price, m.rating,
             m.event_type]
    return {n for n in names if n}


def map_source(changes: "DataFrame", m: "ColumnMapping") -> "DataFrame":
    """Change rows of a source table → BEHAVIOR_EVENTS columns + CHANGE_COLUMNS
    + ``_bad`` (null, or which values did not cast)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import FloatType, DoubleType, NumericType, StringType, TimestampType

    types = {f.name: f.dataType for f in changes.schema.fields}
    bad: list["Column"] = []

    def cast(field: str, name: str | None, target: str) -> "Column":
        if name is None:
            return F.lit(None).cast(target)
        raw = F.col(name)
        src = types[name]
        if target == "string":
            if isinstance(src, (FloatType, DoubleType)):  # ids stored as float: 17850.0 → "17850"
                return raw.cast("bigint").cast("string")
            return raw.cast("string")
        if target == "timestamp":
            if isinstance(src, TimestampType):
                return raw
            if isinstance(src, NumericType):  # epoch seconds (MovieLens style)
                out = F.timestamp_seconds(raw)
            else:
                out = F.try_to_timestamp(raw.cast("string"))
        elif isinstance(src, StringType):
            out = F.expr(f"try_cast(trim(`{name}`) AS {target})")
        else:
            out = F.expr(f"try_cast(`{name}` AS {target})")
        # a value that was there but did not cast: say which one
        bad.append(F.when(raw.isNotNull() & out.isNull(),
                          F.concat(F.lit(f"{field}: {name}="), raw.cast("string"), F.lit(f" is not {target}"))))
        return out

    cols = {
        "user_id": cast("user_id", m.user_id, "string"),
        "item_id": cast("item_id", m.item_id, "string"),
        "event_time": cast("event_time", m.event_time, "timestamp"),
        "order_id": cast("order_id", m.order_id, "string"),
        "quantity": cast("quantity", m.quantity, "bigint"),
        "price": cast("price", m.price, "double"),
        "rating": cast("rating", m.rating, "double"),
    }
    etype = cast("event_type", m.event_type, "string") if m.event_type else F.lit(m.default_event_type)
    if m.cancel_prefix:
        etype = F.when(F.coalesce(cols["order_id"].startswith(m.cancel_prefix), F.lit(False)),
                       F.lit("cancel")).otherwise(etype)
    cols["event_type"] = etype
    if m.event_id:
        cols["event_id"] = cast("event_id", m.event_id, "string")
    else:
        # Derived from what identifies the event (who, what, when, which order), not
        # from measures like a rating: a corrected rating keeps its event id, so the
        # update's pre- and post-image pair up.
        ident = F.concat_ws("\u0001", F.coalesce(cols["user_id"], F.lit("")), F.coalesce(cols["item_id"], F.lit("")),
                            F.coalesce(cols["event_time"].cast("string"), F.lit("")),
                            F.coalesce(cols["order_id"], F.lit("")))
        cols["event_id"] = F.concat(F.lit("e"), F.lower(F.hex(F.xxhash64(ident))))
    detail = F.concat_ws("; ", *bad) if bad else F.lit("")
    out = changes.select(*[cols[n].cast(BEHAVIOR_TYPES[n]).alias(n) for n in schemas.BEHAVIOR_EVENTS.names],
                         *[F.col(c) for c in CHANGE_COLUMNS], detail.alias("_bad"))
    return out.withColumn("_bad", F.when(F.col("_bad") == "", F.lit(None).cast("string")).otherwise(F.col("_bad")))

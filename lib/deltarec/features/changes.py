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
- **What identifies an event.** ``source.key`` (a natural key, composite
  allowed): the event id is a hash of the key's values, so any update of a
  key — a re-rating at a new time too — is a correction of the same event.
  Without a key (and without ``source.columns.event_id``) the id is a hash of
  user, item, time and order, and an update's post-image takes the id of its
  pre-image when they pair up unambiguously in their commit: the same
  (user, item) with one pre- and one post-image, or the commit's only update.
  What cannot be detected without a key: a commit that updates several rows of
  one (user, item) and changes the time of each, or changes user or item of
  several rows at once — each post-image is then a new event and the old one
  stays trained; and a second change of an event's time (its pre-image then
  hashes to an id never consumed).
- **Event types.** ``source.event_types`` maps your values onto deltarec's.
- **Rewrites.** A delete and an insert of the same event with the same
  content within the consumed range (a table overwrite rewrites every row)
  cancel out: the event stays as it was, nothing is retracted or quarantined
  (:func:`cancel_rewrites`; the count is in the run's metrics). A night whose
  remaining deletes and updates touch more than
  ``validation.max_change_fraction`` of the table stops with the counts
  (:func:`check_change_fraction`).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..lake import schemas
from ..lake.engine import CHANGE_COLUMNS
from .examples import spark_type

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame
    from pyspark.sql.types import StructType

    from ..config import ColumnMapping


log = logging.getLogger("deltarec.changes")


class SchemaDriftError(RuntimeError):
    """A source column the job reads changed type."""


class ChangeFractionExceeded(RuntimeError):
    """Tonight's deletes and updates touch more of the table than allowed."""


# (old, new) Spark types where every old value is exactly a new value: a mapped
# column widened upstream reads the same (map_source casts to the behaviour type).
_INTS = ("tinyint", "smallint", "int", "bigint")
WIDENING = frozenset([(a, b) for i, a in enumerate(_INTS) for b in _INTS[i + 1:]]
                     + [(a, "double") for a in ("tinyint", "smallint", "int", "float")]
                     + [(a, "float") for a in ("tinyint", "smallint")])

# Spark type names of the behaviour schema's columns.
BEHAVIOR_TYPES = {f.name: spark_type(f.type) for f in schemas.BEHAVIOR_EVENTS}


def check_drift(table: str, current: "StructType", before: "StructType | None", read: set[str] | None = None) -> None:
    """Fail when a column the job reads (``read``; all when None) has a type in
    ``current`` different from ``before`` (the table's schema at the last
    consumed version) — or, for a table in the behaviour schema, from that.
    A mapped table's lossless widening (:data:`WIDENING`: int → bigint or
    double, float → double, ...) is accepted with a log line."""
    old = {f.name: f.dataType.simpleString() for f in before.fields} if before is not None else {}
    mapped = read is not None  # your table: map_source casts each column to the behaviour type anyway
    if read is None:  # the table is in deltarec's behaviour schema: that is the contract
        old = {**old, **BEHAVIOR_TYPES}
        read = set(BEHAVIOR_TYPES)
    changed = []
    for f in current.fields:
        if f.name in read and f.name in old and f.dataType.simpleString() != old[f.name]:
            now = f.dataType.simpleString()
            if mapped and (old[f.name], now) in WIDENING:  # every old value is exactly a new one
                log.info("source table %r widened column %r from %s to %s: accepted (lossless, read as before)",
                         table, f.name, old[f.name], now)
                continue
            changed.append(f"{f.name!r} was {old[f.name]} and is now {now}")
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


def mapped_columns(m: "ColumnMapping", key: "list[str] | tuple[str, ...]" = ()) -> set[str]:
    names = [m.event_id, m.user_id, m.item_id, m.event_time, m.order_id, m.quantity, m.price, m.rating,
             m.event_type, *key]
    return {n for n in names if n}


def map_source(changes: "DataFrame", m: "ColumnMapping", *, key: "list[str] | tuple[str, ...]" = (),
               event_types: "dict[str, str] | None" = None) -> "DataFrame":
    """Change rows of a source table → BEHAVIOR_EVENTS columns + CHANGE_COLUMNS
    + ``_bad`` (null, or which values did not cast). ``key``: ``source.key``;
    ``event_types``: ``source.event_types``."""
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
    if event_types:
        lookup = F.create_map(*[F.lit(x) for kv in sorted(event_types.items()) for x in kv])
        etype = F.coalesce(lookup[etype], etype)
    if m.cancel_prefix:
        etype = F.when(F.coalesce(cols["order_id"].startswith(m.cancel_prefix), F.lit(False)),
                       F.lit("cancel")).otherwise(etype)
    cols["event_type"] = etype
    if m.event_id:
        cols["event_id"] = cast("event_id", m.event_id, "string")
    elif key:
        # null is a value of its own here, so a row whose key lacks its user is
        # quarantined for that (null_user_id), not for an id it never had.
        whole = F.concat_ws("\u0001", *[F.coalesce(F.col(k).cast("string"), F.lit("\u0000")) for k in key])
        cols["event_id"] = F.concat(F.lit("k"), F.lower(F.hex(F.xxhash64(whole))))
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
    out = out.withColumn("_bad", F.when(F.col("_bad") == "", F.lit(None).cast("string")).otherwise(F.col("_bad")))
    if m.event_id or key:
        return out
    return pair_updates(out)


def pair_updates(rows: "DataFrame") -> "DataFrame":
    """Without a key, give an update's post-image the event id of its
    pre-image where the pair is unambiguous in its commit: the same
    (user, item) with exactly one pre- and one post-image, else the commit's
    only pre- and post-image. Other rows unchanged."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    is_upd = c("_change_type").isin("update_preimage", "update_postimage")
    upd, rest = rows.where(is_upd), rows.where(~is_upd)
    pre, post = (c("_change_type") == "update_preimage"), (c("_change_type") == "update_postimage")

    def paired_id(w):
        n_pre = F.sum(pre.cast("int")).over(w)
        n_post = F.sum(post.cast("int")).over(w)
        return F.when(post & (n_pre == 1) & (n_post == 1), F.max(F.when(pre, c("event_id"))).over(w))

    by_pair = Window.partitionBy("_commit_version", "user_id", "item_id")
    by_commit = Window.partitionBy("_commit_version")
    upd = upd.withColumn("event_id", F.coalesce(paired_id(by_pair), paired_id(by_commit), c("event_id")))
    return rest.unionByName(upd)


def cancel_rewrites(changes: "DataFrame") -> "tuple[DataFrame, DataFrame]":
    """(changes without the delete/insert pairs that rewrite an event unchanged,
    the pairs: one row each). The k-th delete of a content pairs with its k-th
    insert when the insert is not earlier; content is every behaviour column
    (the event id included) and ``_bad``.

    Two window passes over the rows and no join: each delete and insert is
    numbered within its content and kind, then the k-th of each kind meet in
    one (content, k) window. Both outputs come from that one plan (with
    self-joins, each output re-read the rows and the pairs were computed once
    per branch: three times)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    content = [n for n in (*schemas.BEHAVIOR_EVENTS.names, "_bad") if n in changes.columns]
    kind = c("_change_type")
    both = kind.isin("delete", "insert")
    # every row numbered (updates too): no window partition collects all the rows of one kind
    rows = changes.withColumn("_content", F.sha2(F.to_json(F.struct(*content)), 256))
    rows = rows.withColumn("_k", F.row_number().over(
        Window.partitionBy("_content", "_change_type").orderBy("_commit_version")))
    meet = Window.partitionBy("_content", "_k")
    dv = F.max(F.when(kind == "delete", c("_commit_version"))).over(meet)
    iv = F.max(F.when(kind == "insert", c("_commit_version"))).over(meet)
    rows = rows.withColumn("_paired", both & F.coalesce(dv <= iv, F.lit(False)))
    kept = rows.where(~c("_paired")).drop("_content", "_k", "_paired")
    pairs = rows.where(c("_paired") & (kind == "delete")).select("_content", "_k")
    return kept, pairs


def check_change_fraction(table: str, rows_before: int, deletes: int, updates: int, rewrites: int,
                          max_fraction: float) -> None:
    """Stop a night whose deletes and updates (after rewrites cancelled) touch
    more than ``max_fraction`` of the ``rows_before`` rows the table had."""
    touched = deletes + updates
    if rows_before and touched / rows_before > max_fraction:
        raise ChangeFractionExceeded(
            f"the versions to consume delete {deletes} and update {updates} rows of {table!r}, "
            f"{touched / rows_before:.1%} of its {rows_before} rows ({rewrites} unchanged rewrites cancelled), "
            f"above validation.max_change_fraction={max_fraction:.0%}. Nothing was trained or committed. "
            "An overwrite or a type change by mistake: restore the table (RESTORE) and run again; intended "
            "(a backfill, a re-labelling): run again with --set validation.max_change_fraction=1")

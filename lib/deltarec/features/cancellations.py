"""The cancellation rule, in one place: which purchase a cancellation (Online
Retail's ``C`` invoices, ``event_type = 'cancel'``) retracts.

:func:`match_cancellations` is the rule on Arrow tables (pandas inside);
:func:`cancellation_matches` applies it to a night's accepted cancellations in
``validate`` (two small collects: the cancellations, and every known row of
the events that ever held one of their (user, item) pairs). The delta job
applies the same function to earlier runs' index rows, so only the purchases
it picks reach Spark. Pure: no I/O.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import schemas
from .examples import epoch_micros

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

INDEX = schemas.EVENT_INDEX.names

# What match_cancellations returns: the cancellation (id, version, time) and the purchase it retracts.
MATCHES = (("_cancel_id", "string"), ("_cv", "bigint"), ("event_id", "string"), ("user_id", "string"),
           ("item_id", "string"), ("_purchase_time", "timestamp"), ("event_time", "timestamp"))


def match_cancellations(cancels: "pa.Table", rows: "pa.Table") -> "pa.Table":
    """The cancellation rule (the delta job's pre-selection of earlier runs'
    purchases and ``validate`` both use it).

    ``cancels``: event_id, user_id, item_id, event_time, source_version of the
    cancellations. ``rows``: EVENT_INDEX rows (every row known) of the events
    that could be retracted. An event is judged by its newest row (highest
    source_version; at one version, a row no longer in force first), whatever
    (user, item) that row has: a purchase corrected to another item no longer
    holds the old pair. Each cancellation takes the latest purchase in force
    (trained, event_type purchase) of its user and item at or before it, in
    time and in version (ties: the newer version, then the larger event id);
    one cancellation retracts one purchase: when several pick the same one,
    the earliest cancellation (time, version, id) claims it and the others
    match nothing. Returns the ``MATCHES`` columns, one row per match."""
    import pandas as pd

    empty = {name: [] for name, _ in MATCHES}
    r = pd.DataFrame({c: rows[c].to_pylist() for c in ("event_id", "user_id", "item_id", "event_type",
                                                        "trained", "source_version")})
    r["t"] = epoch_micros(rows["event_time"]).to_pylist() if rows.num_rows else []
    x = pd.DataFrame({"_cancel_id": cancels["event_id"].to_pylist(), "user_id": cancels["user_id"].to_pylist(),
                      "item_id": cancels["item_id"].to_pylist(), "_cv": cancels["source_version"].to_pylist()})
    x["xt"] = epoch_micros(cancels["event_time"]).to_pylist() if cancels.num_rows else []
    r["trained"] = r["trained"].fillna(False).astype(bool)
    newest = r.sort_values(["event_id", "source_version", "trained"], ascending=[True, False, True],
                           kind="stable").drop_duplicates("event_id")
    held = newest[newest["trained"] & (newest["event_type"] == "purchase")].dropna(subset=["t", "user_id", "item_id"])
    x = x.dropna(subset=["xt", "user_id", "item_id", "_cv"])
    if held.empty or x.empty:
        return _matches_table(empty)
    cand = x.merge(held[["event_id", "user_id", "item_id", "t", "source_version"]], on=["user_id", "item_id"])
    cand = cand[(cand["t"] <= cand["xt"]) & (cand["source_version"] <= cand["_cv"])]
    # each cancellation: its latest purchase
    best = cand.sort_values(["_cancel_id", "t", "source_version", "event_id"], ascending=[True, False, False, False],
                            kind="stable").drop_duplicates("_cancel_id")
    # each purchase: the earliest cancellation that picked it
    best = best.sort_values(["event_id", "xt", "_cv", "_cancel_id"], kind="stable").drop_duplicates("event_id")
    best = best.sort_values("_cancel_id", kind="stable")
    return _matches_table({"_cancel_id": best["_cancel_id"].tolist(), "_cv": best["_cv"].astype("int64").tolist(),
                           "event_id": best["event_id"].tolist(), "user_id": best["user_id"].tolist(),
                           "item_id": best["item_id"].tolist(), "_purchase_time": best["t"].astype("int64").tolist(),
                           "event_time": best["xt"].astype("int64").tolist()})


def _matches_table(cols: dict) -> "pa.Table":
    import pyarrow as pa

    types = {"string": pa.string(), "bigint": pa.int64(), "timestamp": pa.int64()}
    t = pa.table({name: pa.array(cols[name], types[kind]) for name, kind in MATCHES})
    for name, kind in MATCHES:
        if kind == "timestamp":
            t = t.set_column(t.schema.get_field_index(name), name, t[name].cast(pa.timestamp("us", "UTC")))
    return t


def cancellation_matches(canc: "DataFrame", known: "DataFrame") -> "DataFrame":
    """:func:`match_cancellations` of tonight's accepted cancellations against
    every known row of the events that ever held one of their (user, item)
    pairs: two small collects, the rule on the driver."""
    from pyspark.sql import functions as F

    spark = canc.sparkSession
    cancels = canc.select("event_id", "user_id", "item_id", "event_time", "source_version").toArrow()
    ddl = ", ".join(f"{name} {kind}" for name, kind in MATCHES)
    if cancels.num_rows == 0:
        return spark.createDataFrame([], ddl)
    pairs = spark.createDataFrame(cancels.select(["user_id", "item_id"])).distinct()
    held = known.join(F.broadcast(pairs), ["user_id", "item_id"], "left_semi").select("event_id").distinct()
    rows = known.join(F.broadcast(held), "event_id", "left_semi").select(*INDEX).toArrow()
    return spark.createDataFrame(match_cancellations(cancels, rows), ddl)

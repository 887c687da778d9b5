"""Map a behaviour file onto deltarec's behaviour schema, per calendar day.

Pure Arrow (no Spark, no lake): the loader reads the file once, maps the
columns named in config (``demo.columns`` / ``source``) and splits the result
into one table per day, each of which becomes one Delta commit.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ColumnMapping, ConfigError
from ..lake import schemas


def read_source_file(path: str | Path) -> pa.Table:
    p = Path(path)
    if p.suffix == ".parquet":
        return pq.read_table(p)
    if p.suffix == ".csv":
        from pyarrow import csv

        return csv.read_csv(p)
    raise ConfigError(f"demo.data_path {str(p)!r}: expected a .parquet or .csv file")


def _column(raw: pa.Table, name: str | None, field: str) -> pa.ChunkedArray | None:
    if name is None:
        return None
    if name not in raw.column_names:
        raise ConfigError(
            f"column mapping {field}: {name!r} is not a column of the source "
            f"(it has: {', '.join(raw.column_names)})"
        )
    return raw[name]


def _as_string(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_floating(col.type):  # ids stored as float (pandas with nulls): 17850.0 → "17850"
        col = pc.cast(col, pa.int64(), safe=False)
    return pc.cast(col, pa.string())


def _as_utc(col: pa.ChunkedArray) -> pa.ChunkedArray:
    t = col.type
    if not pa.types.is_timestamp(t):
        col = pc.cast(col, pa.timestamp("us"))
        t = col.type
    if t.tz is None:  # wall-clock times are taken as UTC
        col = pc.assume_timezone(pc.cast(col, pa.timestamp("us")), "UTC")
    return pc.cast(col, schemas.TS)


def map_columns(raw: pa.Table, m: ColumnMapping) -> pa.Table:
    """Source table → BEHAVIOR_EVENTS schema, following the column mapping."""
    n = raw.num_rows
    nulls = lambda t: pa.nulls(n, t)  # noqa: E731
    user = _as_string(_column(raw, m.user_id, "user_id"))
    item = _as_string(_column(raw, m.item_id, "item_id"))
    time = _as_utc(_column(raw, m.event_time, "event_time"))
    order = _column(raw, m.order_id, "order_id")
    order = _as_string(order) if order is not None else nulls(pa.string())
    qty = _column(raw, m.quantity, "quantity")
    qty = pc.cast(qty, pa.int64()) if qty is not None else nulls(pa.int64())
    price = _column(raw, m.price, "price")
    price = pc.cast(price, pa.float64()) if price is not None else nulls(pa.float64())
    rating = _column(raw, m.rating, "rating")
    rating = pc.cast(rating, pa.float64()) if rating is not None else nulls(pa.float64())
    etype = _column(raw, m.event_type, "event_type")
    etype = _as_string(etype) if etype is not None else pa.array([m.default_event_type] * n, pa.string())
    if m.cancel_prefix:
        cancelled = pc.fill_null(pc.starts_with(order, m.cancel_prefix), False)
        etype = pc.if_else(cancelled, "cancel", etype)
    eid = _column(raw, m.event_id, "event_id")
    table = pa.table(
        {"user_id": user, "item_id": item, "event_time": time, "event_type": etype,
         "order_id": order, "quantity": qty, "price": price, "rating": rating}
    )
    eid = _as_string(eid) if eid is not None else content_ids(table)
    return table.add_column(0, "event_id", eid).select(schemas.BEHAVIOR_EVENTS.names).cast(
        schemas.BEHAVIOR_EVENTS
    )


def content_ids(table: pa.Table) -> pa.Array:
    """Deterministic event ids from the row's content: identical lines get the
    same id, so an exact duplicate shows up as a duplicate event id."""
    import pandas as pd

    h = pd.util.hash_pandas_object(table.to_pandas(), index=False).to_numpy(np.uint64)
    return pa.array(np.char.mod("e%016x", h).astype(object), pa.string())


def items_from(raw: pa.Table, m: ColumnMapping, events: pa.Table) -> pa.Table:
    """ITEMS rows: last non-empty text per item, and the first time it was seen."""
    import pandas as pd

    df = pd.DataFrame({
        "item_id": events["item_id"].to_pandas(),
        "event_time": events["event_time"].to_pandas(),
        "text": _column(raw, m.item_text, "item_text").to_pandas() if m.item_text else None,
    }).dropna(subset=["item_id"]).sort_values("event_time", kind="stable")
    first = df.groupby("item_id", sort=True)["event_time"].min()
    text = df.dropna(subset=["text"]).groupby("item_id")["text"].last() if m.item_text else None
    out = pd.DataFrame({"item_id": first.index, "first_seen": first.values})
    out["text"] = out["item_id"].map(text) if text is not None else None
    return pa.Table.from_pandas(out, preserve_index=False).select(schemas.ITEMS.names).cast(schemas.ITEMS)


def split_days(events: pa.Table) -> list[tuple[dt.date, pa.Table]]:
    """One table per calendar day (UTC) of event_time, in time order."""
    day = pc.cast(pc.cast(events["event_time"], pa.timestamp("us")), pa.date32())
    events = events.append_column("_day", day).sort_by([("_day", "ascending"), ("event_time", "ascending")])
    days = events["_day"].to_numpy()
    cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(days)]])
    out = []
    for s, e in zip(starts, ends):
        out.append((days[s].astype(dt.date), events.slice(s, e - s).drop(["_day"])))
    return out

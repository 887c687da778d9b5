"""The item catalogue: ``lake.items_table`` read as (item_id, text), through
``source.items`` when the table is yours.

The catalogue is what uniform negatives are drawn from and what the text tower
reads. Your table keeps its own names: ``source.items`` says which column is
the id, which columns make the text (joined with `` | ``, nulls skipped) and
which category columns are appended to it. A column that is not there stops
the run with the key to fix and the table's columns, before Spark plans
anything.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from ..config import Config
    from ..lake.engine import LakeEngine

TEXT_SEPARATOR = " | "


class ItemsTableError(ValueError):
    """The items table lacks a column deltarec reads."""


def read_items(cfg: "Config", lake: "LakeEngine", version: int | None = None) -> "DataFrame | None":
    """(item_id, text) of ``lake.items_table`` (as of ``version``), or None
    when there is no such table."""
    from pyspark.sql import functions as F

    table = cfg.lake.items_table
    if not lake.exists(table):
        return None
    raw = lake.read(table, version=version)
    m = cfg.source.items
    have = set(raw.columns)
    if m is None:
        missing = [n for n in ("item_id", "text") if n not in have]
        if missing:
            raise ItemsTableError(
                f"items table {table!r} (lake.items_table) has no column(s) {', '.join(map(repr, missing))} "
                f"(it has: {', '.join(raw.columns)}); map yours with source.items, e.g. "
                "source.items={id: movie, text: [title], categories: [genre]}")
        return raw.select(F.col("item_id").cast("string").alias("item_id"), F.col("text").cast("string"))
    wanted = [("source.items.id", m.id)] + [("source.items.text", n) for n in m.text] + [
        ("source.items.categories", n) for n in m.categories]
    missing = [f"{key}={name!r}" for key, name in wanted if name not in have]
    if missing:
        raise ItemsTableError(
            f"items table {table!r} (lake.items_table) has no column {', '.join(missing)} "
            f"(it has: {', '.join(raw.columns)}); fix source.items")
    parts = [F.col(n).cast("string") for n in (*m.text, *m.categories)]
    text = F.concat_ws(TEXT_SEPARATOR, *parts) if parts else F.lit(None).cast("string")
    # A row with no text at all has null text (as the demo's catalogue), not "".
    text = F.when(text == "", F.lit(None).cast("string")).otherwise(text)
    return raw.select(F.col(m.id).cast("string").alias("item_id"), text.alias("text"))

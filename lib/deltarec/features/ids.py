"""The id policy (``validation.ids``): ids that look alike must be alike.
``normalized`` (the default) trims Unicode spaces at both ends (" 12347" is
"12347"), brings ids to Unicode NFC ("e" + U+0301 is "é"), and quarantines
ids holding bidi-override or zero-width characters (U+202E, U+200B: text that
shows one id and is another) as ``malformed_id``, naming the column. A blank
event id after trimming is ``null_event_id`` (validate.py). ``as_is`` keeps
ids byte for byte (a source whose ids are already clean, or must round-trip).
Spark expressions only, no I/O.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from ..config import ValidationConfig

ID_COLUMNS = ("event_id", "user_id", "item_id")
# Bidi embeddings/overrides/isolates/marks, zero-width space/joiners, word joiner, BOM.
INVISIBLE = "[\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\ufeff]"


def normalize_ids(rows: "DataFrame", cfg: "ValidationConfig") -> "DataFrame":
    """``rows`` with its id columns trimmed and in NFC (``validation.ids=normalized``)."""
    if cfg.ids == "as_is":
        return rows
    from pyspark.sql import functions as F

    @F.pandas_udf("string")
    def nfc(s):  # Spark has no Unicode normalization of its own
        return s.str.normalize("NFC")

    for name in ID_COLUMNS:
        trimmed = F.regexp_replace(F.col(name), "^\\p{Z}+|\\p{Z}+$", "")
        rows = rows.withColumn(name, F.when(trimmed.rlike("[^\\x00-\\x7f]"), nfc(trimmed)).otherwise(trimmed))
    return rows


def invisible_id(cfg: "ValidationConfig", columns: tuple[str, ...] = ID_COLUMNS) -> tuple["Column", "Column"]:
    """(any of ``columns`` holds a bidi or zero-width character, the detail
    naming the first such column)."""
    from pyspark.sql import functions as F

    if cfg.ids == "as_is":
        return F.lit(False), F.lit(None).cast("string")
    bad = [F.coalesce(F.col(n).rlike(INVISIBLE), F.lit(False)) for n in columns]
    detail = F.coalesce(*[F.when(b, F.lit(f"{n} holds a bidi-override or zero-width character"))
                          for n, b in zip(columns, bad)])
    cond = bad[0]
    for b in bad[1:]:
        cond = cond | b
    return cond, detail

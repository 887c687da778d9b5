"""training_examples files → this rank's shard → a dict of tensors, through Arrow.

Each rank reads only the row groups that overlap its contiguous slice of the
run's rows (no per-row Python, no pandas, no full copy per rank), keeps the
rows with ``holdout = false`` (the gate's rows are never trained on), then
turns the columns the model asks for into tensors with zero-copy numpy views
where possible. Files written before a column existed still load: a missing
``holdout`` keeps every row, a missing history is an empty one.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..lake.uri import filesystem

from ..lake.engine import plain_strings

COLUMNS = ("user_idx", "item_idx", "label", "weight")
# Optional columns: read when a model asks for them and the file has them.
OPTIONAL = ("holdout", "history_idx", "history_ids", "user_id", "item_id", "event_time")
# The whole-history repeat lists (features/repeats.py): read for a model with repeat_items > 0.
REPEAT_INT = ("repeat_idx",)
REPEAT_FLOAT = ("repeat_weights", "repeat_counts", "repeat_ages")
PAD = -1  # history padding (left): a position with no item

_EMPTY_TYPES = {"user_id": pa.string(), "item_id": pa.string(), "holdout": pa.bool_(),
                "event_time": pa.timestamp("us", "UTC"),
                "history_idx": pa.list_(pa.int64()), "history_ids": pa.list_(pa.string()),
                "repeat_idx": pa.list_(pa.int64()), "repeat_ids": pa.list_(pa.string()),
                **{c: pa.list_(pa.float32()) for c in REPEAT_FLOAT}}


def _empty_type(c: str) -> pa.DataType:
    return _EMPTY_TYPES.get(c, pa.int64() if c.endswith("idx") else pa.float32())


class Batch(dict):
    """Named tensors of one shard or mini-batch: ``user_idx``, ``item_idx``,
    ``label``, ``weight`` always; ``history_idx`` (N, L) for sequence models;
    ``user_row`` / ``item_row`` / ``history_row`` with a dynamic vocabulary."""

    def __len__(self) -> int:  # rows, not keys
        return int(self["label"].shape[0])

    def take(self, idx) -> "Batch":
        return Batch({k: v[idx] for k, v in self.items()})

    def slice(self, start: int, end: int) -> "Batch":
        return Batch({k: v[start:end] for k, v in self.items()})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch({k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})

    def pin_memory(self) -> "Batch":
        return Batch({k: v.pin_memory() for k, v in self.items()})



def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, end) of ``total`` rows for ``rank``; sizes differ by at most one."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _fill_missing(t: pa.Table, columns: list[str]) -> pa.Table:
    for c in columns:
        if c in t.column_names:
            continue
        if c in ("history_idx", "history_ids", "repeat_ids", *REPEAT_INT, *REPEAT_FLOAT):  # written before them
            arr = pa.array([[]] * t.num_rows, _empty_type(c))
        elif c == "holdout":
            arr = pa.array(np.zeros(t.num_rows, dtype=bool))
        elif c == "event_time":  # undated rows: a model dates its items as of its own day
            arr = pa.nulls(t.num_rows, _EMPTY_TYPES[c])
        else:
            raise KeyError(f"training examples have no column {c!r} (a model asked for it); "
                           f"columns present: {', '.join(t.column_names)}")
        t = t.append_column(c, arr)
    return t.select(columns)


def read_shard(files: list[str], rank: int, size: int, columns=COLUMNS, drop_holdout: bool = True) -> pa.Table:
    """This rank's slice of the rows of ``files`` with ``columns`` (missing
    optional ones filled), holdout rows removed."""
    columns = list(dict.fromkeys(columns))
    pieces = []  # (file, row_group, rows)
    handles = {}
    for f in sorted(files):
        fs, path = filesystem(f)  # a local path, file:/, s3a://, abfss://, dbfs:/ ... (lake/uri.py)
        pf = pq.ParquetFile(path if fs is None else fs.open_input_file(path))
        handles[f] = pf
        for rg in range(pf.metadata.num_row_groups):
            pieces.append((f, rg, pf.metadata.row_group(rg).num_rows))
    total = sum(p[2] for p in pieces)
    start, end = shard_bounds(total, rank, size)
    want = columns + (["holdout"] if drop_holdout and "holdout" not in columns else [])
    tables, offset = [], 0
    for f, rg, n in pieces:
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            names = set(handles[f].schema_arrow.names)
            # files a Delta DML rewrote (delta-rs MERGE/DELETE) come back as string_view, which Arrow's
            # filter and concat reject next to plain strings
            t = plain_strings(handles[f].read_row_group(rg, columns=[c for c in want if c in names]))
            t = t.slice(lo - offset, hi - lo)
            if drop_holdout and "holdout" in t.column_names:
                t = t.filter(pc.invert(pc.fill_null(t["holdout"], False)))
            tables.append(_fill_missing(t, columns))
        offset += n
    if not tables:
        return pa.table({c: pa.array([], _empty_type(c)) for c in columns})
    # replay files (pipeline/inputs.py) may store event_time as another timestamp unit / zone: one type
    return pa.concat_tables([_same_time(t) for t in tables])


def _same_time(t: pa.Table) -> pa.Table:
    if "event_time" not in t.column_names or t.schema.field("event_time").type == pa.timestamp("us", "UTC"):
        return t
    col = t["event_time"]
    if col.type.tz is None:  # naive times are UTC in the lake
        col = pc.assume_timezone(col, "UTC")
    return t.set_column(t.column_names.index("event_time"), "event_time", pc.cast(col, pa.timestamp("us", "UTC")))


def _tensor(values: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


def _np(table: pa.Table, name: str, dtype) -> np.ndarray:
    if not table.num_rows:
        return np.zeros(0, dtype=dtype)
    arr = table[name].combine_chunks()
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def pad_lists(lists: pa.Array | pa.ChunkedArray, length: int, values: np.ndarray | None = None,
              fill: int | float = PAD, dtype=np.int64) -> np.ndarray:
    """list<int> → (N, length) int64, the last ``length`` items of each list,
    left-padded with ``fill`` (so the newest item sits in the last column).
    ``values``: replacement for the flattened values (e.g. mapped rows)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks else pa.array([], lists.type)
    n = len(lists)
    out = np.full((n, length), fill, dtype=dtype)
    if n == 0 or length == 0:
        return out
    lens = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    flat = values if values is not None else np.asarray(
        pc.list_flatten(lists).to_numpy(zero_copy_only=False), dtype=dtype)
    starts = np.cumsum(lens) - lens
    k = np.minimum(lens, length)
    rows = np.repeat(np.arange(n), k)
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    out[rows, np.repeat(length - k, k) + j] = flat[np.repeat(starts + lens - k, k) + j]
    return out


def repeat_tensors(table: pa.Table, k: int, vocabs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The whole-history repeat lists of ``table``'s rows as (N, k) tensors:
    ``repeat_idx`` (-1 padded), the float columns (0 padded), ``repeat_row``
    with a dynamic vocabulary."""
    out = {"repeat_idx": torch.from_numpy(pad_lists(table["repeat_idx"], k))}
    for c in REPEAT_FLOAT:
        out[c] = torch.from_numpy(pad_lists(table[c], k, fill=0.0, dtype=np.float32))
    if vocabs:
        out["repeat_row"] = list_rows(table["repeat_ids"], table["repeat_idx"], vocabs["item"], k)
    return out


def list_rows(ids: pa.ChunkedArray, idx: pa.ChunkedArray, vocab, length: int) -> torch.Tensor:
    """The dynamic vocabulary's rows of lists of item ids (and their hashed
    indices), as ``pad_lists`` pads them: (N, length)."""
    ids = ids.combine_chunks() if ids.num_chunks else pa.array([], ids.type)
    idx = idx.combine_chunks() if idx.num_chunks else pa.array([], idx.type)
    rows = vocab.rows_for(pc.list_flatten(ids), pc.list_flatten(idx))
    return torch.from_numpy(pad_lists(ids, length, values=rows))


def to_shard(table: pa.Table, history_length: int = 0, vocabs: dict[str, Any] | None = None,
             repeat_items: int = 0) -> Batch:
    """Zero-copy where Arrow allows: the tensors view Arrow's (read-only)
    buffers, which the loop only indexes, never writes.

    ``history_length`` > 0 adds ``history_idx`` (N, L). ``vocabs``
    ({"user": Vocabulary, "item": Vocabulary}) adds the dynamic-vocabulary rows.
    An ``event_time`` column adds ``event_day`` (days since 1970-01-01, UTC),
    for models whose item inputs depend on the day."""
    b = Batch(user_idx=_tensor(_np(table, "user_idx", np.int64)),
              item_idx=_tensor(_np(table, "item_idx", np.int64)),
              label=_tensor(_np(table, "label", np.float32)),
              weight=_tensor(_np(table, "weight", np.float32)))
    if history_length:
        b["history_idx"] = torch.from_numpy(pad_lists(table["history_idx"], history_length))
    if "event_time" in table.column_names and table["event_time"].null_count < table.num_rows:
        us = pc.cast(pc.cast(table["event_time"], pa.timestamp("us", "UTC")), pa.int64())
        b["event_day"] = torch.from_numpy(np.floor_divide(
            np.asarray(us.to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0), np.int64),
            86_400_000_000))
    if vocabs:
        b["user_row"] = torch.from_numpy(vocabs["user"].rows_for(table["user_id"], table["user_idx"]))
        b["item_row"] = torch.from_numpy(vocabs["item"].rows_for(table["item_id"], table["item_idx"]))
        if history_length:
            b["history_row"] = list_rows(table["history_ids"], table["history_idx"], vocabs["item"], history_length)
    if repeat_items:
        b.update(repeat_tensors(table, repeat_items, vocabs))
    return b


def columns_for(history_length: int = 0, dynamic: bool = False, days: bool = False,
                repeat_items: int = 0) -> list[str]:
    """Columns a shard reads; ``days``: the event time too (a model's ``event_day`` input);
    ``repeat_items``: the whole-history repeat lists."""
    cols = list(COLUMNS)
    if repeat_items:
        cols += [*REPEAT_INT, *REPEAT_FLOAT] + (["repeat_ids"] if dynamic else [])
    if history_length:
        cols.append("history_idx")
    if days:
        cols.append("event_time")
    if dynamic:
        cols += ["user_id", "item_id"] + (["history_ids"] if history_length else [])
    return cols


def model_batch(table: pa.Table, model) -> dict[str, torch.Tensor]:
    """Scoring inputs of ``table``'s rows for ``model`` (evaluation, serving):
    ``user_idx``, ``item_idx`` and, for a model with a history
    (``model.history_length`` > 0) and a table that has the column, ``history_idx``."""
    b = {"user_idx": _tensor(_np(table, "user_idx", np.int64)),
         "item_idx": _tensor(_np(table, "item_idx", np.int64))}
    length = int(getattr(model, "history_length", 0) or 0)
    if length and "history_idx" in table.column_names:
        b["history_idx"] = torch.from_numpy(pad_lists(table["history_idx"], length))
    k = int(getattr(model, "repeat_items", 0) or 0)
    if k and "repeat_idx" in table.column_names:
        b.update(repeat_tensors(table, k))
    return b


def first_histories(table: pa.Table, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For each user of ``table`` (user_idx, event_time, history_idx): the
    history before the user's earliest row, i.e. what the user had done before
    the scored period. Returns (sorted distinct users, (U, length) padded
    histories) — the ``history_idx`` a prequential ``score_all`` needs."""
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, length), np.int64)
    order = pc.sort_indices(table, sort_keys=[("user_idx", "ascending"), ("event_time", "ascending")])
    t = table.select(["user_idx", "history_idx"]).take(order)
    users = np.asarray(t["user_idx"].to_numpy(), dtype=np.int64)
    uniq, first = np.unique(users, return_index=True)
    return uniq, pad_lists(t["history_idx"].take(pa.array(first)), length)

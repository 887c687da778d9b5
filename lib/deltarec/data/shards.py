"""training_examples files → this rank's shard → tensors, through Arrow.

Each rank reads only the row groups that overlap its contiguous slice of the
run's rows (no per-row Python, no pandas, no full copy per rank), then turns
the needed columns into tensors with zero-copy numpy views where possible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pyarrow import fs as pafs

COLUMNS = ("user_idx", "item_idx", "label", "weight")


@dataclass
class Shard:
    user_idx: torch.Tensor
    item_idx: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)


def _open(uri: str):
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        return None, uri  # local: let parquet open it
    return pafs.FileSystem.from_uri(uri)


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, end) of ``total`` rows for ``rank``; sizes differ by at most one."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def read_shard(files: list[str], rank: int, size: int, columns=COLUMNS) -> pa.Table:
    pieces = []  # (file, row_group, rows)
    handles = {}
    for f in sorted(files):
        fs, path = _open(f)
        pf = pq.ParquetFile(path if fs is None else fs.open_input_file(path))
        handles[f] = pf
        for rg in range(pf.metadata.num_row_groups):
            pieces.append((f, rg, pf.metadata.row_group(rg).num_rows))
    total = sum(p[2] for p in pieces)
    start, end = shard_bounds(total, rank, size)
    tables, offset = [], 0
    for f, rg, n in pieces:
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            t = handles[f].read_row_group(rg, columns=list(columns))
            tables.append(t.slice(lo - offset, hi - lo))
        offset += n
    if not tables:
        return pa.table({c: pa.array([], pa.int64() if c.endswith("idx") else pa.float32()) for c in columns})
    return pa.concat_tables(tables)


def to_shard(table: pa.Table) -> Shard:
    """Zero-copy where Arrow allows: the tensors view Arrow's (read-only)
    buffers, which the loop only indexes, never writes."""
    import warnings

    def col(name, dtype):
        arr = table[name].combine_chunks() if table.num_rows else pa.array([], dtype)
        values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(values)

    return Shard(col("user_idx", np.int64), col("item_idx", np.int64),
                 col("label", np.float32), col("weight", np.float32))

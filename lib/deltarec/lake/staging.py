"""Night-sized Spark DataFrames handed to delta-rs without collecting them
(the delta-rs engine's ``write`` and ``merge`` of a DataFrame).

The executors write the rows as Parquet files (``part_files.write_files``)
into ``<lake root>/_staging/<write id>/``; the driver streams them into
delta-rs batch by batch (``reader``: a ``RecordBatchReader`` over the files,
opened one at a time), so it holds a batch, not the night. The directory is
removed when the write is done, failed or not. A crash in between leaves only
that directory: no Delta table references it (Delta ignores what is not
under a table's own directory), and the next staged write removes staging
directories older than ``STALE_HOURS`` (a younger one may be another run's,
still writing).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator
from urllib.parse import unquote

import pyarrow as pa

from .part_files import write_files
from .uri import filesystem, join

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

STAGING_DIR = "_staging"
STALE_HOURS = 24
BATCH_ROWS = 65_536  # rows per batch handed to delta-rs: what the driver holds at a time


@dataclass
class Staged:
    uri: str  # the staging directory
    files: list[str]  # full paths (in uri's form), in the DataFrame's partition order
    schema: pa.Schema
    rows: int  # from the files written: no Spark job counts them

    def reader(self, batch_rows: int = BATCH_ROWS) -> pa.RecordBatchReader:
        """The staged rows as a stream, one file open at a time."""
        import pyarrow.parquet as pq

        fs, _ = filesystem(self.uri)

        def batches() -> Iterator[pa.RecordBatch]:
            for path in self.files:
                # plain file IO for local files: pyarrow's LocalFileSystem next to
                # delta-rs aborts the interpreter at exit here (see uri.py)
                with (open(path, "rb") if fs is None else fs.open_input_file(filesystem(path)[1])) as f:
                    yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)

        return pa.RecordBatchReader.from_batches(self.schema, batches())


@contextmanager
def staged(data: "DataFrame", lake_root: str, schema: pa.Schema) -> Iterator[Staged]:
    """``data`` (its columns ``schema``'s names, cast to it) written by the
    executors under the lake's staging directory; removed on exit."""
    sweep(lake_root)
    write_id = uuid.uuid4().hex
    uri = join(lake_root, f"{STAGING_DIR}/{write_id}")
    try:
        files = write_files(data.select(*schema.names), uri, {}, schema, write_id)
        paths = sorted(join(uri, unquote(f["path"])) for f in files)  # part-<task index>-...: the DataFrame's order
        yield Staged(uri, paths, schema, sum(int(f["rows"]) for f in files))
    finally:
        _remove(uri)


def sweep(lake_root: str, older_than_hours: float = STALE_HOURS) -> list[str]:
    """Remove staging directories a crashed write left behind (older than
    ``older_than_hours``); returns the ones removed."""
    fs, root = filesystem(join(lake_root, STAGING_DIR))
    cutoff = time.time() - older_than_hours * 3600
    gone = []
    if fs is None:
        if not os.path.isdir(root):
            return gone
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if os.path.getmtime(path) < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
        return gone
    from pyarrow.fs import FileSelector, FileType

    for info in fs.get_file_info(FileSelector(root, allow_not_found=True)):
        if info.type == FileType.Directory and info.mtime is not None and info.mtime.timestamp() < cutoff:
            fs.delete_dir(info.path)
            gone.append(info.path)
    return gone


def _remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass

"""Parquet part files that Spark's executors write straight into a Delta
table's directory, for the driver to commit in one transaction (the delta-rs
engine's ``replace_partition``): a night's rows never pass through the driver.

Each Spark task streams its Arrow batches into one file
``<partition dir>/part-<task index>-<write id>.snappy.parquet`` (so sorted
paths keep the DataFrame's order: a sorted DataFrame's ranges come back in
order) and returns one small row: the file's path as the Delta log writes it
(relative, URI-encoded), its size, its rows and, optionally, its rows per value
of one column (keyed by the value as a string). Nothing is visible to readers until the driver commits the add
actions; a crash before that leaves orphan files no snapshot references
(VACUUM removes them).
"""
from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Iterator
from urllib.parse import quote

import pyarrow as pa

from .uri import filesystem

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

RESULT_SCHEMA = "path string, size long, rows long, counts string"
ROWS_PER_GROUP = 65_536  # batches from Spark (10k rows) are buffered into row groups of about this size


def partition_dir(partition: dict[str, str]) -> str:
    """Hive-style ``key=value`` directories, values percent-encoded beyond [A-Za-z0-9_.-]."""
    return "/".join(f"{k}={quote(str(v), safe='-_.')}" for k, v in partition.items())


def write_files(data: "DataFrame", table_uri: str, partition: dict[str, str], file_schema: pa.Schema,
                write_id: str, count_by: str | None = None) -> list[dict]:
    """Run one Spark job whose tasks write ``data``'s rows (cast to
    ``file_schema``: the table's schema without its partition columns) as
    Parquet files under ``table_uri``'s ``partition`` directory. Returns one
    dict per file written (path relative to the table and URI-encoded, size,
    rows, counts)."""
    rel_dir = partition_dir(partition)
    fs, root = filesystem(table_uri)  # the directory's name is rel_dir as written, never URI-decoded

    def write_task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from pyspark import TaskContext

        name = f"part-{TaskContext.get().partitionId():05d}-{write_id}.snappy.parquet"
        path = "/".join(p for p in (root.rstrip("/"), rel_dir, name) if p)  # no partition: no directory
        writer, sink, buffered, rows, counts = None, None, [], 0, {}

        def flush():
            nonlocal writer, sink, buffered
            if not buffered:
                return
            t = pa.Table.from_batches(buffered)
            if writer is None:
                if fs is None:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    sink = path
                else:
                    fs.create_dir(os.path.dirname(path), recursive=True)
                    sink = fs.open_output_stream(path)
                writer = pq.ParquetWriter(sink, file_schema, compression="snappy")
            writer.write_table(t, row_group_size=len(t))
            buffered = []

        for b in batches:
            if not b.num_rows:
                continue
            for k, v in partition.items():  # a row of another partition would be committed under this one
                if not pc.all(pc.fill_null(pc.equal(b.column(k), v), False)).as_py():
                    raise ValueError(f"a row for partition {partition} has {k} other than {v!r}")
            if count_by:
                for r in pc.value_counts(b.column(count_by)).to_pylist():
                    key = str(r["values"])  # keys as JSON carries them
                    counts[key] = counts.get(key, 0) + int(r["counts"])
            t = pa.Table.from_batches([b]).select(file_schema.names).cast(file_schema)
            buffered.extend(t.to_batches())
            rows += b.num_rows
            if sum(x.num_rows for x in buffered) >= ROWS_PER_GROUP:
                flush()
        flush()
        if writer is None:
            return
        writer.close()
        if fs is not None:  # ParquetWriter closes only the files it opened itself
            sink.close()
        size = os.path.getsize(path) if fs is None else fs.get_file_info(path).size
        rel = f"{rel_dir}/{name}" if rel_dir else name
        yield pa.RecordBatch.from_pylist([{"path": quote(rel, safe="/=-_."), "size": size,
                                           "rows": rows, "counts": json.dumps(counts)}])

    return [r.asDict() for r in data.mapInArrow(write_task, RESULT_SCHEMA).collect()]


def add_actions(files: list[dict], partition: dict[str, str]):
    """delta-rs add actions for the files ``write_files`` wrote."""
    from deltalake.transaction import AddAction

    now = int(time.time() * 1000)
    return [AddAction(f["path"], int(f["size"]), dict(partition), now, True, json.dumps({"numRecords": int(f["rows"])}))
            for f in files]

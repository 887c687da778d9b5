"""The lake interface. Everything above ``deltarec.lake`` talks to this, never to
delta-rs or delta-spark directly, so the two engines stay interchangeable.

Tables are addressed by name relative to the lake root. Data goes in as a
Spark DataFrame or a pyarrow Table; bulk reads come back as Spark DataFrames,
small tables (ledger, items) also as Arrow.
"""
from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, Union

import pyarrow as pa

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

Data = Union["DataFrame", pa.Table]

# Columns every change-feed read returns besides the table's own.
CHANGE_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")


class LakeError(RuntimeError):
    """A lake operation that cannot go on; the message says what to do."""


class ConcurrentRunError(LakeError):
    """Another run committed the same input versions first."""


class LakeEngine(abc.ABC):
    name: str = "?"

    def __init__(self, root: str, spark: "SparkSession | None" = None):
        self.root = _normalise_root(root)
        self.spark = spark

    # ------------------------------------------------------------ addressing
    def uri(self, table: str) -> str:
        return f"{self.root}/{table}" if "://" in self.root else os.path.join(self.root, table)

    def _require_spark(self) -> "SparkSession":
        if self.spark is None:
            raise LakeError(f"the {self.name} engine needs a SparkSession for this operation; pass spark=")
        return self.spark

    # ------------------------------------------------------------ reads
    @abc.abstractmethod
    def exists(self, table: str) -> bool: ...

    @abc.abstractmethod
    def version(self, table: str) -> int | None:
        """Latest committed version, or None when the table does not exist."""

    @abc.abstractmethod
    def read(self, table: str, version: int | None = None) -> "DataFrame":
        """The table (as of ``version``: time travel) as a Spark DataFrame."""

    def read_on_executors(self, table: str, version: int | None = None) -> "DataFrame":
        """The table (as of ``version``) as a Spark DataFrame whose rows the
        executors read: a history-sized table joined with a night's keys
        without passing through the driver. This default is ``read`` (an
        engine whose reads already run on the executors)."""
        return self.read(table, version)

    def row_count(self, table: str, version: int | None = None) -> int:
        """Rows of the table as of ``version``, without its rows reaching the driver."""
        return self.read_on_executors(table, version).count()

    @abc.abstractmethod
    def read_arrow(self, table: str, version: int | None = None, filters: list | None = None) -> pa.Table:
        """A small table, or a filtered slice of one, into driver memory."""

    @abc.abstractmethod
    def read_changes(self, table: str, first: int, last: int) -> "DataFrame":
        """Change Data Feed rows of versions first..last (inclusive) with CHANGE_COLUMNS."""

    @abc.abstractmethod
    def data_files(self, table: str, partition: dict[str, str] | None = None) -> list[str]:
        """Parquet files of the current snapshot (of one partition): what workers read."""

    @abc.abstractmethod
    def snapshot_files(self, table: str, version: int) -> list[str]:
        """Data files of ``table`` as of ``version`` (time travel): what a run read then."""

    @abc.abstractmethod
    def history(self, table: str) -> list[dict[str, Any]]:
        """The table's commits, newest first: dicts with at least ``version``,
        ``timestamp`` and ``operation`` (WRITE, MERGE, DELETE, ...)."""

    # ------------------------------------------------------------ writes
    @abc.abstractmethod
    def write(
        self,
        table: str,
        data: Data,
        *,
        mode: str = "append",
        partition_by: list[str] | None = None,
        replace_where: str | None = None,
        enable_cdf: bool = False,
        schema: pa.Schema | None = None,
    ) -> int:
        """Append or overwrite (all, or only rows matching ``replace_where``);
        returns the new version. ``enable_cdf`` turns the change feed on when the
        table is created. A DataFrame ``data`` is never collected into the
        driver (delta-rs: staged by the executors, streamed; delta-spark: native)."""

    @abc.abstractmethod
    def replace_partition(self, table: str, data: "DataFrame", partition: dict[str, str], schema: pa.Schema,
                          count_by: str | None = None) -> dict[str, Any]:
        """Make ``data`` (a Spark DataFrame whose ``partition`` columns hold
        exactly ``partition``'s values) the rows of that partition of ``table``
        (partitioned by ``partition``'s keys; created with ``schema`` if
        missing): one commit, rerunnable. The executors write the rows; the
        driver sees a row per file written. Returns ``{"version", "rows",
        "files", "counts"}``, counts being rows per value of column
        ``count_by``, keyed by ``str(value)`` (empty without it)."""

    def read_partition(self, table: str, partition: dict[str, str]) -> "DataFrame":
        """The rows of one partition (``partition``'s columns equal its values)
        as a Spark DataFrame, all of the table's columns in its order."""
        where = " AND ".join(f"`{k}` = '{str(v).replace(chr(39), chr(39) * 2)}'" for k, v in partition.items())
        return self.scan(table, where=where)

    @abc.abstractmethod
    def create(self, table: str, schema: pa.Schema, partition_by: list[str] | None = None,
               enable_cdf: bool = False) -> None:
        """Create an empty table if it does not exist (idempotent)."""

    @abc.abstractmethod
    def merge(self, table: str, data: Data, on: list[str], *, update: bool,
              commit_metadata: dict[str, str] | None = None, update_if: str | None = None) -> dict[str, int]:
        """MERGE ``data`` into ``table`` on equal ``on`` keys: insert new keys and,
        if ``update``, overwrite matched rows (only those where the SQL predicate
        ``update_if`` over ``t.`` target and ``s.`` source columns holds).
        Returns {"inserted": n, "updated": n}. A DataFrame ``data`` is never
        collected into the driver (as in ``write``).
        Concurrent inserts of the same key make one side fail (Delta conflict check).
        ``commit_metadata`` is recorded in the commit (see ``commit_metadata``)."""

    @abc.abstractmethod
    def commit_metadata(self, table: str) -> list[tuple[int, dict[str, str]]]:
        """(version, metadata) of every commit that recorded ``commit_metadata``,
        oldest first: lets a job find the table version before its own commits."""

    @abc.abstractmethod
    def scan(self, table: str, columns: list[str] | None = None, where: str | None = None,
             version: int | None = None) -> "DataFrame":
        """Only ``columns`` of the rows matching the SQL predicate ``where``, as a
        Spark DataFrame: lets a job read a slice of a growing table cheaply.
        Predicates (here, in ``delete`` and ``replace_where``) are read by each
        engine's own SQL (DataFusion, Spark): keep to what both read alike, i.e.
        bare column names, 'single-quoted' strings, numbers, comparisons, IN,
        AND/OR/NOT, IS [NOT] NULL."""

    def lookup(self, table: str, keys: pa.Table, columns: list[str] | None = None, where: str | None = None,
               version: int | None = None) -> pa.Table:
        """The rows of ``table`` (only ``columns``; matching ``where``) whose key
        columns (the columns of ``keys``) equal a row of ``keys``, into driver
        memory: a night's slice of a history-sized table, found without the
        history ever becoming a Spark DataFrame. Null keys match nothing.
        This default semi-joins in Spark with the keys broadcast."""
        from pyspark.sql import functions as F

        names = keys.column_names
        df = self.scan(table, None, where, version)
        cols = columns or df.columns
        missing = [n for n in [*names, *cols] if n not in df.columns]
        if missing:
            raise LakeError(f"lookup in {table!r}: no column(s) {missing} (it has {df.columns})")
        if keys.num_rows == 0:
            return plain_strings(df.select(*cols).limit(0).toArrow())
        k = self._require_spark().createDataFrame(plain_strings(keys)).distinct()
        return plain_strings(df.join(F.broadcast(k), names, "left_semi").select(*cols).toArrow())

    @abc.abstractmethod
    def delete(self, table: str, predicate: str) -> int:
        """Delete the rows matching the SQL ``predicate``; returns how many went
        (delta-spark: -1 when Delta dropped whole files whose row counts it did
        not know)."""

    @abc.abstractmethod
    def optimize(self, table: str) -> dict[str, int]:
        """Delta's OPTIMIZE (bin-packing compaction, no data change): small
        files of each partition rewritten into few. Returns files removed and
        added. It loses to a concurrent MERGE/DELETE on the same table
        (:class:`ConcurrentRunError`), never the other way round."""
    # ------------------------------------------------------------ erasure (privacy/)
    def delete_keys(self, table: str, keys: pa.Table, *, txn: tuple[str, int] | None = None,
                    commit_metadata: dict | None = None) -> dict[str, int]:
        """Delete the rows whose key columns (the columns of ``keys``) equal a
        row of ``keys``, in one commit: a MERGE whose predicate names only the
        columns, so the values never enter the transaction log (a DELETE's
        predicate would). ``txn=(app_id, version)`` records a Delta app
        transaction in the same commit (see ``app_version``). Returns
        {"rows": deleted, "files_removed": n}; nothing matched: no commit."""
        raise NotImplementedError(f"the {self.name} engine cannot delete by keys")

    def app_version(self, table: str, app_id: str) -> int | None:
        """The latest app transaction version ``app_id`` committed to ``table`` (None: none)."""
        raise NotImplementedError(f"the {self.name} engine cannot read app transactions")

    def vacuum(self, table: str, retention_hours: int, *, enforce_retention: bool = True,
               full: bool = True) -> list[str]:
        """Physically delete files the table no longer references that were
        removed more than ``retention_hours`` ago (``full``: also change-data
        and untracked files; else only removed data files). Returns the files
        deleted. ``enforce_retention=False`` turns Delta's retention check off."""
        raise NotImplementedError(f"the {self.name} engine cannot vacuum")

    def set_log_retention(self, table: str, hours: int) -> None:
        """Lower ``delta.logRetentionDuration`` to ``hours`` when it is longer
        (one commit): old commits' file statistics hold column values too."""
        raise NotImplementedError(f"the {self.name} engine cannot change its log retention")

    def expire_log(self, table: str, version: int | None = None) -> None:
        """Write a log checkpoint at ``version`` (default: the latest) and drop
        the log entries before it that are older than the table's log
        retention as of that version. Versions after it stay readable (a
        change feed not consumed yet)."""
        raise NotImplementedError(f"the {self.name} engine cannot expire its log")


def _normalise_root(root: str) -> str:
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


def to_arrow(data: Data, schema: pa.Schema | None = None) -> pa.Table:
    """Spark DataFrame or Arrow table → Arrow table (cast to ``schema`` if given).
    A DataFrame is collected into the driver: only for small ones (the delta-rs
    engine's ``write``/``merge`` stage night-sized DataFrames instead)."""
    if not isinstance(data, pa.Table):
        data = data.toArrow()
    data = plain_strings(data)
    if schema is not None:
        data = data.select(schema.names).cast(schema)
    return data


def spark_arrow_schema(df: "DataFrame") -> pa.Schema:
    """The Arrow schema of a Spark DataFrame's rows, in ``plain_strings``' types."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return plain_strings(to_arrow_schema(df.schema, timezone="UTC").empty_table()).schema


def plain_strings(table: pa.Table) -> pa.Table:
    """delta-rs returns ``string_view``/``large_string`` and unsigned columns,
    which Spark's createDataFrame rejects: cast them to ``string`` / ``int64``."""
    fields = [pa.field(f.name, _plain_type(f.type), f.nullable) for f in table.schema]
    changed = any(f.type != g.type for f, g in zip(fields, table.schema))
    return table.cast(pa.schema(fields)) if changed else table


def _plain_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string_view(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_unsigned_integer(t):  # CDF's _commit_version; Spark has no unsigned ints
        return pa.int64()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) \
            or pa.types.is_large_list_view(t):  # list columns (histories) come back with view items
        return pa.list_(pa.field(t.value_field.name, _plain_type(t.value_type), t.value_field.nullable))
    return t

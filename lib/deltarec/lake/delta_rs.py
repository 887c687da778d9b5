"""Embedded lake engine: delta-rs (PyPI ``deltalake``), no JVM jars needed.

Spark still does the transforms; small Delta reads/writes go through Arrow on
the driver. What is night-sized does not: the executors read the change feed's
files (``change_feed.py``) and snapshots (``read_on_executors``), write the
night's training examples as Parquet parts the driver only commits
(``part_files.py``: ``replace_partition``, ``read_partition``), and write a
DataFrame given to ``write``/``merge`` as staged Parquet files the driver
streams into delta-rs a batch at a time (``staging.py``).

Over 300 lines because it is one implementation of the whole ``LakeEngine``
contract (tests/test_lake_contract.py), one method per operation.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .engine import LakeEngine, LakeError, ConcurrentRunError, Data, plain_strings, spark_arrow_schema, to_arrow
from .staging import staged

# Commit metadata: one JSON string in the commit's userMetadata, where Delta's
# own writers put it (delta-spark reads it back), so a lake can change engines.
METADATA_KEY = "userMetadata"
LEGACY_METADATA_KEY = "deltarec.metadata"  # lakes written before: read, never written
LOOKUP_IN_LIST = 1000  # distinct key values up to which a lookup's scan filters with an IN list

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def sql_where(filters: list) -> str:
    """[(col, op, value), ...] → a SQL conjunction with quoted literals."""
    ops = {"=", "==", "!=", ">", ">=", "<", "<=", "in"}
    parts = []
    for col, op, value in filters:
        if op not in ops:
            raise LakeError(f"unsupported filter operator {op!r} (use one of {sorted(ops)})")
        if op == "in":
            parts.append(f'"{col}" IN ({", ".join(_literal(v) for v in value)})')
        else:
            parts.append(f'"{col}" {"=" if op == "==" else op} {_literal(value)}')
    return " AND ".join(parts)


def _literal(v) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, bool) or v is None:
        raise LakeError(f"unsupported filter value {v!r}")
    return repr(v)


def _hours(interval: str) -> float:
    """Hours of a Delta interval such as 'interval 30 days' (unknown units: infinity)."""
    units = {"hour": 1, "hours": 1, "day": 24, "days": 24, "week": 168, "weeks": 168, "minute": 1 / 60,
             "minutes": 1 / 60, "second": 1 / 3600, "seconds": 1 / 3600}
    parts = interval.lower().split()
    try:
        return float(parts[1]) * units[parts[2]]
    except (IndexError, KeyError, ValueError):
        return float("inf")


def _arrow_schema(dt) -> pa.Schema:
    return plain_strings(pa.schema(dt.schema()).empty_table()).schema


class DeltaRsEngine(LakeEngine):
    name = "delta-rs"

    def _table(self, table: str, version: int | None = None):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            dt = DeltaTable(self.uri(table))
        except TableNotFoundError:
            raise LakeError(f"Delta table {table!r} does not exist at {self.uri(table)}") from None
        if version is not None:
            if version < 0 or version > dt.version():
                raise LakeError(f"table {table!r} has versions 0..{dt.version()}, not {version}")
            dt.load_as_version(version)
        return dt

    def exists(self, table: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.uri(table))

    def version(self, table: str) -> int | None:
        return self._table(table).version() if self.exists(table) else None

    def read_arrow(self, table: str, version: int | None = None, filters: list | None = None) -> pa.Table:
        # Through delta-rs's own query engine, not to_pyarrow_table(): after the
        # latter, deltalake 1.6.6 often aborts the interpreter at exit
        # ("terminate called without an active exception").
        from deltalake import QueryBuilder

        dt = self._table(table, version)
        sql = "SELECT * FROM t" + (f" WHERE {sql_where(filters)}" if filters else "")
        reader = QueryBuilder().register("t", dt).execute(sql)
        out = pa.RecordBatchReader.from_stream(reader).read_all()
        return plain_strings(out).cast(_arrow_schema(dt)) if out.num_rows == 0 else plain_strings(out)

    def read(self, table: str, version: int | None = None) -> "DataFrame":
        return self._to_spark(self.read_arrow(table, version))

    def read_on_executors(self, table: str, version: int | None = None) -> "DataFrame":
        # The snapshot's Parquet files (listed from the Delta log, which refuses
        # deletion vectors and column mapping) read by the executors, with the
        # table's schema given: no row and no footer reaches the driver.
        from pyspark.sql.pandas.types import from_arrow_schema

        from .delta_log import add_files

        dt = self._table(table, version)
        if dt.metadata().partition_columns:  # partition values live in the log, not the files
            return self.read(table, version)
        schema = from_arrow_schema(_arrow_schema(dt))
        files = add_files(self.uri(table), None, dt.version(), table=table)
        spark = self._require_spark()
        return spark.read.schema(schema).parquet(*files) if files else spark.createDataFrame([], schema)

    def row_count(self, table: str, version: int | None = None) -> int:
        # delta-rs's query engine counts in Rust (file statistics where it can)
        from deltalake import QueryBuilder

        out = QueryBuilder().register("t", self._table(table, version)).execute("SELECT COUNT(*) AS n FROM t")
        return int(pa.RecordBatchReader.from_stream(out).read_all()["n"][0].as_py())

    def read_changes(self, table: str, first: int, last: int) -> "DataFrame":
        dt = self._table(table)
        if first < 0 or first > last or last > dt.version():
            raise LakeError(f"change feed of {table!r}: bad version range {first}..{last} (latest {dt.version()})")
        # The executors read the range's files (change_feed.py); the driver reads its commit JSONs only
        from . import change_feed

        files = change_feed.plan(self.uri(table), dt, first, last, table)
        if files is not None:
            return change_feed.read(self._require_spark(), files)
        cdf = pa.RecordBatchReader.from_stream(dt.load_cdf(starting_version=first, ending_version=last)).read_all()
        return self._to_spark(plain_strings(cdf))

    def data_files(self, table: str, partition: dict[str, str] | None = None) -> list[str]:
        from .delta_log import add_files

        return add_files(self.uri(table), partition, table=table)

    def snapshot_files(self, table: str, version: int) -> list[str]:
        return self._table(table, version).file_uris()

    def history(self, table: str) -> list[dict[str, Any]]:
        return self._table(table).history()

    def create(self, table: str, schema: pa.Schema, partition_by: list[str] | None = None,
               enable_cdf: bool = False) -> None:
        from deltalake import DeltaTable

        if not self.exists(table):
            configuration = {"delta.enableChangeDataFeed": "true"} if enable_cdf else None
            DeltaTable.create(self.uri(table), schema, mode="ignore", partition_by=partition_by,
                              configuration=configuration)

    def write(self, table, data: Data, *, mode="append", partition_by=None, replace_where=None,
              enable_cdf=False, schema=None) -> int:
        from deltalake import write_deltalake

        configuration = {"delta.enableChangeDataFeed": "true"} if enable_cdf and not self.exists(table) else None

        def commit(source) -> int:
            write_deltalake(self.uri(table), source, mode=mode, partition_by=partition_by,
                            predicate=replace_where, configuration=configuration)
            return self._table(table).version()

        if isinstance(data, pa.Table):
            return commit(to_arrow(data, schema))
        # A DataFrame: the executors write it, the driver streams it into delta-rs (staging.py)
        with staged(data, self.root, schema if schema is not None else spark_arrow_schema(data)) as st:
            return commit(st.reader())

    def replace_partition(self, table: str, data: "DataFrame", partition: dict[str, str], schema: pa.Schema,
                          count_by: str | None = None) -> dict[str, Any]:
        # The executors write Parquet files into the table's directory
        # (part_files.py); the driver commits their add actions in one
        # transaction that also removes the partition's previous files.
        import uuid

        from deltalake import CommitProperties, DeltaTable

        from .part_files import add_actions, write_files

        keys = list(partition)
        self.create(table, schema, partition_by=keys)
        file_schema = pa.schema([f for f in schema if f.name not in partition])
        files = write_files(data, self.uri(table), partition, file_schema, uuid.uuid4().hex, count_by)
        dt = self._table(table)
        dt.create_write_transaction(
            add_actions(files, partition), mode="overwrite", schema=schema, partition_by=keys,
            partition_filters=[(k, "=", v) for k, v in partition.items()],
            commit_properties=CommitProperties(custom_metadata={
                METADATA_KEY: json.dumps({**partition, "writer": "executors", "files": str(len(files))})}))
        counts: dict[str, int] = {}
        for f in files:
            for k, n in json.loads(f["counts"]).items():
                counts[k] = counts.get(k, 0) + n
        return {"version": self._table(table).version(), "rows": sum(int(f["rows"]) for f in files),
                "files": len(files), "counts": counts}

    def read_partition(self, table: str, partition: dict[str, str]) -> "DataFrame":
        # The executors read the partition's Parquet files (listed from the Delta
        # log); scan() would read them into the driver first.
        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import from_arrow_schema

        files = self.data_files(table, partition)
        if not files:
            return super().read_partition(table, partition)
        schema = _arrow_schema(self._table(table))
        # the schema given, so Spark runs no job to read it from the files' footers
        files_schema = from_arrow_schema(pa.schema([f for f in schema if f.name not in partition]))
        df = self._require_spark().read.schema(files_schema).parquet(*files)
        return df.select(*[F.lit(partition[n]).alias(n) if n in partition else F.col(n) for n in schema.names])

    def merge(self, table: str, data: Data, on: list[str], *, update: bool,
              commit_metadata: dict[str, str] | None = None, update_if: str | None = None) -> dict[str, int]:
        if not isinstance(data, pa.Table):  # the executors write it, the driver streams it (staging.py)
            target = _arrow_schema(self._table(table))  # cast to the target's types, as a collected source was
            schema = pa.schema([target.field(n) for n in data.columns]) if set(data.columns) <= set(target.names) \
                else spark_arrow_schema(data)
            with staged(data, self.root, schema) as st:
                return self._merge(table, st.reader(), on, update, commit_metadata, update_if)
        return self._merge(table, to_arrow(data), on, update, commit_metadata, update_if)

    def _merge(self, table, source, on, update, commit_metadata, update_if) -> dict[str, int]:
        # source: an Arrow table or a stream of batches (delta-rs's streamed MERGE reads it once)
        from deltalake import CommitProperties
        from deltalake.exceptions import CommitFailedError

        predicate = " AND ".join(f"t.{c} = s.{c}" for c in on)
        props = CommitProperties(custom_metadata={METADATA_KEY: json.dumps(commit_metadata)}) \
            if commit_metadata else None
        merger = self._table(table).merge(source, predicate, source_alias="s", target_alias="t",
                                          commit_properties=props)
        if update:
            merger = merger.when_matched_update_all(predicate=update_if)
        try:
            metrics = merger.when_not_matched_insert_all().execute()
        except CommitFailedError as e:
            raise ConcurrentRunError(f"MERGE into {table!r} lost to a concurrent commit: {e}") from e
        return {"inserted": int(metrics.get("num_target_rows_inserted", 0)),
                "updated": int(metrics.get("num_target_rows_updated", 0))}

    def delete(self, table: str, predicate: str) -> int:
        return int(self._table(table).delete(predicate).get("num_deleted_rows", 0))

    def optimize(self, table: str) -> dict[str, int]:
        from deltalake.exceptions import CommitFailedError

        try:
            m = self._table(table).optimize.compact()
        except CommitFailedError as e:
            raise ConcurrentRunError(f"OPTIMIZE {table!r} lost to a concurrent commit: {e}") from e
        return {"files_removed": int(m.get("numFilesRemoved", 0)), "files_added": int(m.get("numFilesAdded", 0))}
    def delete_keys(self, table: str, keys: pa.Table, *, txn: tuple[str, int] | None = None,
                    commit_metadata: dict | None = None) -> dict[str, int]:
        from deltalake import CommitProperties, Transaction
        from deltalake.exceptions import CommitFailedError

        predicate = " AND ".join(f't."{c}" = s."{c}"' for c in keys.column_names)
        props = CommitProperties(
            custom_metadata={METADATA_KEY: json.dumps(commit_metadata)} if commit_metadata else None,
            app_transactions=[Transaction(txn[0], txn[1])] if txn else None)
        try:
            m = self._table(table).merge(plain_strings(keys), predicate, source_alias="s", target_alias="t",
                                         commit_properties=props).when_matched_delete().execute()
        except CommitFailedError as e:
            raise ConcurrentRunError(f"erasing keys from {table!r} lost to a concurrent commit: {e}") from e
        return {"rows": int(m.get("num_target_rows_deleted", 0)),
                "files_removed": int(m.get("num_target_files_removed", 0))}

    def app_version(self, table: str, app_id: str) -> int | None:
        v = self._table(table).transaction_version(app_id)
        return None if v is None else int(v)

    def vacuum(self, table: str, retention_hours: int, *, enforce_retention: bool = True,
               full: bool = True) -> list[str]:
        from deltalake.exceptions import DeltaError

        try:
            return list(self._table(table).vacuum(retention_hours, dry_run=False,
                                                  enforce_retention_duration=enforce_retention, full=full))
        except DeltaError as e:
            raise LakeError(f"VACUUM {table!r} with retention {retention_hours} hours failed: {e}") from e

    def set_log_retention(self, table: str, hours: int) -> None:
        dt = self._table(table)
        key = "delta.logRetentionDuration"
        current = dt.metadata().configuration.get(key)
        if current is None or _hours(current) > hours:
            dt.alter.set_table_properties({key: f"interval {int(hours)} hours"}, raise_if_not_exists=False)

    def expire_log(self, table: str, version: int | None = None) -> None:
        dt = self._table(table, version)
        dt.create_checkpoint()
        dt.cleanup_metadata()

    def commit_metadata(self, table: str) -> list[tuple[int, dict[str, str]]]:
        out = []
        for h in self.history(table):
            raw = h.get(METADATA_KEY) or h.get(LEGACY_METADATA_KEY)
            try:
                meta = json.loads(raw) if raw else None
            except ValueError:
                meta = None  # someone else's free-text userMetadata
            if isinstance(meta, dict):
                out.append((int(h["version"]), meta))
        return sorted(out, key=lambda vm: vm[0])

    def scan(self, table: str, columns: list[str] | None = None, where: str | None = None,
             version: int | None = None) -> "DataFrame":
        # delta-rs's query engine prunes files by their statistics and reads
        # only the named columns before anything crosses into Spark.
        from deltalake import QueryBuilder

        dt = self._table(table, version)
        cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        sql = f"SELECT {cols} FROM t" + (f" WHERE {where}" if where else "")
        out = pa.RecordBatchReader.from_stream(QueryBuilder().register("t", dt).execute(sql)).read_all()
        out = plain_strings(out)
        if out.num_rows == 0:  # one empty chunk per column: Spark rejects chunkless columns
            schema = _arrow_schema(dt)
            out = pa.table({n: pa.array([], schema.field(n).type) for n in out.column_names})
        return self._to_spark(out)

    def lookup(self, table: str, keys: pa.Table, columns: list[str] | None = None, where: str | None = None,
               version: int | None = None) -> pa.Table:
        # delta-rs's query engine reads the needed columns (a few keys go into
        # the scan as IN lists, so files are skipped by their statistics), the
        # semi-join with the keys runs in Arrow: nothing history-sized reaches
        # Spark, and the cost per history row is a column read in Rust.
        import pyarrow.compute as pc
        from deltalake import QueryBuilder

        dt = self._table(table, version)
        schema = _arrow_schema(dt)
        names = keys.column_names
        cols = columns or schema.names
        missing = [n for n in [*names, *cols] if n not in schema.names]
        if missing:
            raise LakeError(f"lookup in {table!r}: no column(s) {missing} (it has {schema.names})")
        keys = plain_strings(keys).group_by(names).aggregate([])  # distinct key rows
        conds = [f"({where})"] if where else []
        for n in names:
            values = pc.unique(keys[n].drop_null())
            if len(values) == 0:
                return pa.table({n: pa.array([], schema.field(n).type) for n in cols})
            if len(values) <= LOOKUP_IN_LIST:
                conds.append(f'"{n}" IN ({", ".join(_literal(v) for v in values.to_pylist())})')
        need = ", ".join(f'"{c}"' for c in dict.fromkeys([*cols, *names]))
        sql = f"SELECT {need} FROM t" + (f" WHERE {' AND '.join(conds)}" if conds else "")
        out = plain_strings(pa.RecordBatchReader.from_stream(QueryBuilder().register("t", dt).execute(sql)).read_all())
        if out.num_rows:  # join on the keys and a row number only: Arrow joins carry no list columns
            import numpy as np

            pos = out.select(names).append_column("_row", pa.array(np.arange(out.num_rows)))
            hit = np.sort(pos.join(keys, keys=names, join_type="left semi")["_row"].to_numpy())
            out = out.take(hit) if len(hit) < out.num_rows else out
        if out.num_rows == 0:  # one empty chunk per column: Spark rejects chunkless columns
            return pa.table({n: pa.array([], schema.field(n).type) for n in cols})
        return out.select(cols).combine_chunks()

    def _to_spark(self, arrow: pa.Table) -> "DataFrame":
        spark = self._require_spark()
        return spark.createDataFrame(arrow)

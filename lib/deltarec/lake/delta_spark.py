"""Cluster lake engine: delta-spark (the Delta JVM extension on Spark's classpath).

Reads and writes go through Spark executors; nothing is collected to the
driver except the small tables read with ``read_arrow``. Works with classic
sessions and with Spark Connect ones (Databricks shared clusters and
serverless: no JVM gateway; Delta's Python client is ``delta.connect``).
Checked against delta-io/delta 4.4's Python sources (``delta/tables.py``,
``delta/exceptions``, ``delta/connect``): conflicts are classified in
``conflicts.py``, MERGE counts come from ``execute()``, commit metadata is
the commit's ``userMetadata`` (what delta-rs writes too), and training files
come from the Delta log (``delta_log.py``).

Over 300 lines because it is one implementation of the whole ``LakeEngine``
contract (tests/test_lake_contract.py), one method per operation.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import delta_log
from .conflicts import delta_conflict
from .engine import ConcurrentRunError, Data, LakeEngine, LakeError, plain_strings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"  # the session conf MERGE records

log = logging.getLogger("deltarec.lake")


def is_connect(spark: "SparkSession") -> bool:
    """A Spark Connect session (Databricks shared clusters, serverless): no JVM
    gateway, no SparkContext; Delta's Python API goes through delta.connect."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _delta_table_class(spark: "SparkSession"):
    if is_connect(spark):
        import delta.connect.exceptions  # noqa: F401 - installs Delta's conversion of Connect errors
        from delta.connect.tables import DeltaTable
    else:
        import delta.exceptions  # noqa: F401 - installs Delta's conversion of py4j errors (before any MERGE)
        from delta.tables import DeltaTable
    return DeltaTable


def delta_available(spark: "SparkSession") -> bool:
    """True when Delta Lake works in this session.

    Classic sessions: the class is looked up through py4j's JVM view, which
    uses the context class loader: jars from ``--packages``/``--jars``/
    ``spark.jars`` live there, not in the application class loader that
    ``Class.forName`` would ask. Spark Connect: the server has no gateway to
    ask; Delta's Python client answers (a path that is no table is simply not
    a Delta table on a server with Delta, an error on one without)."""
    jvm = getattr(spark, "_jvm", None)
    if jvm is not None:
        from py4j.java_gateway import JavaClass

        try:
            return isinstance(jvm.io.delta.tables.DeltaTable, JavaClass)
        except Exception:
            return False
    if not is_connect(spark):
        return False
    try:
        _delta_table_class(spark).isDeltaTable(spark, "/__deltarec_probe_no_table__")
        return True
    except Exception as e:  # no delta package, or a server without Delta
        log.debug("Delta is not available through this Spark Connect session: %s", e)
        return False


class DeltaSparkEngine(LakeEngine):
    name = "delta-spark"

    def __init__(self, root: str, spark: "SparkSession | None" = None):
        super().__init__(root, spark)
        spark = self._require_spark()
        if not delta_available(spark):
            where = ("this Spark Connect session has no Delta Lake (pip install delta-spark on this side; the "
                     "server needs Delta's Connect plugin)" if is_connect(spark) else
                     "the Delta Lake jars are not on Spark's classpath: start Spark with --packages "
                     "io.delta:delta-spark_2.13:<version> (or --jars with Delta's jars, comma-separated, and "
                     "pip install delta-spark)")
            raise LakeError(f"lake.engine=delta-spark but {where}, or set lake.engine=delta-rs")
        self._DeltaTable = _delta_table_class(spark)

    def _dt(self, table: str):
        if not self.exists(table):
            raise LakeError(f"Delta table {table!r} does not exist at {self.uri(table)}")
        return self._DeltaTable.forPath(self.spark, self.uri(table))

    def exists(self, table: str) -> bool:
        return bool(self._DeltaTable.isDeltaTable(self.spark, self.uri(table)))

    def version(self, table: str) -> int | None:
        if not self.exists(table):
            return None
        return int(self._dt(table).history(1).select("version").first()[0])

    def _latest(self, table: str) -> int:
        latest = self.version(table)
        if latest is None:
            raise LakeError(f"Delta table {table!r} does not exist at {self.uri(table)}")
        return latest

    def read(self, table: str, version: int | None = None) -> "DataFrame":
        latest = self._latest(table)
        reader = self.spark.read.format("delta")
        if version is not None:
            if version < 0 or version > latest:  # Spark's own error would not say which versions exist
                raise LakeError(f"table {table!r} has versions 0..{latest}, not {version}")
            reader = reader.option("versionAsOf", version)
        return reader.load(self.uri(table))

    def read_arrow(self, table: str, version: int | None = None, filters: list | None = None) -> pa.Table:
        df = self.read(table, version)
        for col, op, value in filters or []:
            df = df.where(_filter_expr(col, op, value))
        return plain_strings(df.toArrow())

    def read_changes(self, table: str, first: int, last: int) -> "DataFrame":
        latest = self._latest(table)
        if first < 0 or first > last or last > latest:
            raise LakeError(f"change feed of {table!r}: bad version range {first}..{last} (latest {latest})")
        return (
            self.spark.read.format("delta")
            .option("readChangeFeed", "true")
            .option("startingVersion", first)
            .option("endingVersion", last)
            .load(self.uri(table))
        )

    def data_files(self, table: str, partition: dict[str, str] | None = None) -> list[str]:
        # From the Delta log's add actions of the partition (delta_log.py). Not
        # DataFrame.inputFiles(): it lists every file of the table unless Delta's SQL
        # extension pruned the scan, and a night would train on every run's examples.
        try:
            return delta_log.add_files(self.uri(table), partition, table=table)
        except LakeError:
            raise
        except Exception as e:  # delta-rs cannot open it here (credentials only Spark has, a newer protocol)
            log.warning("listing %s through delta-rs failed (%s: %s); asking Delta through Spark instead",
                        table, type(e).__name__, e)
        return self._files_through_spark(table, partition)

    def _files_through_spark(self, table: str, partition: dict[str, str] | None) -> list[str]:
        """Delta's own snapshot: the files holding the partition's rows (the partition
        filter prunes Delta's file index; only those files' footers are read)."""
        from pyspark.sql import functions as F

        detail = self._dt(table).detail().first().asDict()
        problem = delta_log.raw_parquet_problem(detail.get("properties"), detail.get("tableFeatures"))
        if problem:
            raise LakeError(f"training workers read {table!r} ({self.uri(table)}) as plain Parquet, but {problem}")
        df = self.read(table)
        for k, v in (partition or {}).items():
            df = df.where(F.col(k) == v)
        return sorted(r[0] for r in df.select(F.col("_metadata.file_path")).distinct().collect())

    def snapshot_files(self, table: str, version: int) -> list[str]:
        return sorted(self.read(table, version).inputFiles())

    def history(self, table: str) -> list[dict[str, Any]]:
        return [r.asDict(recursive=True) for r in self._dt(table).history().collect()]

    def _to_df(self, data: Data, schema: pa.Schema | None = None) -> "DataFrame":
        if isinstance(data, pa.Table):
            if schema is not None:
                data = data.select(schema.names).cast(schema)
            return self.spark.createDataFrame(plain_strings(data))
        if schema is None:
            return data
        from pyspark.sql import functions as F

        want = self.spark.createDataFrame(plain_strings(schema.empty_table())).schema
        return data.select(*[F.col(f.name).cast(f.dataType) for f in want])  # cast, as delta-rs does

    def create(self, table: str, schema: pa.Schema, partition_by: list[str] | None = None,
               enable_cdf: bool = False) -> None:
        self._create(table, self._to_df(schema.empty_table()).schema, partition_by, enable_cdf)

    def _create(self, table, spark_schema, partition_by, enable_cdf) -> None:
        builder = self._DeltaTable.createIfNotExists(self.spark).location(self.uri(table)).addColumns(spark_schema)
        if partition_by:
            builder = builder.partitionedBy(*partition_by)
        if enable_cdf:
            builder = builder.property("delta.enableChangeDataFeed", "true")
        builder.execute()

    def write(self, table, data: Data, *, mode="append", partition_by=None, replace_where=None,
              enable_cdf=False, schema=None) -> int:
        df = self._to_df(data, schema)
        if enable_cdf and not self.exists(table):
            # CDF must be on from version 0, or reading the feed from 0 fails.
            self._create(table, df.schema, partition_by, enable_cdf=True)
        writer = df.write.format("delta").mode(mode)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        if replace_where:
            writer = writer.option("replaceWhere", replace_where)
        writer.save(self.uri(table))
        return int(self.version(table))

    def replace_partition(self, table: str, data: "DataFrame", partition: dict[str, str], schema: pa.Schema,
                          count_by: str | None = None) -> dict[str, Any]:
        # Delta's own writer runs on the executors; the counts are one more job over the cached rows.
        keys = list(partition)
        self.create(table, schema, partition_by=keys)
        df = self._to_df(data, schema).persist()
        try:
            where = " AND ".join(f"`{k}` = '{str(v).replace(chr(39), chr(39) * 2)}'" for k, v in partition.items())
            df.write.format("delta").mode("overwrite").option("replaceWhere", where).partitionBy(*keys) \
                .save(self.uri(table))
            counts = {str(r[0]): int(r[1]) for r in df.groupBy(count_by).count().collect()} if count_by else {}
            rows = sum(counts.values()) if count_by else df.count()
        finally:
            df.unpersist()
        return {"version": self._latest(table), "rows": rows, "files": len(self.data_files(table, partition)),
                "counts": counts}

    def merge(self, table: str, data: Data, on: list[str], *, update: bool,
              commit_metadata: dict[str, str] | None = None, update_if: str | None = None) -> dict[str, int]:
        import json

        cond = " AND ".join(f"t.`{c}` = s.`{c}`" for c in on)
        builder = self._dt(table).alias("t").merge(self._to_df(data).alias("s"), cond)
        if update:
            builder = builder.whenMatchedUpdateAll(condition=update_if)
        if commit_metadata:  # recorded as the commit's userMetadata; session-wide, so reset right after
            self.spark.conf.set(USER_METADATA, json.dumps(commit_metadata))
        try:
            # Delta 4.x returns this MERGE's own counts (history(1) could be another writer's commit).
            counts = builder.whenNotMatchedInsertAll().execute().first()
        except Exception as e:
            _raise_if_conflict(e, f"MERGE into {table!r}")
            raise
        finally:
            if commit_metadata:
                self.spark.conf.unset(USER_METADATA)
        # No row: Delta skipped the MERGE as already applied (an idempotent txnAppId/txnVersion retry).
        return {"inserted": int(counts["num_inserted_rows"]) if counts else 0,
                "updated": int(counts["num_updated_rows"]) if counts else 0}

    def commit_metadata(self, table: str) -> list[tuple[int, dict[str, str]]]:
        import json

        rows = self._dt(table).history().select("version", "userMetadata").collect()
        out = []
        for r in rows:
            try:  # delta-rs writes the same commitInfo.userMetadata (see delta_rs.METADATA_KEY)
                meta = json.loads(r["userMetadata"]) if r["userMetadata"] else None
            except ValueError:
                meta = None  # someone else's free-text userMetadata
            if isinstance(meta, dict):
                out.append((int(r["version"]), meta))
        return sorted(out, key=lambda vm: vm[0])

    def scan(self, table: str, columns: list[str] | None = None, where: str | None = None,
             version: int | None = None) -> "DataFrame":
        df = self.read(table, version)
        if where:
            df = df.where(where)
        return df.select(*columns) if columns else df

    def delete(self, table: str, predicate: str) -> int:
        # SQL DELETE returns this commit's own count; DeltaTable.delete() returns None.
        self._dt(table)  # a clear error when the table is missing
        path = self.uri(table).replace("`", "``")
        try:
            n = self.spark.sql(f"DELETE FROM delta.`{path}` WHERE {predicate}").first()
        except Exception as e:
            _raise_if_conflict(e, f"DELETE from {table!r}")
            raise
        return int(n["num_affected_rows"]) if n else 0

    def optimize(self, table: str) -> dict[str, int]:
        # DeltaOptimizeBuilder.executeCompaction() returns (path, metrics) with
        # OptimizeMetrics' numFilesAdded / numFilesRemoved (delta-spark 4.x).
        try:
            row = self._dt(table).optimize().executeCompaction().first()
        except Exception as e:
            _raise_if_conflict(e, f"OPTIMIZE {table!r}")
            raise
        m = row["metrics"] if row else None
        return {"files_removed": int(m["numFilesRemoved"]) if m else 0,
                "files_added": int(m["numFilesAdded"]) if m else 0}

    # ------------------------------------------------------------ erasure (privacy/)
    def delete_keys(self, table: str, keys: pa.Table, *, txn: tuple[str, int] | None = None,
                    commit_metadata: dict | None = None) -> dict[str, int]:
        """The app transaction goes through Delta's idempotent-DML session
        settings (``spark.databricks.delta.write.txnAppId/txnVersion``): a
        repeat with the same pair is skipped by Delta itself. It is also kept
        in the commit's userMetadata, where ``app_version`` reads it back."""
        import json

        cond = " AND ".join(f"t.`{c}` = s.`{c}`" for c in keys.column_names)
        settings = {}
        meta = dict(commit_metadata or {})
        if txn:
            meta.update(app_id=txn[0], app_version=int(txn[1]))
            settings.update({"spark.databricks.delta.write.txnAppId": txn[0],
                             "spark.databricks.delta.write.txnVersion": str(int(txn[1]))})
        if meta:
            settings["spark.databricks.delta.commitInfo.userMetadata"] = json.dumps(meta)
        before = self.version(table)
        for k, v in settings.items():  # session-wide: reset right after
            self.spark.conf.set(k, v)
        try:
            self._dt(table).alias("t").merge(self._to_df(keys).alias("s"), cond).whenMatchedDelete().execute()
        except Exception as e:
            if "Concurrent" in type(e).__name__ or "Concurrent" in str(e):
                raise ConcurrentRunError(f"erasing keys from {table!r} lost to a concurrent commit: {e}") from e
            raise
        finally:
            for k in settings:
                self.spark.conf.unset(k)
        if self.version(table) == before:
            return {"rows": 0, "files_removed": 0}
        metrics = self._dt(table).history(1).select("operationMetrics").first()[0] or {}
        return {"rows": int(metrics.get("numTargetRowsDeleted", 0)),
                "files_removed": int(metrics.get("numTargetFilesRemoved", 0))}

    def app_version(self, table: str, app_id: str) -> int | None:
        found = [int(m["app_version"]) for _, m in self.commit_metadata(table)
                 if m.get("app_id") == app_id and "app_version" in m]
        return max(found) if found else None

    def vacuum(self, table: str, retention_hours: int, *, enforce_retention: bool = True,
               full: bool = True) -> list[str]:
        key = "spark.databricks.delta.retentionDurationCheck.enabled"
        sql = f"VACUUM delta.`{self.uri(table)}`{'' if full else ' LITE'} RETAIN {int(retention_hours)} HOURS"
        if not enforce_retention:
            self.spark.conf.set(key, "false")
        try:
            files = [r[0] for r in self.spark.sql(sql + " DRY RUN").collect()]
            self.spark.sql(sql)
        except Exception as e:
            raise LakeError(f"{sql} failed: {e}") from e
        finally:
            if not enforce_retention:
                self.spark.conf.unset(key)
        return files

    def set_log_retention(self, table: str, hours: int) -> None:
        self.spark.sql(f"ALTER TABLE delta.`{self.uri(table)}` SET TBLPROPERTIES "
                       f"('delta.logRetentionDuration' = 'interval {int(hours)} hours')")

    def expire_log(self, table: str, version: int | None = None) -> None:
        """Nothing to call: Delta drops expired log entries itself when it
        writes a checkpoint (every 10 commits), by age alone, so ``version``
        cannot hold it back; keep privacy.retention_hours above the longest
        gap between nights, or a change feed not consumed yet loses its log."""
        return None


def _raise_if_conflict(e: Exception, what: str) -> None:
    kind = delta_conflict(e)
    if kind:
        raise ConcurrentRunError(f"{what} lost to a concurrent commit ({kind}): {e}") from e


def _filter_expr(col: str, op: str, value: Any):
    from pyspark.sql import functions as F

    c = F.col(col)
    ops = {"=": c.__eq__, "==": c.__eq__, "!=": c.__ne__, ">": c.__gt__, ">=": c.__ge__, "<": c.__lt__,
           "<=": c.__le__, "in": lambda v: c.isin(list(v))}
    if op not in ops:
        raise LakeError(f"unsupported filter operator {op!r} (use one of {sorted(ops)})")
    return ops[op](value)

"""A Delta table's change data feed, read by Spark's executors: the delta-rs
engine's ``read_changes`` without the night's rows passing through the driver.

The driver reads only the commit JSONs of the range (``_delta_log/<v>.json``,
a few KB each) and lists their files with Delta's CDF rules, as delta-rs's
``load_cdf`` does (``operations/load_cdf.rs``, ``determine_files_to_read``):

- a commit WITH ``cdc`` actions contributes exactly its ``_change_data``
  files, whose rows carry their ``_change_type``;
- a commit without them contributes its ``add`` files (``dataChange``: rows
  inserted) and its ``remove`` files (``dataChange``: rows deleted);
- ``_commit_version`` is the commit's version, ``_commit_timestamp`` its
  ``commitInfo.timestamp`` (milliseconds; 0 without one), as an Arrow
  ``timestamp[ms]`` handed to Spark as delta-rs's is.

The executors read every file in one ``spark.read.parquet`` with the table's
schema given, and each row gets its version, timestamp and (for add/remove
files) change type from a small broadcast DataFrame of (file, version, ...),
joined on the file's name: Delta names data files with a UUID, the name is
the same in every URI form Spark or the log may write (``file:/``,
``file:///``, percent-encoding), and a file added at v1 and removed at v3
yields its rows twice, as it should.

``plan`` returns None (the caller reads through delta-rs, in the driver) where
raw Parquet would be wrong or where delta-rs's own rules are subtler than the
ones above: deletion vectors, column mapping, partitioned tables (partition
values live in the log), a schema or change-feed setting changed within the
range, two files of one name. A range whose log entries are gone is refused
(:class:`LakeError`) in both paths alike.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa

from .delta_log import raw_parquet_problem
from .engine import CHANGE_COLUMNS, LakeError
from .uri import filesystem, is_absolute, join

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger("deltarec.lake")

FILE = "_cf_file"  # the join key: a data file's name
KIND = "_cf_kind"  # insert/delete for add/remove files; null for _change_data files (their rows say)
MAPPING_SCHEMA = pa.schema([(FILE, pa.string()), (KIND, pa.string()), ("_commit_version", pa.int64()),
                            ("_commit_timestamp", pa.timestamp("ms"))])  # load_cdf's types, as Spark gets them


@dataclass
class ChangeFiles:
    files: list[str]  # distinct paths in the table URI's own form, sorted
    mapping: pa.Table  # MAPPING_SCHEMA: one row per (file, version) the range reads it at
    schema: pa.Schema  # the table's (latest) schema: what load_cdf reads the files with
    table: str = ""  # its name, for errors


def commit_actions(uri: str, version: int, table: str) -> list[dict[str, Any]]:
    """The actions of commit ``version`` of the table at ``uri``; LakeError
    naming the version when its log entry is gone (expired)."""
    fs, root = filesystem(uri)
    path = f"{root.rstrip('/')}/_delta_log/{version:020d}.json"
    try:
        if fs is None:
            with open(path, "rb") as f:
                raw = f.read()
        else:
            with fs.open_input_stream(path) as f:
                raw = f.read()
    except FileNotFoundError:
        raise LakeError(
            f"change feed of {table!r}: the log entry of version {version} ({path}) is gone: the table's log "
            "was expired past it (delta.logRetentionDuration, checkpoints). Versions before the oldest log entry "
            "cannot be read as changes: retrain from the table's current rows (a full run), or restore the log"
        ) from None
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def plan(uri: str, dt, first: int, last: int, table: str) -> ChangeFiles | None:
    """The files of versions first..last of the table at ``uri`` (``dt``: its
    latest delta-rs snapshot) and their mapping, or None when they must be read
    through delta-rs (the reason is logged)."""
    latest = dt.version()
    proto = dt.protocol()
    problem = raw_parquet_problem(dt.metadata().configuration,
                                  [*(proto.reader_features or []), *(proto.writer_features or [])])
    if dt.metadata().partition_columns:
        problem = "it is partitioned (partition values live in the log, not in the files)"
    rows: list[tuple[str, str | None, int, int]] = []
    names: dict[str, str] = {}
    schemas: set[str] = set()
    # Commits after `last` matter only for their schema: load_cdf reads with the latest one.
    for v in range(first, latest + 1):
        actions = commit_actions(uri, v, table)
        if problem:
            continue  # every log entry of the range is still checked for expiry
        for a in actions:
            md = a.get("metaData")
            if md is not None:
                schemas.add(_canonical(md.get("schemaString")))
                cdf = str((md.get("configuration") or {}).get("delta.enableChangeDataFeed", "")).lower()
                if v <= last and cdf != "true":  # delta-rs says whether the feed was recorded
                    problem = f"version {v} changed the change feed setting (delta.enableChangeDataFeed={cdf!r})"
        if v > last or problem:
            continue
        ts = next((int(a["commitInfo"].get("timestamp") or 0) for a in actions if "commitInfo" in a), 0)
        cdc = [a["cdc"] for a in actions if "cdc" in a]
        picked = [(c, None) for c in cdc] if cdc else \
            [(a["add"], "insert") for a in actions if "add" in a and a["add"].get("dataChange", True)] + \
            [(a["remove"], "delete") for a in actions if "remove" in a and a["remove"].get("dataChange", True)]
        for f, kind in picked:
            if f.get("deletionVector"):
                problem = f"version {v} has a deletion vector on {f['path']}"
                break
            path = unquote(f["path"])
            name = path.rsplit("/", 1)[-1]
            if names.setdefault(name, path) != path:
                problem = f"two of its files are both named {name!r}"
                break
            rows.append((name, kind, v, ts))
    # Files written before a schema change in the range hold the old columns (version 0's schema is the first)
    if not problem and schemas and (len(schemas) > 1 or (first > 0 and schemas != {_schema_before(uri, first)})):
        problem = f"its schema changed between versions {first} and {latest}"
    if problem:
        log.info("change feed of %s %d..%d read through delta-rs in the driver: %s", table, first, last, problem)
        return None
    mapping = pa.table({FILE: [r[0] for r in rows], KIND: [r[1] for r in rows],
                        "_commit_version": [r[2] for r in rows], "_commit_timestamp": [r[3] for r in rows]},
                       schema=MAPPING_SCHEMA)
    files = sorted({p if is_absolute(p) else join(uri, p) for p in names.values()})
    from .engine import plain_strings

    return ChangeFiles(files, mapping, plain_strings(pa.schema(dt.schema()).empty_table()).schema, table)


def read(spark: "SparkSession", cf: ChangeFiles) -> "DataFrame":
    """The change rows of ``cf``'s files, read by the executors: the table's
    columns, then CHANGE_COLUMNS (as ``load_cdf`` returns them)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    # _change_data files carry _change_type; in add/remove files it is missing, so read as null
    file_schema = from_arrow_schema(pa.schema([*cf.schema, pa.field("_change_type", pa.string())]))
    mapping = spark.createDataFrame(cf.mapping)  # built in Arrow like delta-rs's rows were: the same Spark types
    if cf.files:
        try:  # Spark lists the files now: a missing one fails here
            rows = spark.read.schema(file_schema).parquet(*cf.files)
        except Exception as e:
            gone = _missing(cf.files) if "PATH_NOT_FOUND" in str(e) else []
            if not gone:
                raise
            raise LakeError(
                f"change feed of {cf.table!r}: data file {gone[0]} not found ({len(gone)} of the range's "
                f"{len(cf.files)} files missing), though the log still lists it: it was VACUUMed or removed before "
                "this range was read. Restore the files from a backup, or start the model over on the table's "
                "current snapshot") from e
        # The file's name from the path Spark read it at (URL-encoded; '+' is literal there, not a space).
        path = F.url_decode(F.regexp_replace(F.col("_metadata.file_path"), r"\+", "%2B"))
        rows = rows.withColumn(FILE, F.element_at(F.split(path, "/"), -1))
    else:
        rows = spark.createDataFrame([], file_schema).withColumn(FILE, F.lit(None).cast("string"))
    return rows.join(F.broadcast(mapping), FILE).select(
        *cf.schema.names, F.coalesce(F.col("_change_type"), F.col(KIND)).alias("_change_type"),
        *CHANGE_COLUMNS[1:])


def _missing(files: list[str]) -> list[str]:
    """The files that do not exist (asked only after a read failed)."""
    out = []
    for f in files:
        fs, path = filesystem(f)
        if (not os.path.exists(path)) if fs is None else fs.get_file_info(path).type.name == "NotFound":
            out.append(path if fs is None else f)
    return out


def _schema_before(uri: str, first: int) -> str:
    """The table's schema as of version first - 1 (first > 0), canonical."""
    from deltalake import DeltaTable

    from .uri import delta_rs_uri

    return _canonical(DeltaTable(delta_rs_uri(uri), version=first - 1).schema().to_json())


def _canonical(schema_string: str | None) -> str | None:
    return None if schema_string is None else json.dumps(json.loads(schema_string), sort_keys=True)

"""A Delta table's data files, from its transaction log: what training
workers read as raw Parquet.

Both engines list files here, through delta-rs's log reader (no JVM, no
Spark job): the add actions of the snapshot, filtered on their partition
values (exact values, not a path pattern, so escaping and column mapping's
random prefixes do not matter). Spark's ``DataFrame.inputFiles()`` is no
substitute: it returns every file of the table unless Delta's SQL extension
pruned the scan first.

Workers bypass Delta when they read those files, so a table whose files do
not hold exactly its rows under their own column names is refused, naming
the setting: deletion vectors (rows deleted without rewriting the file) and
column mapping (physical column names differ from the table's).
"""
from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import unquote

from .engine import LakeError
from .uri import delta_rs_uri, is_absolute, join


def raw_parquet_problem(configuration: dict[str, Any] | None, features: Iterable[str] | None = ()) -> str | None:
    """Why raw Parquet reads of a table with this configuration and these
    (reader/writer) table features would be wrong, or None."""
    conf = {k.lower(): str(v).lower() for k, v in (configuration or {}).items()}
    feats = {f.lower() for f in features or ()}
    if conf.get("delta.enabledeletionvectors") == "true" or "deletionvectors" in feats:
        return ("it has deletion vectors (delta.enableDeletionVectors): its Parquet files still hold deleted "
                "rows. Turn them off and rewrite the files (ALTER TABLE ... SET TBLPROPERTIES "
                "('delta.enableDeletionVectors' = false), then REORG TABLE ... APPLY (PURGE))")
    mode = conf.get("delta.columnmapping.mode", "none")
    if mode != "none" or "columnmapping" in feats:
        return (f"it uses column mapping (delta.columnMapping.mode={mode}): its Parquet files name columns "
                "differently from the table. Write training examples to a table without column mapping")
    return None


def add_files(uri: str, partition: dict[str, str] | None = None, version: int | None = None,
              table: str | None = None) -> list[str]:
    """Paths (in ``uri``'s own form) of the data files of the table at ``uri``
    (as of ``version``; of the rows whose partition columns equal
    ``partition``), sorted. Raises LakeError when workers could not read them
    as raw Parquet, or when a ``partition`` key is not a partition column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    name = table or uri
    try:
        dt = DeltaTable(delta_rs_uri(uri), version=version)
    except TableNotFoundError:
        raise LakeError(f"Delta table {name!r} does not exist at {uri}") from None
    proto = dt.protocol()
    problem = raw_parquet_problem(dt.metadata().configuration,
                                  [*(proto.reader_features or []), *(proto.writer_features or [])])
    if problem:
        raise LakeError(f"training workers read {name!r} ({uri}) as plain Parquet, but {problem}")
    actions = pa.table(dt.get_add_actions(flatten=True))
    columns = set(dt.metadata().partition_columns)
    keep = None
    for k, v in (partition or {}).items():
        if k not in columns:
            raise LakeError(f"{name!r} is not partitioned by {k!r} (its partition columns: {sorted(columns)})")
        hit = pc.fill_null(pc.equal(actions[f"partition.{k}"], v), False) if v is not None \
            else pc.is_null(actions[f"partition.{k}"])
        keep = hit if keep is None else pc.and_(keep, hit)
    if keep is not None:
        actions = actions.filter(keep)
    # add paths are URI-encoded, relative to the table root (or absolute: a shallow clone's)
    paths = (unquote(p) for p in actions["path"].to_pylist())
    return sorted(p if is_absolute(p) else join(uri, p) for p in paths)

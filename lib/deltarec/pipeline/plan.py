"""What the next nightly run would do, computed without writing anything.

``plan`` reads the ledger's watermark, the source table's latest version and
the change feed of the versions in between; it never creates a table (not
even an empty ledger), so it is safe on a production lake and in dry runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..lake import open_lake
from ..lake.ledger import Ledger
from .strategy import choose_strategy

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine


def plan(spark: "SparkSession", cfg: "Config", *, lake: "LakeEngine | None" = None) -> dict[str, Any]:
    """The next run of ``cfg.model.name`` over ``cfg.lake.events_table``:

    - ``watermark``: last source version consumed by a committed run (-1: none);
    - ``latest_version``: the source table's latest version (None: no table);
    - ``next_range``: ``(first, last)`` versions the next run would consume, or
      None when there is nothing new;
    - ``change_types``: change-feed rows per ``_change_type`` in that range
      (``rows``: their total);
    - ``cancellations``: inserted / updated rows that are cancellations (they
      become retractions of earlier purchases, not events);
    - ``drift``: the schema-drift stop the night would hit, or None;
    - ``strategy``, ``parent``: what the night would train and from which run
      (the same :func:`~deltarec.pipeline.strategy.choose_strategy` the night
      calls: the usable champion, not merely the newest run), or ``error``
      when the night would refuse to run.
    """
    from pyspark.sql import functions as F

    lake = lake or open_lake(cfg.lake, spark)
    tables = cfg.lake
    ledger = Ledger(lake, tables.runs_table)
    runs = ledger.runs(cfg.model.name)
    watermark = ledger.watermark(cfg.model.name)
    latest = lake.version(tables.events_table)
    next_range = (watermark + 1, latest) if latest is not None and latest > watermark else None
    change_types: dict[str, int] = {}
    cancellations = 0
    drift = None
    if next_range is not None:
        from ..features.changes import map_source
        from ..features.validate import CANCEL

        changes = lake.read_changes(tables.events_table, *next_range)
        drift = schema_drift(cfg, lake, changes, next_range[0])
        if cfg.source.columns is not None:  # your own table: cancellations are known after the mapping
            changes = map_source(changes, cfg.source.columns, key=cfg.source.key, event_types=cfg.source.event_types)
        is_cancel = F.col("_change_type").isin("insert", "update_postimage") & (F.col("event_type") == CANCEL)
        counts = (changes.groupBy("_change_type")
                  .agg(F.count(F.lit(1)).alias("n"), F.sum(is_cancel.cast("long")).alias("c")).collect())
        change_types = {r["_change_type"]: int(r["n"]) for r in sorted(counts, key=lambda r: r["_change_type"])}
        cancellations = sum(int(r["c"] or 0) for r in counts)
    strategy = parent = error = None
    if next_range is not None:
        try:
            choice = choose_strategy(cfg, ledger)
            strategy, parent = choice.strategy, (choice.parent.run_id if choice.parent else None)
        except ValueError as e:  # the night would refuse to run: say why
            error = str(e)
    if latest is None:
        note = (f"no source table {lake.uri(tables.events_table)}: "
                + ("the next run loads the demo data (demo.enabled=true)" if cfg.demo.enabled
                   else "load data first or point lake.root at your lake"))
    elif next_range is None:
        note = f"nothing new: model {cfg.model.name!r} has consumed version {latest}"
    elif error is not None or drift is not None:
        note = f"the next run over versions {next_range[0]}..{next_range[1]} would fail: {error or drift}"
    else:
        note = f"the next run consumes versions {next_range[0]}..{next_range[1]} ({choice.describe()})"
    return {
        "model": cfg.model.name,
        "lake": lake.root,
        "engine": lake.name,
        "source_table": tables.events_table,
        "runs_table": tables.runs_table,
        "runs": len(runs),
        "watermark": watermark,
        "latest_version": latest,
        "next_range": next_range,
        "change_types": change_types,
        "rows": sum(change_types.values()),
        "cancellations": cancellations,
        "strategy": strategy,
        "parent": parent,
        "error": error,
        "drift": drift,
        "note": note,
    }


def schema_drift(cfg: "Config", lake: "LakeEngine", changes, first: int) -> str | None:
    """The schema-drift stop the next night would hit (None: none), the same
    check the delta job runs; a lossless widening is not one."""
    from ..features.changes import SchemaDriftError, check_drift, mapped_columns

    table = cfg.lake.events_table
    before = lake.scan(table, where="1 = 0", version=first - 1).schema if first > 0 else None
    m = cfg.source.columns
    try:
        check_drift(table, changes.schema, before, read=mapped_columns(m, cfg.source.key) if m else None)
    except SchemaDriftError as e:
        return str(e)
    return None


def describe_plan(p: dict[str, Any]) -> str:
    """A few lines for people: the plan as `deltarec plan` prints it."""
    lines = [f"lake {p['lake']} ({p['engine']}); model {p['model']!r}; ledger {p['runs_table']} ({p['runs']} runs)",
             f"watermark: {p['watermark']}   {p['source_table']} latest version: {p['latest_version']}"]
    if p["next_range"] is not None:
        first, last = p["next_range"]
        kinds = ", ".join(f"{k}={v}" for k, v in p["change_types"].items()) or "no change-feed rows"
        lines.append(f"next run: versions {first}..{last}, {p['rows']} change-feed rows ({kinds}; "
                     f"{p.get('cancellations', 0)} cancellations)")
    lines.append(p["note"])
    return "\n".join(lines)

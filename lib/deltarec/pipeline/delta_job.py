"""The Spark half of a run: the change feed of versions (first, last] of the
behaviour table → validated events, quarantine, state, training examples.

Everything written here is keyed by the run id (``replaceWhere`` on run_id),
so running it twice for the same range leaves the lake as after one run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..features.examples import build_examples
from ..features.validate import check_threshold, validate
from ..lake import schemas

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine


@dataclass
class PreparedNight:
    run_id: str
    first: int
    last: int
    consumed: int
    accepted: int
    quarantined: int
    reasons: dict[str, int]
    examples: int
    examples_df: "DataFrame"  # this run's rows of training_examples (as written)
    items: "DataFrame"  # the catalogue negatives are drawn from (item_id, ...)
    stats: dict = field(default_factory=dict)  # anything else worth recording in the run's metrics


def prepare_night(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", first: int, last: int,
                  run_id: str) -> PreparedNight:
    from pyspark.sql import functions as F

    L = cfg.lake
    changes = lake.read_changes(L.events_table, first, last)
    checked = validate(changes, cfg.validation, run_id)
    accepted = checked.accepted.cache()
    quarantined = checked.quarantined.cache()
    try:
        reasons = {r["reason"]: int(r["count"]) for r in quarantined.groupBy("reason").count().collect()}
        n_accepted = accepted.count()
        n_quarantined = sum(reasons.values())
        consumed = n_accepted + n_quarantined
        check_threshold(reasons, consumed, cfg.validation.max_quarantine_fraction)
        lake.create(L.quarantine_table, schemas.QUARANTINE_EVENTS)
        lake.write(L.quarantine_table, quarantined, mode="overwrite", replace_where=f"run_id = '{run_id}'",
                   schema=schemas.QUARANTINE_EVENTS)

        # The catalogue negatives are drawn from: the items table, else the items seen tonight.
        items = lake.read(L.items_table) if lake.exists(L.items_table) else accepted.select("item_id").distinct()
        examples = build_examples(accepted, items, cfg.features, run_id)
        lake.create(L.examples_table, schemas.TRAINING_EXAMPLES, partition_by=["run_id"])
        lake.write(L.examples_table, examples, mode="overwrite", replace_where=f"run_id = '{run_id}'",
                   partition_by=["run_id"], schema=schemas.TRAINING_EXAMPLES)
    finally:
        accepted.unpersist()
        quarantined.unpersist()
    new_examples = lake.read(L.examples_table).where(F.col("run_id") == run_id)
    return PreparedNight(run_id, first, last, consumed, n_accepted, n_quarantined, reasons,
                         new_examples.count(), new_examples, items)

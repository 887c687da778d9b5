"""Stage 3 of a night: what the workers train on, and the record of it.

Reads the run ledger and the training_examples table (file lists; for replay a
seeded sample of earlier runs' rows, by time travel). Writes the replay
sample as parquet under the run's checkpoint folder (overwritten on a rerun).
:func:`lineage_inputs` is what ``deltarec registry show/reproduce`` reads back.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..lake.ledger import Ledger, RunRecord

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine
    from .strategy import StrategyChoice

log = logging.getLogger("deltarec.nightly")


@dataclass(frozen=True)
class TrainingInputs:
    files: list[str]  # training_examples files, in training order
    replay: list[str]  # replay sample files (empty: no replay)


def select_inputs(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", ledger: Ledger, run_id: str,
                  choice: "StrategyChoice", first: int) -> TrainingInputs:
    """Tonight's training files and replay sample for ``choice``."""
    return TrainingInputs(
        files=training_files(cfg, lake, ledger, run_id, choice.strategy, choice.warm),
        replay=replay_files(spark, cfg, lake, ledger, run_id, choice.strategy, choice.warm, first))


def training_files(cfg: "Config", lake: "LakeEngine", ledger: Ledger, run_id: str, strategy: str,
                   parent: RunRecord | None) -> list[str]:
    """Parquet files the workers train on (contract 3). Incremental: the
    examples of every committed run after the warm-start ``parent``
    (candidates that were not promoted) plus tonight's, so the champion's
    lineage sees every source version exactly once. Full (or no parent):
    every committed run's plus tonight's. Either way without the runs
    excluded by `deltarec registry exclude` (each named in the log)."""
    table = cfg.lake.examples_table
    runs = trainable_runs(cfg, lake, ledger)
    if strategy != "full" and parent is not None:
        runs = [r for r in runs if r.source_first > parent.source_last]
    files = []
    for r in runs:
        files += lake.data_files(table, {"run_id": r.run_id})
    return files + lake.data_files(table, {"run_id": run_id})


def trainable_runs(cfg: "Config", lake: "LakeEngine", ledger: Ledger) -> list[RunRecord]:
    """Committed runs of the model whose examples may be trained on: all but
    the excluded ones."""
    from ..registry.exclusions import excluded_runs

    excluded = excluded_runs(lake, cfg)
    runs = ledger.runs(cfg.model.name)
    for r in runs:
        if r.run_id in excluded:
            log.info("inputs: leaving out the examples of run %s (versions %d..%d): excluded by %s: %s", r.run_id,
                     r.source_first, r.source_last, excluded[r.run_id]["by"], excluded[r.run_id]["reason"])
    return [r for r in runs if r.run_id not in excluded]


def replay_files(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", ledger: Ledger, run_id: str,
                 strategy: str, parent: RunRecord | None, first: int) -> list[str]:
    """Replay against forgetting (train.forgetting.replay_ratio > 0, incremental
    nights only): a seeded sample of the examples of runs the warm-start parent's
    lineage has already trained on (source versions before ``first``), about
    ratio × tonight's rows, read as of the examples table's version before
    tonight's write (time travel), written to parquet under the run's
    checkpoint folder (overwritten on a rerun)."""
    from pyspark.sql import functions as F

    from ..train.regularizers import replay_sample

    forgetting = cfg.train.forgetting
    if forgetting.replay_ratio <= 0 or strategy == "full" or parent is None:
        return []
    table = cfg.lake.examples_table
    older = [r.run_id for r in trainable_runs(cfg, lake, ledger) if r.source_last <= parent.source_last]
    if not older:
        return []
    tonight = lake.scan(table, where=f"run_id = '{run_id}'")
    if "holdout" in tonight.columns:
        tonight = tonight.where(~F.col("holdout"))
    want = int(round(forgetting.replay_ratio * tonight.count()))
    # time travel to the newest version without tonight's rows (tonight's write is the last commit or two)
    version = lake.version(table)
    while version is not None and version > 0 and \
            lake.scan(table, ["run_id"], where=f"run_id = '{run_id}'", version=version).count():
        version -= 1
    sample = replay_sample(spark, lake, table, older, want, forgetting.replay_seed + first, version)
    out = f"{lake.uri(cfg.lake.checkpoints_dir)}/{cfg.model.name}/{run_id}/replay"
    sample.coalesce(1).write.mode("overwrite").parquet(out)
    files = sorted(spark.read.parquet(out).inputFiles())
    log.info("replay: %d files, about %d rows from %d earlier runs (as of %s version %s)", len(files), want,
             len(older), table, version)
    return files


def lineage_inputs(cfg: "Config", lake: "LakeEngine", files: list[str]) -> dict[str, Any]:
    """What a reproduction needs (``metrics["inputs"]``): the tables' versions
    now (tonight's examples are written, nothing else is), the runs whose
    examples were trained on, and the exact files, in training order."""
    run_ids: list[str] = []
    for f in files:
        m = re.search(r"run_id=([^/]+)/", f)
        if m and unquote(m.group(1)) not in run_ids:
            run_ids.append(unquote(m.group(1)))
    return {"examples_table": cfg.lake.examples_table, "examples_version": lake.version(cfg.lake.examples_table),
            "items_table": cfg.lake.items_table, "items_version": lake.version(cfg.lake.items_table),
            "run_ids": run_ids, "files": list(files)}

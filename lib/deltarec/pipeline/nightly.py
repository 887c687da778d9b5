"""One nightly run: changes (w, v] → validate → examples → train → gate → ledger.

``run_nightly`` is the script of stages, each in the module named for it:

====================  ==========================================================
strategy.py           which strategy, from which parent (the usable champion)
delta_job.py          Spark: change feed → quarantine, state, training examples
inputs.py             the files the workers train on; replay sample; lineage
prequential.py        score what serves now on the new day, before training
training.py           the TrainSpec from the config; the run on a backend
gating.py             candidate vs champion on tonight's holdout; slices
publish.py            the ledger commit (the only watermark advance); audit, MLflow
====================  ==========================================================

The ledger commit is the only step that advances the watermark; everything
before it is idempotent (quarantine and examples are overwritten per run id;
checkpoints go to a fresh attempt directory), so a crash anywhere before it is
repaired by simply running again. Each stage's seconds and Spark jobs go into
the run's ``metrics["stages"]``.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..evaluation.prequential import catalog_indices
from ..lake import LakeError, open_lake
from ..lake.ledger import Ledger, RunRecord
from ..maintain import maybe_maintain
from ..privacy import apply_pending
from ..train.checkpoint import verify_checkpoint
from .console import night_summary
from .delta_job import PreparedNight, prepare_night
from .gating import gate_candidate
from .inputs import lineage_inputs, select_inputs
from .prequential import score_prequential
from .publish import after_commit, check_mlflow, publish_run, repair_audit, run_metrics
from .recommend import refresh_quietly
from .stages import StageClock
from .strategy import choose_strategy
from .training import Trained, spec_record, train_candidate, train_spec

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.nightly")


@dataclass
class NightResult:
    status: str  # "committed" or "noop"
    model: str
    watermark: int
    run_id: str | None = None
    source_versions: tuple[int, int] | None = None
    rows_consumed: int = 0
    rows_accepted: int = 0
    rows_quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0
    prequential: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""
    registry_status: str = ""  # champion | candidate: the gate's verdict
    gate: dict[str, Any] = field(default_factory=dict)  # decision, metrics of candidate and champion
    parent: str | None = None  # the champion this run warm-started from / was gated against
    mlflow: dict[str, Any] = field(default_factory=dict)  # MLflow run/version, or {"error": ...}
    metrics: dict[str, Any] = field(default_factory=dict)  # what the ledger row records

    @classmethod
    def committed(cls, record: RunRecord, night: PreparedNight, trained: Trained, *, mlflow: dict[str, Any],
                  seconds: float) -> "NightResult":
        m = record.metrics
        return cls(status="committed", model=record.model, watermark=record.source_last, run_id=record.run_id,
                   source_versions=(record.source_first, record.source_last), rows_consumed=night.consumed,
                   rows_accepted=night.accepted, rows_quarantined=night.quarantined,
                   quarantine_reasons=night.reasons, examples=night.examples, train_seconds=trained.seconds,
                   seconds=seconds, prequential=m["prequential"], checkpoint=trained.checkpoint,
                   strategy=record.strategy, registry_status=record.status, gate=m["gate"],
                   parent=record.parent_run_id, mlflow=mlflow, metrics=m)


def next_range(cfg: "Config", lake: "LakeEngine", ledger: Ledger) -> tuple[int, int] | None:
    """Source versions (first, last) the next run consumes; None when nothing is new."""
    watermark, latest = ledger.watermark(cfg.model.name), lake.version(cfg.lake.events_table)
    if latest is None:
        raise LakeError(f"no behaviour table at {lake.uri(cfg.lake.events_table)}: load data first "
                        "(demo.enabled=true loads the demo data) or point lake.root at your lake")
    if latest <= watermark:
        log.info("nothing to do: %s is at version %d and model %r has consumed it (watermark %d)",
                 cfg.lake.events_table, latest, cfg.model.name, watermark)
        return None
    return watermark + 1, latest


def run_nightly(spark: "SparkSession", cfg: "Config", *, lake: "LakeEngine | None" = None,
                backend=None) -> NightResult:
    """Consume the source versions after the watermark and commit one run
    (``backend``: a training backend to use instead of ``cfg.train``'s)."""
    t_start, started = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    lake = lake or open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    ledger.ensure(source=cfg.lake.events_table)  # a mistyped lake.root: refused before anything is created
    repair_audit(cfg, lake, ledger)  # a night killed right after its commit
    apply_pending(cfg, lake)  # forget requests first: tonight's inputs and parent no longer hold those users
    model = cfg.model.name
    span = next_range(cfg, lake, ledger)
    if span is None:
        return NightResult(status="noop", model=model, watermark=ledger.watermark(model),
                           seconds=time.perf_counter() - t_start)
    first, last = span
    run_id = f"{model}-{first:06d}-{last:06d}"
    check_mlflow(cfg, lake)
    clock = StageClock(spark)
    choice = choose_strategy(cfg, ledger)
    log.info("run %s: consuming %s versions %d..%d (%s)", run_id, cfg.lake.events_table, first, last,
             choice.strategy)
    clock.mark("strategy")

    night = prepare_night(spark, cfg, lake, first, last, run_id)  # Spark: validate, quarantine, examples
    clock.add(night.stats["stage_seconds"], night.stats["stage_spark_jobs"], prefix="delta_job.")
    inputs = select_inputs(spark, cfg, lake, ledger, run_id, choice, first)
    clock.mark("inputs")
    if cfg.model.text.enabled:  # frozen item-text embeddings, recomputed only for changed texts
        from .text_embeddings import ensure_text_embeddings

        ensure_text_embeddings(spark, cfg, lake, night.items)
        clock.mark("text_embeddings")
    # the item indices models rank over: one Spark read, shared by prequential and gate
    catalog = functools.cache(lambda: catalog_indices(night.items, cfg.features))
    pre = score_prequential(cfg, lake, ledger, night.examples_df, night.items, choice.parent, run_id, first,
                            last, catalog) if choice.comparable else {}
    clock.mark("prequential")

    run_dir = f"{lake.uri(cfg.lake.checkpoints_dir)}/{model}/{run_id}"
    spec = train_spec(cfg, run_id, first, last, inputs, choice, f"{run_dir}/{uuid.uuid4().hex[:8]}",
                      resume_dir=f"{run_dir}/inrun" if "://" not in run_dir else None)
    trained = train_candidate(spark, cfg, spec, backend)
    clock.mark("train")
    verify_checkpoint(trained.checkpoint["path"], trained.checkpoint["sha256"])  # complete before it exists
    gate = gate_candidate(cfg, lake, night.examples_df, night.items, choice, trained.checkpoint, run_id, first,
                          last, catalog)
    clock.mark("gate")

    metrics = run_metrics(night, trained, choice, pre, gate, lineage_inputs(cfg, lake, spec.files),
                          spec_record(spec), clock.record())
    metrics["strategy_reason"] = choice.describe()  # e.g. why a night retrains from scratch
    metrics["summary"] = night_summary(metrics)  # what every night prints, kept with the run
    record = publish_run(cfg, lake, ledger, run_id=run_id, first=first, last=last, started=started,
                         choice=choice, trained=trained, metrics=metrics)
    ml = after_commit(cfg, lake, record, choice.serving)
    refresh_quietly(spark, cfg, lake, reason=f"nightly {run_id}", by="nightly")  # tomorrow's top-k
    maybe_maintain(cfg, lake, ledger)  # maintain.every_nights: OPTIMIZE / VACUUM after the commit
    if spec.resume_dir:
        shutil.rmtree(spec.resume_dir, ignore_errors=True)  # in-run state is only for crashes
    return NightResult.committed(record, night, trained, mlflow=ml, seconds=time.perf_counter() - t_start)


def run_configured(spark: "SparkSession", cfg: "Config", out: Callable[[str], Any] = print) -> list[NightResult]:
    """What ``deltarec nightly`` (and ``jobs/nightly.py``) does: the demo when
    ``demo.enabled`` (on a lake that already has data that is one nightly
    run), else one nightly run; each night is printed through ``out``."""
    from .console import describe

    if cfg.demo.enabled:
        from .demo import run_demo

        return run_demo(spark, cfg, out=out)
    result = run_nightly(spark, cfg)
    out(describe(result))
    return [result]

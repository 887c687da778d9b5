"""One nightly run: changes (w, v] → validate → examples → train → verify → ledger.

The ledger commit at the end is the only step that advances the watermark;
everything before it is idempotent (quarantine and examples are overwritten
per run id; checkpoints go to a fresh attempt directory), so a crash anywhere
before it is repaired by simply running again.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..features.examples import catalog
from ..lake import LakeError, open_lake
from ..lake.ledger import Ledger, RunRecord
from ..train.checkpoint import verify_checkpoint
from ..train.loop import TrainSpec
from .delta_job import prepare_night

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.nightly")

CRASH_ENV = "DELTAREC_CRASH_AT"  # fault injection for tests: kill the process at a named point


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.error("crash injected at %s (%s=%s)", name, CRASH_ENV, name)
        os._exit(86)


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


def code_version() -> str:
    from .. import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def run_nightly(spark: "SparkSession", cfg: "Config", *, lake: "LakeEngine | None" = None,
                backend=None) -> NightResult:

    from ..train.backends import make_backend

    t_start = time.perf_counter()
    lake = lake or open_lake(cfg.lake, spark)
    L = cfg.lake
    model_name = cfg.model.name
    ledger = Ledger(lake, L.runs_table)
    ledger.ensure()
    watermark, latest = ledger.watermark(model_name), lake.version(L.events_table)
    if latest is None:
        raise LakeError(
            f"no behaviour table at {lake.uri(L.events_table)}: load data first "
            "(demo.enabled=true loads the demo data) or point lake.root at your lake"
        )
    if latest <= watermark:
        log.info("nothing to do: %s is at version %d and model %r has consumed it (watermark %d)",
                 L.events_table, latest, model_name, watermark)
        return NightResult("noop", model_name, watermark, seconds=time.perf_counter() - t_start)

    first, last = watermark + 1, latest
    run_id = f"{model_name}-{first:06d}-{last:06d}"
    started = dt.datetime.now(dt.timezone.utc)
    parent = _usable_parent(ledger, model_name)
    strategy = cfg.train.strategy
    if strategy == "auto" or (strategy in ("incremental", "finetune") and parent is None):
        if strategy != "auto":
            log.warning("train.strategy=%s needs a parent checkpoint and there is none: training from scratch",
                        strategy)
        strategy = "incremental" if parent else "full"
    warm = parent if strategy != "full" else None
    log.info("run %s: consuming %s versions %d..%d (%s)", run_id, L.events_table, first, last, strategy)

    # ---- Spark: validate, quarantine, state, featurize (pipeline/delta_job.py)
    night = prepare_night(spark, cfg, lake, first, last, run_id)
    consumed, n_accepted, n_quarantined, reasons = night.consumed, night.accepted, night.quarantined, night.reasons
    new_examples, items, n_examples = night.examples_df, night.items, night.examples
    files = _training_files(cfg, lake, ledger, run_id, strategy)
    replay = _replay_files(spark, cfg, lake, ledger, run_id, strategy, warm, first)
    if cfg.model.text.enabled:  # frozen item-text embeddings, recomputed only for changed texts
        from .text_embeddings import ensure_text_embeddings

        ensure_text_embeddings(spark, cfg, lake, items)

    # ---- prequential: score what serves now on the new data, before training on it
    pre = _prequential(spark, cfg, lake, ledger, new_examples, items, parent) if parent else {}

    # ---- train
    attempt = uuid.uuid4().hex[:8]
    run_dir = f"{lake.uri(L.checkpoints_dir)}/{model_name}/{run_id}"
    ckpt_dir = f"{run_dir}/{attempt}"
    T = cfg.train
    spec = TrainSpec(
        run_id=run_id, files=files, model_name=model_name,
        model_params=_model_params(cfg), optimizer=T.optimizer, lr=T.lr, weight_decay=T.weight_decay,
        batch_size=T.batch_size, epochs=T.epochs if warm else T.full_epochs, seed=T.seed + first,
        checkpoint_dir=ckpt_dir, parent_path=warm.checkpoint_path if warm else None,
        parent_sha256=warm.checkpoint_sha256 if warm else None, grad_clip=T.grad_clip,
        freeze=list(T.freeze) if strategy == "finetune" else [], lr_schedule=T.lr_schedule,
        lr_decay=T.lr_decay, scale_lr_by_workers=T.scale_lr_by_workers,
        accumulation_steps=T.accumulation_steps, validation_fraction=T.validation_fraction,
        patience=T.patience,
        progress=T.progress, use_gpu=T.use_gpu,
        resume_dir=f"{run_dir}/inrun" if "://" not in run_dir else None,
        checkpoint_every_steps=T.checkpoint_every_steps,
        replay_files=replay, history_length=_history_length(cfg),
        vocab_min_count=cfg.model.vocab.min_count, vocab_ttl_nights=cfg.model.vocab.ttl_nights,
        vocab_oov_buckets=cfg.model.vocab.oov_buckets,
        proximal=T.forgetting.proximal if warm else 0.0, ewc=T.forgetting.ewc if warm else 0.0,
        distill=T.forgetting.distill if warm else 0.0,
        fisher_batches=T.forgetting.fisher_batches if T.forgetting.ewc > 0 else 0,
        meta={"parent_run_id": parent.run_id if parent else None, "strategy": strategy,
              "warm_start": warm.run_id if warm else None,
              "source_versions": [first, last], "config": cfg.to_dict()},
    )
    backend = backend or make_backend(T.backend, spark, T.num_proc, T.use_gpu, T.launcher)
    t_train = time.perf_counter()
    result = backend.run(spec)
    train_seconds = time.perf_counter() - t_train

    # ---- publish: files are complete and checksummed before the ledger row exists
    ck = result["checkpoint"]
    verify_checkpoint(ck["path"], ck["sha256"])
    crash_point("before_ledger_commit")
    metrics = {
        "rows": {"consumed": consumed, "accepted": n_accepted, "quarantined": n_quarantined,
                 "quarantine_reasons": reasons},
        "examples": n_examples,
        "train": {"seconds": round(train_seconds, 3), "loss": result.get("train_loss"),
                  "steps": result.get("steps"), "world_size": result.get("world_size"),
                  "backend": backend.name, "ranks": result.get("ranks"),
                  "examples_trained": result.get("examples"), "epochs_run": result.get("epochs_run"),
                  "val_history": result.get("val_history"), "warm_start": warm.run_id if warm else None},
        "prequential": pre,
    }
    ledger.commit(RunRecord(
        run_id=run_id, model=model_name, source_table=L.events_table, source_first=first, source_last=last,
        checkpoint_path=ck["path"], checkpoint_sha256=ck["sha256"], checkpoint_files=ck["files"],
        config=cfg.to_dict(), code_version=code_version(), metrics=metrics, started_at=started,
        strategy=strategy, parent_run_id=parent.run_id if parent else None,
    ))
    log.info("run %s committed: watermark %d → %d", run_id, watermark, last)
    if spec.resume_dir:
        import shutil

        shutil.rmtree(spec.resume_dir, ignore_errors=True)  # in-run state is only for crashes
    return NightResult(
        "committed", model_name, last, run_id, (first, last), consumed, n_accepted, n_quarantined, reasons,
        n_examples, train_seconds, time.perf_counter() - t_start, pre, ck, strategy,
    )


def _usable_parent(ledger: Ledger, model: str) -> RunRecord | None:
    """The newest committed run whose checkpoint verifies. A corrupt one is
    refused, loudly, and the one before it is used."""
    from ..train.checkpoint import CheckpointError

    for run in sorted(ledger.runs(model), key=lambda r: r.source_last, reverse=True):
        try:
            verify_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
            return run
        except CheckpointError as e:
            log.error("refusing checkpoint of run %s as warm start: %s; trying the previous run", run.run_id, e)
    return None


def _training_files(cfg: "Config", lake, ledger: Ledger, run_id: str, strategy: str) -> list[str]:
    """Parquet files the workers train on: tonight's examples, plus every
    committed run's for a full retrain."""
    L = cfg.lake
    files = lake.data_files(L.examples_table, {"run_id": run_id})
    if strategy == "full":
        for r in ledger.runs(cfg.model.name):
            files += lake.data_files(L.examples_table, {"run_id": r.run_id})
    return files


def _history_length(cfg: "Config") -> int:
    """Items of history a batch carries: only models that read one get it."""
    return max(cfg.features.history_length, 1) if cfg.model.name == "sequential" else 0


def _model_params(cfg: "Config") -> dict[str, Any]:
    m, f = cfg.model, cfg.features
    params: dict[str, Any] = {"user_buckets": f.user_buckets, "item_buckets": f.item_buckets,
                              "embedding_dim": m.embedding_dim, "hidden": list(m.hidden), "dropout": m.dropout,
                              "embedding": m.embedding}
    if m.name == "sequential":
        params.update(history_length=max(f.history_length, 1), heads=m.heads, layers=m.layers)
    if m.text.enabled:
        from .text_embeddings import text_params

        params["text"] = text_params(cfg)
    return params


def _replay_files(spark, cfg: "Config", lake, ledger: Ledger, run_id: str, strategy: str,
                  parent: RunRecord | None, first: int) -> list[str]:
    """Replay against forgetting (train.forgetting.replay_ratio > 0, incremental
    nights only): a seeded sample of the examples of runs the warm-start parent's
    lineage has already trained on (source versions before ``first``), about
    ratio × tonight's rows, read as of the examples table's version before
    tonight's write (time travel), written to parquet under the run's
    checkpoint folder (overwritten on a rerun)."""
    from pyspark.sql import functions as F

    from ..train.regularizers import replay_sample

    R = cfg.train.forgetting
    if R.replay_ratio <= 0 or strategy == "full" or parent is None:
        return []
    L = cfg.lake
    older = [r.run_id for r in ledger.runs(cfg.model.name) if r.source_last <= parent.source_last]
    if not older:
        return []
    tonight = lake.read(L.examples_table).where(F.col("run_id") == run_id)
    if "holdout" in tonight.columns:
        tonight = tonight.where(~F.col("holdout"))
    want = int(round(R.replay_ratio * tonight.count()))
    # time travel to the newest version without tonight's rows (tonight's write is the last commit or two)
    version = lake.version(L.examples_table)
    while version is not None and version > 0 and \
            lake.read(L.examples_table, version=version).where(F.col("run_id") == run_id).limit(1).count():
        version -= 1
    sample = replay_sample(spark, lake, L.examples_table, older, want, R.replay_seed + first, version)
    out = f"{lake.uri(L.checkpoints_dir)}/{cfg.model.name}/{run_id}/replay"
    sample.coalesce(1).write.mode("overwrite").parquet(out)
    files = sorted(spark.read.parquet(out).inputFiles())
    log.info("replay: %d files, about %d rows from %d earlier runs (as of %s version %s)", len(files), want,
             len(older), L.examples_table, version)
    return files


def _prequential(spark, cfg: "Config", lake, ledger: Ledger, new_examples, items,
                 parent: RunRecord) -> dict[str, Any]:
    """HR@K/NDCG@K on the new positives for: the model in service (parent), the
    first model of the lineage never updated ('stale'), and the most popular
    items of the last ``eval.popularity_days`` days."""
    import numpy as np
    from pyspark.sql import functions as F

    from ..evaluation.prequential import evaluate
    from ..models import build_model
    from ..train.checkpoint import load_checkpoint

    k = cfg.eval.k
    pos = new_examples.where(F.col("label") == 1).select("user_idx", "item_idx", "event_time").toArrow()
    if pos.num_rows == 0:
        return {}
    users = pos["user_idx"].to_numpy()
    itms = pos["item_idx"].to_numpy()
    start = min(pos["event_time"].to_pylist())
    cat = np.unique(catalog(items, cfg.features).select("item_idx").toArrow()["item_idx"].to_numpy())

    runs = ledger.runs(cfg.model.name)
    committed = [r.run_id for r in runs]
    since = start - dt.timedelta(days=cfg.eval.popularity_days)
    pop = (lake.read(cfg.lake.examples_table)
           .where(F.col("run_id").isin(committed) & (F.col("label") == 1)
                  & (F.col("event_time") >= F.lit(since)) & (F.col("event_time") < F.lit(start)))
           .groupBy("item_idx").count().orderBy(F.desc("count"), "item_idx").limit(k).toArrow())
    popular = pop["item_idx"].to_numpy() if pop.num_rows else None

    def load(run: RunRecord):
        ck = load_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
        m = build_model(ck.meta["model"], **ck.meta["model_params"])
        m.load_state_dict(ck.model_state)
        return m

    models = {"model": load(parent)}
    if len(runs) > 1:
        models["stale"] = load(runs[0])
    else:
        models["stale"] = models["model"]
    return evaluate(models, popular, users, itms, cat, k)

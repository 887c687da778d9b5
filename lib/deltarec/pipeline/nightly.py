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
from ..lake.ledger import CANDIDATE, CHAMPION, Ledger, RunRecord
from ..train.checkpoint import verify_checkpoint
from ..train.loop import TrainSpec
from .delta_job import _micros, prepare_night

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
    registry_status: str = ""  # champion | candidate: the gate's verdict
    gate: dict[str, Any] = field(default_factory=dict)  # decision, metrics of candidate and champion
    parent: str | None = None  # the champion this run warm-started from / was gated against
    mlflow: dict[str, Any] = field(default_factory=dict)  # MLflow run/version, or {"error": ...}


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
    serving = ledger.champion(model_name)  # the gate commits against this one (contract 3, 5)
    if cfg.mlflow.enabled:  # fail before the work, not after it
        from ..registry.mlflow_sync import client

        client(cfg, lake)
    strategy = cfg.train.strategy
    if strategy == "auto" or (strategy in ("incremental", "finetune") and parent is None):
        if strategy != "auto":
            log.warning("train.strategy=%s needs a parent checkpoint and there is none: training from scratch",
                        strategy)
        strategy = "incremental" if parent else "full"
    moved = _rehashed(cfg, parent) if strategy != "full" else {}
    if moved:
        what = ", ".join(f"{'model' if k == 'embedding' else 'features'}.{k} {a} -> {b}" for k, (a, b) in moved.items())
        if cfg.train.strategy != "auto":
            raise ValueError(
                f"train.strategy={cfg.train.strategy}: the parent checkpoint {parent.run_id} hashed ids into another "
                f"number of rows ({what}), so its rows belong to other ids now. Run once with train.strategy=full "
                "(or auto), or go back to the parent's bucket counts")
        log.warning("parent %s hashed ids into another number of rows (%s): its rows belong to other ids now, "
                    "so this run trains from scratch (full)", parent.run_id, what)
        strategy = "full"
    warm = parent if strategy != "full" else None
    log.info("run %s: consuming %s versions %d..%d (%s)", run_id, L.events_table, first, last, strategy)

    # ---- Spark: validate, quarantine, state, featurize (pipeline/delta_job.py)
    night = prepare_night(spark, cfg, lake, first, last, run_id)
    consumed, n_accepted, n_quarantined, reasons = night.consumed, night.accepted, night.quarantined, night.reasons
    new_examples, items, n_examples = night.examples_df, night.items, night.examples
    files = _training_files(cfg, lake, ledger, run_id, strategy, warm)
    replay = _replay_files(spark, cfg, lake, ledger, run_id, strategy, warm, first)
    if cfg.model.text.enabled:  # frozen item-text embeddings, recomputed only for changed texts
        from .text_embeddings import ensure_text_embeddings

        ensure_text_embeddings(spark, cfg, lake, items)

    # ---- prequential: score what serves now on the new data, before training on it
    # (after a bucket change the parent cannot score ids hashed the new way: nothing to compare)
    pre = _prequential(spark, cfg, lake, ledger, new_examples, items, parent, run_id, first, last) \
        if parent and not moved else {}

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
        loss={"name": T.loss, "in_batch": T.loss_in_batch, "history_negatives": T.loss_history_negatives,
              "uniform_negatives": T.loss_uniform_negatives, "logq": T.loss_logq},
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
    if moved:
        from ..evaluation.gate import GateDecision

        gate = {"decision": GateDecision(True, f"bucket counts changed ({what}): the champion cannot score ids "
                                               "hashed the new way; champion by default").to_dict()}
    else:
        gate = _gate(cfg, lake, new_examples, items, parent, ck, run_id, first, last)
    crash_point("before_ledger_commit")
    metrics = {
        "rows": {"consumed": consumed, "accepted": n_accepted, "quarantined": n_quarantined,
                 "quarantine_reasons": reasons},
        "examples": n_examples,
        "train": {"seconds": round(train_seconds, 3), "loss": result.get("train_loss"),
                  "steps": result.get("steps"), "world_size": result.get("world_size"),
                  "backend": backend.name, "ranks": result.get("ranks"),
                  "examples_trained": result.get("examples"), "epochs_run": result.get("epochs_run"),
                  "val_history": result.get("val_history"), "warm_start": warm.run_id if warm else None,
                  "loss_name": T.loss, "ids": result.get("ids")},
        "prequential": pre,
        "gate": gate,
        # lineage for `deltarec registry show/reproduce`: exactly what was trained on, by time travel
        "inputs": _inputs(cfg, lake, spec.files),
        "train_spec": _spec_record(spec),
    }
    promoted = gate["decision"]["passed"]
    record = ledger.commit(RunRecord(
        run_id=run_id, model=model_name, source_table=L.events_table, source_first=first, source_last=last,
        checkpoint_path=ck["path"], checkpoint_sha256=ck["sha256"], checkpoint_files=ck["files"],
        config=cfg.to_dict(), code_version=code_version(), metrics=metrics, started_at=started,
        strategy=strategy, parent_run_id=parent.run_id if parent else None,
        status=CHAMPION if promoted else CANDIDATE, status_reason=gate["decision"]["reason"], status_by="gate",
    ), expected_champion=serving.run_id if serving else None)
    log.info("run %s committed as %s: watermark %d → %d; %s", run_id, record.status, watermark, last,
             gate["decision"]["reason"])
    ml = _after_commit(cfg, lake, record, serving)
    if spec.resume_dir:
        import shutil

        shutil.rmtree(spec.resume_dir, ignore_errors=True)  # in-run state is only for crashes
    return NightResult(
        "committed", model_name, last, run_id, (first, last), consumed, n_accepted, n_quarantined, reasons,
        n_examples, train_seconds, time.perf_counter() - t_start, pre, ck, strategy,
        registry_status=record.status, gate=gate, parent=parent.run_id if parent else None,
        mlflow=ml,
    )


def _usable_parent(ledger: Ledger, model: str) -> RunRecord | None:
    """The champion, whose checkpoint verifies (contract 3). A corrupt one is
    refused, loudly, and the champion before it is used instead."""
    from ..train.checkpoint import CheckpointError

    runs = ledger.runs(model)
    champ = ledger.champion(model)
    # the champion first, then former champions newest first, then anything else newest first
    order = ([champ] if champ else []) + sorted(
        (r for r in runs if champ is None or r.run_id != champ.run_id),
        key=lambda r: (r.status == "retired", r.source_last), reverse=True)
    for run in order:
        try:
            verify_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
            return run
        except CheckpointError as e:
            log.error("refusing checkpoint of run %s (%s) as warm start: %s; trying the one before",
                      run.run_id, run.status, e)
    return None


def _rehashed(cfg: "Config", parent: RunRecord | None) -> dict[str, tuple[Any, Any]]:
    """How ``parent``'s ids map to rows differently from ``cfg``'s: bucket
    counts (bucket = hash mod count, so a changed count sends every id to
    another hashed row, and a dynamic vocabulary's scoring lookup holds the old
    indices) or the embedding kind (hashed rows and vocabulary rows are
    different tables). Either way the parent cannot be warm-started from."""
    if parent is None:
        return {}
    before = (parent.config or {}).get("features", {})
    out = {k: (before[k], getattr(cfg.features, k)) for k in ("user_buckets", "item_buckets")
           if k in before and before[k] != getattr(cfg.features, k)}
    embedding = (parent.config or {}).get("model", {}).get("embedding", "hashed")
    if embedding != cfg.model.embedding:
        out["embedding"] = (embedding, cfg.model.embedding)
    return out


def _training_files(cfg: "Config", lake, ledger: Ledger, run_id: str, strategy: str,
                    parent: RunRecord | None = None) -> list[str]:
    """Parquet files the workers train on (contract 3). Incremental: the
    examples of every committed run after the warm-start parent (candidates
    that were not promoted) plus tonight's, so the champion's lineage sees
    every source version exactly once. Full: every committed run's plus tonight's."""
    L = cfg.lake
    runs = ledger.runs(cfg.model.name)
    if strategy != "full":
        if parent is None:
            parent = _usable_parent(ledger, cfg.model.name)
        runs = [r for r in runs if parent is None or r.source_first > parent.source_last]
    files = []
    for r in runs:
        files += lake.data_files(L.examples_table, {"run_id": r.run_id})
    return files + lake.data_files(L.examples_table, {"run_id": run_id})


def _history_length(cfg: "Config") -> int:
    """Items of history a batch carries: only models that read one get it
    (the ranking model's repeat term; 0 turns it off)."""
    if cfg.model.name in ("sequential", "repeat_explore"):
        return max(cfg.features.history_length, 1)
    return cfg.features.history_length if cfg.model.name == "ranking" else 0


def _model_params(cfg: "Config") -> dict[str, Any]:
    m, f = cfg.model, cfg.features
    params: dict[str, Any] = {"user_buckets": f.user_buckets, "item_buckets": f.item_buckets,
                              "embedding_dim": m.embedding_dim, "hidden": list(m.hidden), "dropout": m.dropout,
                              "embedding": m.embedding}
    if m.name == "sequential":
        params.update(history_length=max(f.history_length, 1), heads=m.heads, layers=m.layers)
    elif m.name == "ranking":
        params.update(history_length=f.history_length)
    elif m.name == "repeat_explore":
        params.update(history_length=max(f.history_length, 1), item_half_lives=list(m.item_half_lives),
                      repeat_gate=m.repeat_gate)
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
    tonight = lake.scan(L.examples_table, where=f"run_id = '{run_id}'")
    if "holdout" in tonight.columns:
        tonight = tonight.where(~F.col("holdout"))
    want = int(round(R.replay_ratio * tonight.count()))
    # time travel to the newest version without tonight's rows (tonight's write is the last commit or two)
    version = lake.version(L.examples_table)
    while version is not None and version > 0 and \
            lake.scan(L.examples_table, ["run_id"], where=f"run_id = '{run_id}'", version=version).count():
        version -= 1
    sample = replay_sample(spark, lake, L.examples_table, older, want, R.replay_seed + first, version)
    out = f"{lake.uri(L.checkpoints_dir)}/{cfg.model.name}/{run_id}/replay"
    sample.coalesce(1).write.mode("overwrite").parquet(out)
    files = sorted(spark.read.parquet(out).inputFiles())
    log.info("replay: %d files, about %d rows from %d earlier runs (as of %s version %s)", len(files), want,
             len(older), L.examples_table, version)
    return files


def _load_model(run_or_path, sha256: str | None = None):
    from ..models import build_model
    from ..train.checkpoint import load_checkpoint

    path, sha = (run_or_path.checkpoint_path, run_or_path.checkpoint_sha256) if isinstance(
        run_or_path, RunRecord) else (run_or_path, sha256)
    ck = load_checkpoint(path, sha)
    m = build_model(ck.meta["model"], **ck.meta["model_params"])
    m.load_state_dict(ck.model_state)
    return m


def _catalog_idx(cfg: "Config", items):
    import numpy as np

    return np.unique(catalog(items, cfg.features).select("item_idx").toArrow()["item_idx"].to_numpy())


def _prequential(spark, cfg: "Config", lake, ledger: Ledger, new_examples, items,
                 parent: RunRecord, run_id: str | None = None, first: int = 0, last: int = 0) -> dict[str, Any]:
    """HR@K/NDCG@K on the new positives, before anything trains on them, for:
    the model in service (key 'model': the champion / warm-start parent), the
    newest candidate the gate did not promote since ('candidate'), the first
    model of the lineage never updated ('stale'), and the most popular items
    of the last ``eval.popularity_days`` days. Stored per night in
    ``lake.metrics_table`` (phase 'prequential') when ``run_id`` is given."""
    from pyspark.sql import functions as F

    from ..evaluation.prequential import evaluate, metric_rows, store_metrics

    k = cfg.eval.k
    pos = new_examples.where(F.col("label") == 1)
    if "kind" in new_examples.columns:  # contract 1: retractions are label 0 anyway; events only
        pos = pos.where(F.col("kind") == "event")
    # histories (and the event id that orders same-time rows as the delta job did) for models that read them
    pos = pos.select("user_idx", "item_idx", "event_time",
                     *[c for c in ("history_idx", "event_id") if c in new_examples.columns]).toArrow()
    if pos.num_rows == 0:
        return {}
    users = pos["user_idx"].to_numpy()
    itms = pos["item_idx"].to_numpy()
    start = min(pos["event_time"].to_pylist())
    cat = _catalog_idx(cfg, items)

    runs = ledger.runs(cfg.model.name)
    committed = [r.run_id for r in runs]
    since = start - dt.timedelta(days=cfg.eval.popularity_days)
    popular = _popular(lake, cfg.lake.examples_table, committed, since, start, k)

    challenger = max((r for r in runs if r.status == CANDIDATE and r.source_first > parent.source_last),
                     key=lambda r: r.source_last, default=None)
    run_ids = {"model": parent.run_id, "stale": runs[0].run_id if runs else parent.run_id}
    models = {"model": _load_model(parent)}
    if challenger is not None:
        try:
            models["candidate"] = _load_model(challenger)
            run_ids["candidate"] = challenger.run_id
        except Exception as e:  # a corrupt candidate is reported, not fatal: it does not serve
            log.error("prequential: cannot load candidate %s: %s", challenger.run_id, e)
    models["stale"] = _load_model(runs[0]) if len(runs) > 1 else models["model"]
    histories = None
    if "history_idx" in pos.column_names:  # each user's items before tonight, for models that read them
        from ..evaluation.prequential import user_histories

        width = max([int(getattr(m, "history_length", 0) or 0) for m in models.values()] + [1])
        histories = user_histories(pos, width)
    out = evaluate(models, popular, users, itms, cat, k, histories=histories)
    out["runs"] = run_ids
    if run_id is not None:
        store_metrics(lake, cfg.lake.metrics_table, run_id, "prequential",
                      metric_rows(run_id, cfg.model.name, first, last, "prequential", out, run_ids))
    return out


def _popular(lake, table: str, committed: list[str], since, until, k: int):
    """The ``k`` items (hashed) with most positive examples of committed runs in
    [since, until), most first (ties: smaller index); None if there are none.
    The engine's ``lookup`` reads three columns of the committed runs' rows
    (delta-rs: in Rust), so no history-sized Spark job runs every night."""
    import numpy as np
    import pyarrow as pa

    if not committed:
        return None
    rows = lake.lookup(table, pa.table({"run_id": pa.array(committed, pa.string())}),
                       ["item_idx", "event_time"], where="label = 1")
    t = _micros(rows["event_time"]).to_numpy(zero_copy_only=False)
    lo, hi = (int((x if x.tzinfo else x.replace(tzinfo=dt.timezone.utc)).timestamp() * 1_000_000)
              for x in (since, until))
    items = rows["item_idx"].to_numpy(zero_copy_only=False)[(t >= lo) & (t < hi)]
    if not len(items):
        return None
    ids, counts = np.unique(items, return_counts=True)
    return ids[np.lexsort((ids, -counts))][:k]


def _gate(cfg: "Config", lake, new_examples, items, parent: RunRecord | None, ck: dict[str, Any],
          run_id: str, first: int, last: int) -> dict[str, Any]:
    """Score the candidate and the champion on tonight's held-out rows
    (contract 1: ``holdout = true``) and decide (evaluation/gate.py)."""
    from pyspark.sql import functions as F

    from ..evaluation.gate import GateDecision, decide, evaluate_models
    from ..evaluation.prequential import metric_rows, store_metrics

    G = cfg.gate
    if parent is None:
        return {"decision": GateDecision(True, "first run of the lineage: champion by default").to_dict()}
    if not G.enabled:
        return {"decision": GateDecision(True, "gate.enabled=false: promoted without evaluation").to_dict()}
    if "holdout" in new_examples.columns:
        rows, where = new_examples.where(F.col("holdout")), "holdout = true rows of tonight's examples"
    else:  # until training_examples has the column: biased toward the candidate, and said so
        rows, where = new_examples, "ALL of tonight's examples (no holdout column; the candidate trained on them)"
    # pointwise metrics over every row (negatives and retractions are label 0);
    # ranking metrics over the label-1 rows, i.e. the held-out events
    # slices (reported, never gating): users / items no earlier committed run had, and eval.slice_column
    from ..evaluation.metrics import slice_masks

    slice_col = cfg.eval.slice_column
    slice_error = None
    if slice_col and slice_col not in new_examples.columns:
        slice_error = (f"eval.slice_column={slice_col!r} is not a column of {cfg.lake.examples_table} "
                       f"(columns: {', '.join(new_examples.columns)}); no per-value slices")
        log.error("gate: %s", slice_error)
        slice_col = None
    # history_idx, event_time, event_id: each held-out user's history for the ranking metrics
    data = rows.select("user_idx", "item_idx", "label",
                       *[c for c in dict.fromkeys(("history_idx", "event_time", "event_id", slice_col))
                         if c and c in new_examples.columns]).toArrow()
    committed = [r.run_id for r in Ledger(lake, cfg.lake.runs_table).runs(cfg.model.name)]
    masks = slice_masks(new_users=_unseen(lake, cfg.lake.examples_table, data, "user_idx", committed),
                        new_items=_unseen(lake, cfg.lake.examples_table, data, "item_idx", committed),
                        by=data[slice_col].to_numpy(zero_copy_only=False) if slice_col else None,
                        by_name=slice_col or "column") if data.num_rows else {}
    masks.pop("all", None)
    models = {"candidate": _load_model(ck["path"], ck["sha256"]), "champion": _load_model(parent)}
    res = evaluate_models(models, data, _catalog_idx(cfg, items), list(G.metrics), slices=masks)
    decision = decide(res.get("candidate", {}), res.get("champion", {}), G)
    if res["n"] == 0:
        decision = GateDecision(False, f"gate failed: no rows to score ({where} is empty)")
    out = {"decision": decision.to_dict(), "scored_on": where, "n": res["n"], "users": res.get("users", 0),
           "candidate": res.get("candidate", {}), "champion": res.get("champion", {}),
           "champion_run_id": parent.run_id, "slices": res.get("slices", {})}
    if slice_error:
        out["slices_error"] = slice_error
    store_metrics(lake, cfg.lake.metrics_table, run_id, "gate",
                  metric_rows(run_id, cfg.model.name, first, last, "gate", out,
                              {"candidate": run_id, "champion": parent.run_id}))
    return out


def _unseen(lake, table: str, rows, col: str, committed: list[str]):
    """Boolean mask over ``rows``: its ``col`` value is in no committed run's
    examples. Found by the engine's ``lookup`` on tonight's distinct values
    (delta-rs: a column read), not a Spark scan of every run's examples."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    values = rows[col].to_numpy(zero_copy_only=False)
    if not len(values) or not committed:
        return np.ones(len(values), dtype=bool)
    hits = lake.lookup(table, pa.table({col: pc.unique(rows[col]).drop_null()}), ["run_id", col])
    seen = hits.filter(pc.is_in(hits["run_id"], pa.array(committed, pa.string())))[col]
    return ~np.isin(values, seen.to_numpy(zero_copy_only=False))


def _inputs(cfg: "Config", lake, files: list[str]) -> dict[str, Any]:
    """What a reproduction needs: the tables' versions now (tonight's examples
    are written, nothing else is) and the exact files, in training order."""
    import re

    L = cfg.lake
    run_ids = []
    for f in files:
        m = re.search(r"run_id=([^/]+)/", f)
        if m:
            from urllib.parse import unquote

            rid = unquote(m.group(1))
            if rid not in run_ids:
                run_ids.append(rid)
    return {"examples_table": L.examples_table, "examples_version": lake.version(L.examples_table),
            "items_table": L.items_table, "items_version": lake.version(L.items_table),
            "run_ids": run_ids, "files": list(files)}


def _spec_record(spec: TrainSpec) -> dict[str, Any]:
    """The TrainSpec minus what is per-attempt (paths, files, meta, progress)."""
    import dataclasses

    skip = {"files", "checkpoint_dir", "resume_dir", "meta", "progress"}
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in skip}


def _after_commit(cfg: "Config", lake, record: RunRecord, previous: RunRecord | None) -> dict[str, Any]:
    """Audit trail and the MLflow mirror; the commit already happened, so a
    failure here is logged loudly and never undoes it."""
    from ..registry.core import record_event

    action = ("first" if record.parent_run_id is None and previous is None
              else "gate_promote" if record.status == CHAMPION else "gate_reject")
    try:
        record_event(lake, cfg, action, record.run_id, previous.run_id if previous else None, "gate",
                     record.status_reason or "")
    except Exception as e:
        log.error("run %s committed, but its registry event was not written: %s", record.run_id, e)
    if not cfg.mlflow.enabled:
        return {}
    try:
        from ..registry.mlflow_sync import log_run

        return log_run(cfg, lake, record)
    except Exception as e:
        log.error("run %s committed, but logging it to MLflow failed: %s: %s", record.run_id, type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}

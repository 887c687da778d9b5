"""Stage 5 of a night: the training spec from the config, and the run on a
backend (horovod / torch / local: ``train/backends.py``).

Reads the config, the strategy's warm-start checkpoint and the training
files. Writes the candidate's checkpoint files (and in-run checkpoints under
the run's ``inrun`` folder, removed once the run commits). Nothing here
touches the ledger.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..train.loop import TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..config import TrainConfig
    from .inputs import TrainingInputs
    from .strategy import StrategyChoice

log = logging.getLogger("deltarec.nightly")

# TrainSpec fields that are per attempt, not part of what a run was trained with
PER_ATTEMPT = ("files", "checkpoint_dir", "resume_dir", "meta", "progress")


@dataclass
class Trained:
    """A backend's result: ``result`` is rank 0's summary (checkpoint,
    train_loss, steps, world_size, ranks, examples, epochs_run, val_history)."""

    result: dict[str, Any]
    seconds: float
    backend: str  # the backend's name
    launcher: str | None  # torch only: "processes" (local) or "spark" (TorchDistributor)
    choice: dict[str, Any] | None = None  # train.backend=auto: what it chose, on how many examples

    @property
    def checkpoint(self) -> dict[str, Any]:
        return self.result["checkpoint"]

    def record(self, warm_start: str | None) -> dict[str, Any]:
        """``metrics["train"]`` of the run: what was trained, where, how long."""
        r = self.result
        return {"seconds": round(self.seconds, 3), "loss": r.get("train_loss"), "steps": r.get("steps"),
                "world_size": r.get("world_size"), "backend": self.backend, "launcher": self.launcher,
                "ranks": r.get("ranks"), "examples_trained": r.get("examples"), "epochs_run": r.get("epochs_run"),
                "val_history": r.get("val_history"), "warm_start": warm_start, "backend_choice": self.choice,
                "loss_name": r.get("loss_name"), "ids": r.get("ids"), "resumed_from": r.get("resumed_from")}


def history_length(cfg: "Config") -> int:
    """Items of history a batch carries: only models that read one get it
    (the ranking model's repeat term; 0 turns it off)."""
    if cfg.model.name in ("sequential", "repeat_explore"):
        return max(cfg.features.history_length, 1)
    return cfg.features.history_length if cfg.model.name == "ranking" else 0


def model_params(cfg: "Config") -> dict[str, Any]:
    """The keyword arguments ``build_model(cfg.model.name, ...)`` takes."""
    m, f = cfg.model, cfg.features
    params: dict[str, Any] = {"user_buckets": f.user_buckets, "item_buckets": f.item_buckets,
                              "embedding_dim": m.embedding_dim, "hidden": list(m.hidden), "dropout": m.dropout,
                              "embedding": m.embedding}
    if m.name == "sequential":
        params.update(history_length=max(f.history_length, 1), heads=m.heads, layers=m.layers)
    elif m.name == "ranking":
        params.update(history_length=f.history_length, item_time=m.item_time,
                      item_half_lives=list(m.item_half_lives))
    elif m.name == "repeat_explore":
        params.update(history_length=max(f.history_length, 1), item_half_lives=list(m.item_half_lives),
                      repeat_gate=m.repeat_gate, repeat_items=f.repeat_items)
    if m.text.enabled:
        from .text_embeddings import text_params

        params["text"] = text_params(cfg)
    return params


def train_spec(cfg: "Config", run_id: str, first: int, last: int, inputs: "TrainingInputs",
               choice: "StrategyChoice", checkpoint_dir: str, resume_dir: str | None) -> TrainSpec:
    """Everything the workers need, resolved into plain values (picklable)."""
    t, warm, parent = cfg.train, choice.warm, choice.parent
    forgetting = t.forgetting
    return TrainSpec(
        run_id=run_id, files=inputs.files, model_name=cfg.model.name,
        model_params=model_params(cfg), optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, epochs=t.epochs if warm else t.full_epochs, seed=t.seed + first,
        checkpoint_dir=checkpoint_dir, parent_path=warm.checkpoint_path if warm else None,
        parent_sha256=warm.checkpoint_sha256 if warm else None, grad_clip=t.grad_clip,
        freeze=list(t.freeze) if choice.strategy == "finetune" else [], lr_schedule=t.lr_schedule,
        lr_decay=t.lr_decay, scale_lr_by_workers=t.scale_lr_by_workers,
        accumulation_steps=t.accumulation_steps, validation_fraction=t.validation_fraction,
        patience=t.patience, progress=t.progress, use_gpu=t.use_gpu,
        resume_dir=resume_dir, checkpoint_every_steps=t.checkpoint_every_steps,
        replay_files=inputs.replay, history_length=history_length(cfg),
        repeat_items=cfg.features.repeat_items if cfg.model.name == "repeat_explore" else 0,
        vocab_min_count=cfg.model.vocab.min_count, vocab_ttl_nights=cfg.model.vocab.ttl_nights,
        vocab_oov_buckets=cfg.model.vocab.oov_buckets,
        proximal=forgetting.proximal if warm else 0.0, ewc=forgetting.ewc if warm else 0.0,
        distill=forgetting.distill if warm else 0.0,
        fisher_batches=forgetting.fisher_batches if forgetting.ewc > 0 else 0,
        collective_timeout_s=t.collective_timeout_s,
        loss={"name": t.loss, "in_batch": t.loss_in_batch, "history_negatives": t.loss_history_negatives,
              "uniform_negatives": t.loss_uniform_negatives, "logq": t.loss_logq},
        meta={"parent_run_id": parent.run_id if parent else None, "strategy": choice.strategy,
              "warm_start": warm.run_id if warm else None,
              "source_versions": [first, last], "config": cfg.to_dict()},
    )


def spec_record(spec: TrainSpec) -> dict[str, Any]:
    """``metrics["train_spec"]``: the TrainSpec minus what is per attempt."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in PER_ATTEMPT}


def launcher_of(backend: Any) -> str | None:
    """How a torch backend starts its ranks; None for the others."""
    if getattr(backend, "name", None) != "torch":
        return None
    return "processes" if getattr(backend, "spark", None) is None else "spark"


def train_candidate(spark: "SparkSession | None", cfg: "Config", spec: TrainSpec, backend: Any = None) -> Trained:
    """Run ``spec`` on ``backend`` (default: the one ``cfg.train`` names)."""
    from ..train.backends import make_backend

    t = cfg.train
    choice = None
    if backend is None:
        name, choice = t.backend, None
        if name == "auto":
            choice = auto_backend(t, count_rows(spec.files + list(spec.replay_files or [])))
            name = choice["chose"]
        backend = make_backend(name, spark, t.num_proc, t.use_gpu, t.launcher)
    started = time.perf_counter()
    result = backend.run(spec)
    return Trained(result, time.perf_counter() - started, backend.name, launcher_of(backend), choice)


def auto_backend(t: "TrainConfig", examples: int) -> dict[str, Any]:
    """``train.backend=auto``: one in-process worker below
    ``train.auto_min_examples`` examples (workers' launch and exchange cost
    more than they save there), ``train.distributed`` from it on."""
    chose = t.distributed if examples >= t.auto_min_examples else "local"
    log.info("train.backend=auto: %d examples to train, threshold %d -> %s", examples, t.auto_min_examples, chose)
    return {"requested": "auto", "examples": examples, "threshold": t.auto_min_examples, "chose": chose}


def count_rows(files: list[str]) -> int:
    """Rows of the Parquet ``files``, from their footers (no data read)."""
    import pyarrow.parquet as pq

    from ..lake.uri import filesystem

    total = 0
    for f in files:
        fs, path = filesystem(f)  # every path form the lake hands out (lake/uri.py)
        total += pq.ParquetFile(path if fs is None else fs.open_input_file(path)).metadata.num_rows
    return total

"""Rebuild a run's checkpoint from its lineage and compare it with the recorded one.

The run row records (metrics["inputs"]) the version the examples table had
when the run committed and the exact parquet files it trained on, in order,
and (metrics["train_spec"]) the training spec: seed, optimizer, epochs,
parent checkpoint; metrics["train"] the backend and the number of workers
that trained it. Reproduction time-travels the examples table to that
version, checks that every file is part of that snapshot (and still on disk:
not vacuumed), retrains from the recorded parent on the same backend with
the same number of workers (the shard each worker reads, and so the order of
the updates, depends on it), then scores the rebuilt model on the run's
held-out rows of that snapshot with the gate's metrics, and compares.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from ..lake.engine import LakeError
from ..lake.ledger import Ledger

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import RunRecord

log = logging.getLogger("deltarec.registry")


def _same_file(a: str, b: str) -> bool:
    strip = lambda u: u.removeprefix("file://")  # noqa: E731
    return strip(a) == strip(b)


def reproduce(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", run_id: str, *,
              tolerance: float = 1e-4, keep: str | None = None) -> dict[str, Any]:
    """Retrain ``run_id`` from its lineage; ``passed`` when every recorded
    gate metric (and the training loss) is within ``tolerance`` of the rebuilt
    one. ``keep``: directory for the rebuilt checkpoint (default: a temporary
    one, deleted)."""
    from ..evaluation.gate import evaluate_models
    from ..evaluation.prequential import catalog_indices
    from ..features.items import read_items
    from ..train.checkpoint import load_model, verify_checkpoint
    from ..train.loop import TrainSpec

    ledger = Ledger(lake, cfg.lake.runs_table)
    run = ledger.get(run_id)
    from ..privacy import not_reproducible_reason

    blocked = not_reproducible_reason(cfg, lake, run_id)
    if blocked:
        raise LakeError(f"run {run_id} is not reproducible: {blocked}")
    inputs, spec_d = run.metrics.get("inputs"), run.metrics.get("train_spec")
    if not inputs or not spec_d:
        raise LakeError(f"run {run_id} records no lineage inputs/train_spec (committed by an older deltarec): "
                        "it cannot be reproduced")
    table, version = inputs["examples_table"], inputs["examples_version"]
    snapshot = lake.snapshot_files(table, version)
    missing = [f for f in inputs["files"] if not any(_same_file(f, s) for s in snapshot)]
    if missing:
        raise LakeError(f"run {run_id}: {len(missing)} of its {len(inputs['files'])} training files are not in "
                        f"{table} version {version} (e.g. {missing[0]}); the lake's history was rewritten")
    if spec_d.get("parent_path"):
        verify_checkpoint(spec_d["parent_path"], spec_d.get("parent_sha256"))

    out_dir = keep or tempfile.mkdtemp(prefix=f"deltarec-reproduce-{run_id}-")
    known = {f.name for f in dataclasses.fields(TrainSpec)}
    spec = TrainSpec(**{k: v for k, v in spec_d.items() if k in known},
                     files=list(inputs["files"]), checkpoint_dir=f"{out_dir}/checkpoint", resume_dir=None,
                     progress=False, meta={"reproduction_of": run_id})
    backend = recorded_backend(spark, run)
    try:
        try:
            result = backend.run(spec)
        except FileNotFoundError as e:
            raise LakeError(f"run {run_id}: a training file of {table} version {version} is gone from storage "
                            f"(vacuumed?): {e}") from None
        ck = result["checkpoint"]
        same_weights = ck["files"].get("model.safetensors") == run.checkpoint_files.get("model.safetensors")
        comparisons = []
        recorded_loss = (run.metrics.get("train") or {}).get("loss")
        if recorded_loss is not None and result.get("train_loss") is not None:
            comparisons.append(_compare("train.loss", recorded_loss, result["train_loss"], tolerance))
        gate = run.metrics.get("gate") or {}
        recorded = gate.get("candidate") or {}
        if recorded:
            rows = lake.read_arrow(table, version=version, filters=[("run_id", "=", run_id)])
            if "holdout" in rows.column_names and "holdout" in gate.get("scored_on", ""):
                import pyarrow.compute as pc

                rows = rows.filter(pc.equal(rows["holdout"], True))
            items = read_items(cfg.replace(lake=cfg.lake.replace(items_table=inputs["items_table"])), lake,
                               version=inputs.get("items_version"))
            rebuilt = evaluate_models({"candidate": load_model(ck)},
                                      # the columns the nightly gate scored with (histories need the time order)
                                      rows.select(["user_idx", "item_idx", "label"] + [
                                          c for c in ("history_idx", "event_time", "event_id")
                                          if c in rows.column_names]),
                                      catalog_indices(items, cfg.features), sorted(recorded))
            for m, v in sorted(recorded.items()):
                comparisons.append(_compare(f"gate.{m}", v, rebuilt["candidate"].get(m, float("nan")), tolerance))
        passed = bool(comparisons) and all(c["passed"] for c in comparisons)
        return {"id": run_id, "passed": passed, "tolerance": tolerance, "identical_weights": same_weights,
                "examples_table": table, "examples_version": version, "files": len(inputs["files"]),
                "parent": run.parent_run_id, "seed": spec.seed, "backend": backend.name,
                "world_size": result.get("world_size"), "comparisons": comparisons,
                "checkpoint": ck["path"] if keep else None, "recorded_checkpoint": run.checkpoint_path}
    finally:
        if keep is None:
            shutil.rmtree(out_dir, ignore_errors=True)


def recorded_backend(spark: "SparkSession | None", run: "RunRecord"):
    """The backend that trained ``run``, with as many workers: its
    ``metrics["train"]`` (backend, world_size, launcher), else what its config
    asked for (runs committed before the launcher was recorded)."""
    from ..train.backends import make_backend

    train = run.metrics.get("train") or {}
    asked = (run.config or {}).get("train", {})
    name = train.get("backend") or asked.get("backend", "local")
    world = int(train.get("world_size") or asked.get("num_proc") or 1)
    launcher = train.get("launcher") or asked.get("launcher") or "spark"
    use_gpu = bool((run.metrics.get("train_spec") or {}).get("use_gpu", False))
    return make_backend(name, spark, world, use_gpu, launcher)


def _compare(name: str, recorded: float, rebuilt: float, tol: float) -> dict[str, Any]:
    diff = abs(float(recorded) - float(rebuilt))
    ok = (math.isnan(recorded) and math.isnan(rebuilt)) or diff <= tol
    return {"metric": name, "recorded": recorded, "rebuilt": round(float(rebuilt), 6), "abs_diff": diff,
            "passed": bool(ok)}

"""A forget batch reaches every retained checkpoint in the ledger.

Each checkpoint not yet rewritten for the batch (its ``meta.json`` lists the
batches applied) is rewritten into ``<run dir>/forget-<batch>`` by
``privacy.model.forget_rows`` (or, by the ``privacy.keep_checkpoints``
policy, deleted); then one MERGE records every new path and sha256 in the
ledger (so ``status --verify``, warm starts and rollbacks accept them), a
registry event per run says what changed and why, and the old directories
go (MLflow follows once the tables are erased: ``privacy/mlflow_follow.py``). A crash before the MERGE leaves the ledger on
the old checkpoints and the rerun rewrites them again; after it, the rerun
finds the batch applied and skips them (the old directories are then
orphans, removed with the batch's VACUUM).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from ..lake.ledger import CHAMPION, Ledger, RunRecord

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.privacy")
REWRITE, DELETE = "forget_rewrite", "checkpoint_deleted"  # registry event actions


def forget_in_checkpoints(cfg: "Config", lake: "LakeEngine", batch: int, forgotten: list[str],
                          hashes: dict[str, str]):
    """Apply batch ``batch`` (stored keys ``forgotten``) to every checkpoint of
    every model in the ledger. Returns ({run_id: rewritten | deleted}, {key:
    [{run_id, action}]}, the ledger records MLflow has to follow)."""
    from ..faults import crash_point
    from ..registry.core import events
    from ..train.checkpoint import load_checkpoint
    from .model import forget_rows, save

    ledger = Ledger(lake, cfg.lake.runs_table)
    runs = ledger.runs()
    keep = _kept(runs, cfg.privacy.keep_checkpoints)
    tag = f"forget batch {batch}:"
    changed: list[RunRecord] = []
    applied: list[tuple[RunRecord, dict]] = []  # (run as the ledger will hold it, what the batch did to it)
    deleted: list[tuple[RunRecord, str]] = []  # (run, sha256 it had)
    old_dirs: list[str] = []
    for run in runs:
        if not run.checkpoint_path:  # deleted by the keep_checkpoints policy (now, if a crash cut its event)
            if not any(e["action"] == DELETE for e in events(lake, for_model(cfg, run.model), run.run_id)):
                deleted.append((run, "(recorded before a crash)"))
            continue
        if run.run_id not in keep:
            changed.append(replace(run, checkpoint_path="", checkpoint_sha256="", checkpoint_files={}))
            deleted.append((changed[-1], run.checkpoint_sha256))
            old_dirs.append(run.checkpoint_path)
            continue
        ck = load_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
        if batch in ck.meta.get("forgotten_batches", []):  # rewritten before a crash
            applied.append((run, ck.meta.get("forget", {}).get(str(batch), {})))
            continue
        train = run.config.get("train", {})
        r = forget_rows(ck, forgotten, lambda cols, users=None, run=run: _lineage(cfg, lake, runs, run, cols, users),
                        batch=batch, epochs=cfg.privacy.retrain_epochs, lr=float(train.get("lr", 0.003)),
                        batch_size=int(train.get("batch_size", 1024)))
        # what the batch did, by user hash (never the key), travels with the checkpoint: a rerun reports it too
        what = {"from_sha256": run.checkpoint_sha256, "actions": {hashes[k]: a for k, a in r.actions.items()}}
        r.meta["forget"] = {**ck.meta.get("forget", {}), str(batch): what}
        saved = save(f"{os.path.dirname(run.checkpoint_path.rstrip('/'))}/forget-{batch:04d}", r)
        changed.append(replace(run, checkpoint_path=saved.path, checkpoint_sha256=saved.sha256,
                               checkpoint_files=saved.files))
        applied.append((changed[-1], what))
        old_dirs.append(run.checkpoint_path)
        for key, action in r.actions.items():
            log.info("forget batch %d, user %s…, run %s: %s", batch, hashes[key][:12], run.run_id, action)
    crash_point("forget_after_checkpoints")
    ledger.set_checkpoints(changed)
    crash_point("forget_after_ledger")
    # from here on every step is repeated by a rerun only where it is missing
    for rec, what in applied:
        _event(lake, cfg, rec, REWRITE, f"{tag} users' rows reset; checkpoint sha256 "
                                        f"{what.get('from_sha256', '?')} -> {rec.checkpoint_sha256}")
    for rec, was in deleted:
        _event(lake, cfg, rec, DELETE, f"{tag} deleted by privacy.keep_checkpoints={cfg.privacy.keep_checkpoints} "
                                       f"(was sha256 {was})")
    for d in old_dirs:
        remove_dir(d)
    done = {rec.run_id: "rewritten" for rec, _ in applied} | {rec.run_id: "deleted" for rec, _ in deleted}
    by_hash = {h: k for k, h in hashes.items()}
    per_key: dict[str, list[dict[str, str]]] = {k: [] for k in forgotten}
    for rec, what in applied:
        for h, action in what.get("actions", {}).items():
            if h in by_hash:
                per_key[by_hash[h]].append({"run_id": rec.run_id, "action": action})
    return done, per_key, [rec for rec, _ in applied] + [rec for rec, _ in deleted]


def _kept(runs: list[RunRecord], n: int) -> set[str]:
    """Runs whose checkpoints stay (rewritten): all with n = -1; else per model
    the champion, the first run (the nights' never-updated baseline) and the
    n newest others."""
    if n < 0:
        return {r.run_id for r in runs}
    keep = set()
    for model in {r.model for r in runs}:
        mine = sorted((r for r in runs if r.model == model), key=lambda r: r.source_last)
        keep |= {r.run_id for r in mine if r.status == CHAMPION}
        keep.add(mine[0].run_id)
        rest = [r for r in reversed(mine) if r.run_id not in keep and r.checkpoint_path]
        keep |= {r.run_id for r in rest[:n]}
    return keep


def _lineage(cfg: "Config", lake: "LakeEngine", runs: list[RunRecord], run: RunRecord, columns: list[str] | None,
             users: list[str] | None) -> pa.Table:
    """Training examples (holdout rows excluded) of the runs up to ``run`` of
    its model that hashed ids as it did: what its checkpoint was trained on."""
    def hashing(r: RunRecord):
        f = (r.config or {}).get("features", {})
        return f.get("user_buckets"), f.get("item_buckets"), f.get("salt"), (r.config or {}).get("model", {}).get(
            "embedding")

    ids = [r.run_id for r in runs if r.model == run.model and r.source_last <= run.source_last
           and hashing(r) == hashing(run)]
    table = cfg.lake.examples_table
    if not lake.exists(table):
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["user_id"])})
    cols = None if columns is None else list(dict.fromkeys([*columns, "holdout"]))
    if users is None:
        rows = lake.lookup(table, pa.table({"run_id": pa.array(ids, pa.string())}), cols)
    else:
        rows = lake.lookup(table, pa.table({"user_id": pa.array(users, pa.string())}), None if cols is None
                           else list(dict.fromkeys([*cols, "run_id"])))
        rows = rows.filter(pc.is_in(rows["run_id"], pa.array(ids, pa.string())))
    if "holdout" in rows.column_names:
        rows = rows.filter(pc.invert(pc.fill_null(rows["holdout"], False)))
    return rows.select(columns) if columns else rows


def _event(lake: "LakeEngine", cfg: "Config", rec: RunRecord, action: str, reason: str) -> None:
    """One registry event per (run, action, batch): a rerun does not repeat it."""
    from ..registry.core import events, record_event

    batch_tag = reason.split(":", 1)[0] + ":"
    if any(e["action"] == action and e["run_id"] == rec.run_id and e["reason"].startswith(batch_tag)
           for e in events(lake, for_model(cfg, rec.model), rec.run_id)):
        return
    record_event(lake, for_model(cfg, rec.model), action, rec.run_id, None, "forget", reason)


def for_model(cfg: "Config", model: str) -> "Config":
    """``cfg`` for another model of the same lake (the registry is per model)."""
    return cfg if cfg.model.name == model else cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name": model})})


def remove_dir(path: str) -> None:
    if "://" in path and not path.startswith("file://"):
        from pyarrow import fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        try:
            fs.delete_dir(p)
        except (FileNotFoundError, OSError):
            pass
        return
    shutil.rmtree(path.removeprefix("file://"), ignore_errors=True)


def orphan_dirs(cfg: "Config", lake: "LakeEngine", older_than_hours: float) -> list[str]:
    """Checkpoint directories (a ``manifest.json`` or in-run state) under
    ``lake.checkpoints_dir`` that no ledger row references and that were last
    written more than ``older_than_hours`` ago: crashed attempts, pre-forget
    copies. A younger one may be a night still running. Local lakes only."""
    import time

    root = lake.uri(cfg.lake.checkpoints_dir).removeprefix("file://")
    if "://" in root or not os.path.isdir(root):
        return []
    used = {os.path.normpath(r.checkpoint_path.removeprefix("file://")) for r in Ledger(lake, cfg.lake.runs_table)
            .runs() if r.checkpoint_path}
    cutoff = time.time() - older_than_hours * 3600
    out = []
    for dirpath, _, filenames in os.walk(root):
        d = os.path.normpath(dirpath)
        if "manifest.json" in filenames and d not in used and \
                os.path.getmtime(os.path.join(d, "manifest.json")) <= cutoff:
            out.append(d)
    return sorted(out)


def mark_not_reproducible(cfg: "Config", lake: "LakeEngine", batch: int, why: str) -> list[str]:
    """Registry event ``not_reproducible`` for every run whose recorded training
    files are no longer all in the examples table's current snapshot (the
    erasure rewrote them: reproducing by time travel would bring the erased
    users back; after VACUUM the files are gone). Once per run."""
    from ..registry.core import events, record_event

    table = cfg.lake.examples_table
    if not lake.exists(table):
        return []
    current = {f.removeprefix("file://") for f in lake.data_files(table)}
    marked = []
    for run in Ledger(lake, cfg.lake.runs_table).runs():
        files = [f.removeprefix("file://") for f in (run.metrics.get("inputs") or {}).get("files", [])]
        replay = [f.removeprefix("file://") for f in (run.metrics.get("train_spec") or {}).get("replay_files") or []]
        gone = [f for f in files if f not in current] + [f for f in replay if not os.path.exists(f)]
        if not gone:
            continue
        c = for_model(cfg, run.model)
        if any(e["action"] == "not_reproducible" for e in events(lake, c, run.run_id) if e["run_id"] == run.run_id):
            continue
        record_event(lake, c, "not_reproducible", run.run_id, None, "forget",
                     f"forget batch {batch}: {len(gone)} of its training files {why} (e.g. "
                     f"{os.path.basename(gone[0])}); a reproduction by time travel would restore erased users")
        marked.append(run.run_id)
    return marked


def not_reproducible_reason(cfg: "Config", lake: "LakeEngine", run_id: str) -> str | None:
    """Why ``run_id`` may not be reproduced (a forget erased part of its inputs), or None."""
    table = cfg.lake.registry_events_table
    if not lake.exists(table):
        return None
    rows = lake.read_arrow(table, filters=[("run_id", "=", run_id), ("action", "=", "not_reproducible")])
    return rows["reason"][0].as_py() if rows.num_rows else None


def scrub_replay(cfg: "Config", lake: "LakeEngine", forgotten: list[str]) -> int:
    """Replay samples (parquet under each run's checkpoint folder) hold copies
    of examples: drop the users' rows from them, in place. Returns rows dropped."""
    import glob

    import pyarrow.parquet as pq

    root = lake.uri(cfg.lake.checkpoints_dir).removeprefix("file://")
    if "://" in root:
        return 0
    dropped = 0
    keys = pa.array(sorted(forgotten), pa.string())
    for f in sorted(glob.glob(os.path.join(root, "*", "*", "replay", "*.parquet"))):
        t = pq.read_table(f)
        if "user_id" not in t.column_names:
            continue
        hit = pc.is_in(t["user_id"].cast(pa.string()), keys)
        n = pc.sum(hit).as_py() or 0
        if n:
            tmp = f + ".forget.tmp"
            pq.write_table(t.filter(pc.invert(hit)), tmp)
            os.replace(tmp, f)
            dropped += n
    return dropped

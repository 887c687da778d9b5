"""Lake upkeep: ``deltarec maintain`` (and, with ``maintain.every_nights``,
the end of every Nth night).

Every night appends small files (examples, quarantine, metrics, ledger and
registry rows) and MERGEs rewrite state files; nothing compacts them, so reads
slow down as nights accumulate. Here, for deltarec's own tables only (never
the source behaviour table or the items catalogue, which belong to their
owners):

- OPTIMIZE (Delta's bin-packing compaction) of the tables that grow by small
  appends and MERGEs, and of the recommendations table. Not ``training_examples``: a committed run's lineage
  names its example files, and ``registry reproduce`` and full retrains read
  them by name. A compaction is a Delta transaction that loses to a concurrent
  MERGE on the same table (it is retried on the next maintain), so it never
  runs "over" a night's write.
- VACUUM of those tables and the examples table with
  ``maintain.retention_hours`` (files a rerun replaced or a compaction
  rewrote; Delta keeps every version younger than the retention readable).
- Checkpoint attempts no run committed (a crash before the ledger commit, an
  attempt a rerun replaced, a crashed run's in-run state) older than the
  retention. Committed checkpoints and replay samples stay: rollback and
  reproduce need them.

Reads the ledger; writes only Delta maintenance commits and deletes only
files no committed run references.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from .lake import ConcurrentRunError
from .lake.ledger import Ledger
from .lake.uri import filesystem, local_path

if TYPE_CHECKING:
    from .config import Config
    from .lake.engine import LakeEngine

log = logging.getLogger("deltarec.maintain")


def compacted_tables(cfg: "Config") -> list[str]:
    """deltarec's tables that grow by small appends and MERGEs, and the
    recommendations table (rewritten in one part per task at every refresh:
    its replaced versions' files are what VACUUM frees)."""
    lk = cfg.lake
    return [lk.event_index_table, lk.user_state_table, lk.item_stats_table, lk.quarantine_table,
            lk.metrics_table, lk.runs_table, lk.registry_events_table, cfg.recommend.table]


def owned_tables(cfg: "Config") -> list[str]:
    """Every table deltarec writes (what ``deltarec status`` sizes)."""
    return [cfg.lake.examples_table, *compacted_tables(cfg)]


def table_sizes(lake: "LakeEngine", tables: list[str]) -> dict[str, dict[str, int]]:
    """Files and bytes of each existing table's current version (from the
    Delta log's file list and the files' sizes)."""
    out = {}
    for t in tables:
        if not lake.exists(t):
            continue
        files = lake.data_files(t)
        out[t] = {"version": lake.version(t), "files": len(files), "bytes": _bytes(files)}
    return out


def _bytes(files: list[str]) -> int:
    total = 0
    for f in files:
        fs, path = filesystem(f)  # every path form the lake hands out (lake/uri.py)
        total += os.path.getsize(path) if fs is None else (fs.get_file_info(path).size or 0)
    return total


def maintain(cfg: "Config", lake: "LakeEngine", *, optimize: bool = True, vacuum: bool = True,
             checkpoints: bool = True) -> dict[str, Any]:
    """Compact, vacuum and drop uncommitted checkpoint attempts; returns what
    was done per table with the files before and after."""
    m = cfg.maintain
    t0 = time.perf_counter()
    before = table_sizes(lake, owned_tables(cfg))
    report: dict[str, Any] = {"tables": {}, "retention_hours": m.retention_hours}
    for table in before:
        entry: dict[str, Any] = {"files_before": before[table]["files"], "bytes_before": before[table]["bytes"]}
        if optimize and table in compacted_tables(cfg):
            try:
                entry["optimize"] = lake.optimize(table)
            except ConcurrentRunError as e:  # a night's MERGE won: compact next time
                log.warning("maintain: OPTIMIZE %s skipped, a concurrent write committed first (%s)", table, e)
                entry["optimize"] = {"skipped": "concurrent write"}
        if vacuum:
            entry["vacuumed_files"] = len(lake.vacuum(table, m.retention_hours,
                                                      enforce_retention=m.enforce_retention, full=True))
        report["tables"][table] = entry
    for table, size in table_sizes(lake, list(before)).items():
        report["tables"][table].update(files_after=size["files"], bytes_after=size["bytes"])
    if checkpoints:
        report["checkpoints_removed"] = remove_uncommitted_checkpoints(cfg, lake, m.retention_hours)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    for table, e in report["tables"].items():
        log.info("maintain %s: %d -> %d files, %d -> %d bytes%s", table, e["files_before"], e["files_after"],
                 e["bytes_before"], e["bytes_after"],
                 f", {e['vacuumed_files']} vacuumed" if "vacuumed_files" in e else "")
    return report


def remove_uncommitted_checkpoints(cfg: "Config", lake: "LakeEngine", retention_hours: float) -> list[str]:
    """Directories under ``<checkpoints>/<model>/<run_id>/`` that no committed
    run references (attempts, in-run state), older than the retention.
    Committed checkpoints and ``replay`` samples stay. Local lakes only (an
    object store's lifecycle rules do this there)."""
    uri = lake.uri(cfg.lake.checkpoints_dir)
    root = local_path(uri)
    if root is None:
        log.info("maintain: checkpoints under %s are on an object store: left to its lifecycle rules", uri)
        return []
    if not os.path.isdir(root):
        return []
    committed = {os.path.realpath(local_path(r.checkpoint_path) or r.checkpoint_path)
                 for r in Ledger(lake, cfg.lake.runs_table).runs() if r.checkpoint_path}
    cutoff = time.time() - retention_hours * 3600
    removed = []
    for model in sorted(os.listdir(root)):
        for run in sorted(os.listdir(os.path.join(root, model))):
            run_dir = os.path.join(root, model, run)
            for entry in sorted(os.listdir(run_dir)):
                path = os.path.join(run_dir, entry)
                if entry == "replay" or os.path.realpath(path) in committed or not os.path.isdir(path):
                    continue
                if _newest_mtime(path) > cutoff:  # a night may still be writing it
                    continue
                shutil.rmtree(path)
                removed.append(path)
            if not os.listdir(run_dir):
                os.rmdir(run_dir)
    if removed:
        log.info("maintain: removed %d uncommitted checkpoint folder(s) under %s", len(removed), root)
    return removed


def _newest_mtime(path: str) -> float:
    newest = os.path.getmtime(path)
    for dirpath, _, files in os.walk(path):
        for f in files:
            newest = max(newest, os.path.getmtime(os.path.join(dirpath, f)))
    return newest


def maybe_maintain(cfg: "Config", lake: "LakeEngine", ledger: Ledger) -> dict[str, Any] | None:
    """The end-of-night step: after every ``maintain.every_nights``-th
    committed run of the model. A failure is logged and returned; the night's
    commit stands."""
    every = cfg.maintain.every_nights
    if not every or len(ledger.runs(cfg.model.name)) % every:
        return None
    try:
        return maintain(cfg, lake)
    except Exception as e:  # noqa: BLE001 - delta-rs's own errors too: the night before it is committed
        log.warning("maintain after the night failed (the night is committed; run `deltarec maintain` "
                    "to retry): %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}


def describe(report: dict[str, Any]) -> str:
    """``deltarec maintain``'s text output: one line per table."""
    lines = [f"maintain (retention {report['retention_hours']} h), {report['seconds']:.1f} s"]
    for table, e in report["tables"].items():
        opt = e.get("optimize") or {}
        what = ("optimize skipped: " + opt["skipped"]) if "skipped" in opt else \
            (f"compacted {opt['files_removed']} -> {opt['files_added']} files" if opt else "not compacted")
        lines.append(f"  {table:<22} {e['files_before']:>6} -> {e['files_after']:>6} files  "
                     f"{e['bytes_before'] / 1e6:8.2f} -> {e['bytes_after'] / 1e6:8.2f} MB  {what}"
                     + (f", {e['vacuumed_files']} files vacuumed" if "vacuumed_files" in e else ""))
    removed = report.get("checkpoints_removed")
    if removed is not None:
        lines.append(f"  uncommitted checkpoint folders removed: {len(removed)}")
    return "\n".join(lines)

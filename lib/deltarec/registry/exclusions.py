"""`deltarec registry exclude RUN --reason` / `include RUN`: a way back from a bad night.

The examples of an excluded run are never trained on again: incremental
inputs and full retrains both leave them out (pipeline/inputs.py), and a
champion whose weights learned from one is not warm-started from
(pipeline/strategy.py). The state is the registry_events table itself (the
latest exclude / include event of a run decides), so every change is
recorded with who, why and when, and `include` undoes an exclude.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..lake.engine import LakeError
from ..lake.ledger import Ledger, RunRecord
from .core import current_user, events, record_event

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.registry")


def excluded_runs(lake: "LakeEngine", cfg: "Config") -> dict[str, dict[str, Any]]:
    """Run id → its exclude event (by, reason, at) for every run of the
    configured model that is excluded now."""
    out: dict[str, dict[str, Any]] = {}
    for e in events(lake, cfg):  # oldest first: the latest word on a run wins
        if e["action"] == "exclude":
            out[e["run_id"]] = {"by": e["by"], "reason": e["reason"], "at": e["at"]}
        elif e["action"] == "include":
            out.pop(e["run_id"], None)
    return out


def exclude(ledger: Ledger, lake: "LakeEngine", cfg: "Config", run_id: str, *, reason: str,
            by: str | None = None) -> dict[str, Any]:
    """Never train on ``run_id``'s examples again. Refused for the champion
    (it serves and is the next night's parent: roll back or promote another
    first) and for a run already excluded."""
    run = _own_run(ledger, cfg, run_id)
    champ = ledger.champion(cfg.model.name)
    if champ is not None and champ.run_id == run_id:
        raise LakeError(f"run {run_id!r} is the champion of model {cfg.model.name!r}: it serves and tomorrow "
                        "warm-starts from it. `deltarec registry rollback` (or `promote` another run) first, "
                        "then exclude it")
    already = excluded_runs(lake, cfg).get(run_id)
    if already:
        raise LakeError(f"run {run_id!r} is already excluded (by {already['by']} at {already['at']}: "
                        f"{already['reason']}); `deltarec registry include {run_id}` undoes it")
    ev = record_event(lake, cfg, "exclude", run.run_id, None, by or current_user(), reason)  # no champion change
    log.info("exclude: the examples of run %s (versions %d..%d) are never trained on again, by %s: %s",
             run_id, run.source_first, run.source_last, ev["by"], reason)
    return _out(ev, run)


def include(ledger: Ledger, lake: "LakeEngine", cfg: "Config", run_id: str, *, reason: str = "manual include",
            by: str | None = None) -> dict[str, Any]:
    """Undo :func:`exclude`: ``run_id``'s examples are trained on again."""
    run = _own_run(ledger, cfg, run_id)
    if run_id not in excluded_runs(lake, cfg):
        raise LakeError(f"run {run_id!r} is not excluded; nothing to include (see `deltarec status`)")
    ev = record_event(lake, cfg, "include", run.run_id, None, by or current_user(), reason)
    log.info("include: the examples of run %s are trained on again, by %s: %s", run_id, ev["by"], reason)
    return _out(ev, run)


def trained_on_excluded(parent: RunRecord, runs: list[RunRecord], excluded: dict[str, Any]) -> list[str]:
    """Excluded runs whose examples ``parent``'s weights learned from: its
    own recorded inputs and those of every warm-start ancestor (a full run
    ends the chain: it learned only from its own inputs)."""
    by_id = {r.run_id: r for r in runs}
    found: list[str] = []
    node, seen = parent, set()
    while node is not None and node.run_id not in seen:
        seen.add(node.run_id)
        ids = (node.metrics.get("inputs") or {}).get("run_ids") or [node.run_id]
        found += [i for i in ids if i in excluded and i not in found]
        if node.strategy == "full":
            break
        node = by_id.get(node.parent_run_id) if node.parent_run_id else None
    return found


def _own_run(ledger: Ledger, cfg: "Config", run_id: str) -> RunRecord:
    run = ledger.get(run_id)
    if run.model != cfg.model.name:
        raise LakeError(f"run {run_id!r} belongs to model {run.model!r}, not {cfg.model.name!r} (model.name)")
    return run


def _out(ev: dict[str, Any], run: RunRecord) -> dict[str, Any]:
    return {"action": ev["action"], "run_id": run.run_id, "source_versions": [run.source_first, run.source_last],
            "by": ev["by"], "reason": ev["reason"], "at": ev["at"].isoformat()}

"""list / show / promote / rollback over the ledger's status rows.

The champion pointer changes in one MERGE into the runs table
(:meth:`Ledger.set_champion`); the registry_events row written right after is
the audit trail. Should the process die in between, the runs row still holds
who, why and when (status_by / status_reason / status_at).
"""
from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..lake import schemas
from ..lake.engine import LakeError
from ..lake.ledger import CHAMPION, Ledger, RunRecord

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.registry")


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return os.environ.get("USER") or f"uid{os.getuid()}"


def record_event(lake: "LakeEngine", cfg: "Config", action: str, run_id: str, previous: str | None,
                 by: str, reason: str) -> dict[str, Any]:
    row = {"event_id": uuid.uuid4().hex, "model": cfg.model.name, "action": action, "run_id": run_id,
           "previous_champion": previous, "by": by, "reason": reason, "at": dt.datetime.now(dt.timezone.utc)}
    table = cfg.lake.registry_events_table
    lake.create(table, schemas.REGISTRY_EVENTS)
    lake.write(table, pa.Table.from_pylist([row], schema=schemas.REGISTRY_EVENTS), mode="append",
               schema=schemas.REGISTRY_EVENTS)
    return row


def events(lake: "LakeEngine", cfg: "Config", run_id: str | None = None) -> list[dict[str, Any]]:
    """Registry events of the configured model (about ``run_id`` if given), oldest first."""
    table = cfg.lake.registry_events_table
    if not lake.exists(table):
        return []
    rows = lake.read_arrow(table, filters=[("model", "=", cfg.model.name)]).to_pylist()
    if run_id:
        rows = [r for r in rows if run_id in (r["run_id"], r["previous_champion"])]
    rows.sort(key=lambda r: r["at"])
    return [{**r, "at": r["at"].isoformat()} for r in rows]


def _gate(r: RunRecord) -> dict[str, Any]:
    return r.metrics.get("gate") or {}


def list_entries(ledger: Ledger, model: str) -> list[dict[str, Any]]:
    """One entry per committed run, oldest first: id, status, parent, …"""
    out = []
    for r in ledger.runs(model):
        g = _gate(r)
        out.append({"id": r.run_id, "status": r.status, "parent": r.parent_run_id, "strategy": r.strategy,
                    "source_versions": [r.source_first, r.source_last],
                    "committed_at": r.committed_at.isoformat() if r.committed_at else None,
                    "gate": g.get("decision", {}).get("passed") if g else None,
                    "reason": r.status_reason, "by": r.status_by,
                    "status_at": r.status_at.isoformat() if r.status_at else None})
    return out


def show(ledger: Ledger, lake: "LakeEngine", cfg: "Config", run_id: str) -> dict[str, Any]:
    """Lineage of one run: parent chain, input version ranges, config, code
    version, metrics, checkpoint, registry events."""
    runs = {r.run_id: r for r in ledger.runs()}
    if run_id not in runs:
        raise LakeError(f"no run {run_id!r} in the ledger ({lake.uri(ledger.table)}); "
                        "see `deltarec registry list`")
    r = runs[run_id]
    chain, node, seen = [], r.parent_run_id, {run_id}
    while node and node not in seen:
        seen.add(node)
        p = runs.get(node)
        if p is None:
            chain.append({"id": node, "missing": True})
            break
        chain.append({"id": p.run_id, "status": p.status, "strategy": p.strategy,
                      "source_versions": [p.source_first, p.source_last]})
        node = p.parent_run_id
    inputs = dict(r.metrics.get("inputs") or {})
    trained_on = [{"id": rid, "source_versions": [runs[rid].source_first, runs[rid].source_last]
                   if rid in runs else [r.source_first, r.source_last]}
                  for rid in inputs.get("run_ids", [])]
    m = {k: v for k, v in r.metrics.items() if k not in ("inputs", "train_spec")}
    return {
        "id": r.run_id, "model": r.model, "status": r.status, "status_reason": r.status_reason,
        "status_by": r.status_by, "status_at": r.status_at.isoformat() if r.status_at else None,
        "strategy": r.strategy, "parent": r.parent_run_id, "parent_chain": chain,
        "source": {"table": r.source_table, "versions": [r.source_first, r.source_last]},
        "inputs": {"examples_table": inputs.get("examples_table"),
                   "examples_version": inputs.get("examples_version"),
                   "items_version": inputs.get("items_version"),
                   "trained_on": trained_on, "files": len(inputs.get("files", []))},
        "checkpoint": {"path": r.checkpoint_path, "sha256": r.checkpoint_sha256, "files": r.checkpoint_files},
        "code_version": r.code_version, "config": r.config, "metrics": m,
        "committed_at": r.committed_at.isoformat() if r.committed_at else None,
        "events": events(lake, cfg, r.run_id),
    }


def promote(ledger: Ledger, lake: "LakeEngine", cfg: "Config", run_id: str, *, by: str | None = None,
            reason: str = "manual promote", action: str = "promote") -> dict[str, Any]:
    """Make ``run_id`` the champion (one commit), after checking its checkpoint."""
    from ..train.checkpoint import verify_checkpoint  # imports torch

    by = by or current_user()
    target = ledger.get(run_id)
    verify_checkpoint(target.checkpoint_path, target.checkpoint_sha256)  # never serve a corrupt one
    new, old = ledger.set_champion(cfg.model.name, run_id, by=by, reason=reason, rollback=action == "rollback")
    ev = record_event(lake, cfg, action, run_id, old.run_id if old else None, by, reason)
    log.info("%s: champion of %r is now %s (was %s), by %s: %s", action, cfg.model.name, run_id,
             old.run_id if old else None, by, reason)
    out = {"action": action, "champion": new.run_id, "previous_champion": old.run_id if old else None,
           "by": by, "reason": reason, "at": ev["at"].isoformat()}
    if cfg.mlflow.enabled:
        from .mlflow_sync import set_champion_alias

        out["mlflow"] = set_champion_alias(cfg, lake, new)
    from ..pipeline.recommend import refresh_quietly  # the table follows the champion; errors logged, not raised

    out["recommendations"] = refresh_quietly(None, cfg, lake, reason=f"{action} {run_id}", by=by,
                                             only_if_exists=True)
    return out


def rollback(ledger: Ledger, lake: "LakeEngine", cfg: "Config", *, by: str | None = None,
             reason: str = "manual rollback") -> dict[str, Any]:
    """Back to the champion before the current one."""
    cur = ledger.champion(cfg.model.name)
    prev = ledger.previous_champion(cfg.model.name)
    if cur is None or cur.status != CHAMPION:
        raise LakeError(f"model {cfg.model.name!r} has no champion to roll back from; see `deltarec registry list`")
    if prev is None:
        raise LakeError(f"model {cfg.model.name!r}: champion {cur.run_id} has no previous champion to roll back "
                        "to; use `deltarec registry promote ID` to pick one")
    return promote(ledger, lake, cfg, prev.run_id, by=by, reason=reason, action="rollback")

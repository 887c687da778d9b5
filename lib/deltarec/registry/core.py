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


def parent_chain(run: RunRecord, by_id: dict[str, RunRecord]) -> tuple[list[RunRecord], str | None]:
    """``run``'s ancestors in ``by_id`` (run id → run), parent first, and the
    id of the first parent missing from ``by_id`` (None: the chain ends at a
    lineage's first run). A cycle ends the walk."""
    chain: list[RunRecord] = []
    node, seen = run.parent_run_id, {run.run_id}
    while node and node not in seen:
        seen.add(node)
        parent = by_id.get(node)
        if parent is None:
            return chain, node
        chain.append(parent)
        node = parent.parent_run_id
    return chain, None


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
    ancestors, missing = parent_chain(r, runs)
    chain = [{"id": p.run_id, "status": p.status, "strategy": p.strategy,
              "source_versions": [p.source_first, p.source_last]} for p in ancestors]
    if missing:
        chain.append({"id": missing, "missing": True})
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


def describe(action: str, out: Any, model: str) -> str:
    """What ``deltarec registry ACTION`` prints: ``out`` is the action's result
    (list / show / promote / rollback / reproduce, as ``--json`` prints it)."""
    from ..evaluation.prequential import ROLES, role_metrics

    if action == "list":
        lines = [f"{'id':<24} {'status':<10} {'parent':<24} {'versions':<11} {'gate':<5} reason"]
        for e in out:
            v = e["source_versions"]
            gate = "-" if e["gate"] is None else ("pass" if e["gate"] else "FAIL")
            lines.append(f"{e['id']:<24} {e['status']:<10} {e['parent'] or '-':<24} {f'{v[0]}..{v[1]}':<11} "
                         f"{gate:<5} {e['reason'] or ''}")
        return "\n".join(lines) if out else f"no runs of model {model!r} yet: run `deltarec nightly`"
    if action == "show":
        m = out["metrics"]
        chain = " <- ".join([out["id"]] + [c["id"] for c in out["parent_chain"]])
        inp = out["inputs"]
        lines = [f"run {out['id']}  status {out['status']}  ({out['status_reason'] or ''}; by "
                 f"{out['status_by'] or '-'} at {out['status_at']})",
                 f"  lineage: {chain}",
                 f"  strategy {out['strategy']}; source {out['source']['table']} versions "
                 f"{out['source']['versions'][0]}..{out['source']['versions'][1]}",
                 f"  trained on: {inp['examples_table']}@v{inp['examples_version']}: " + ", ".join(
                     f"{t['id']} ({t['source_versions'][0]}..{t['source_versions'][1]})" for t in inp["trained_on"]),
                 f"  code {out['code_version']}; checkpoint {out['checkpoint']['path']}",
                 f"    sha256 {out['checkpoint']['sha256']}",
                 f"  examples {m.get('examples')}; train loss {(m.get('train') or {}).get('loss')}"]
        gate = m.get("gate") or {}
        if gate.get("candidate"):
            lines.append(f"  gate on {gate.get('n')} rows ({gate.get('scored_on')}):")
            for c in gate["decision"]["checks"]:
                lines.append(f"    {c['metric']:<10} candidate {c['candidate']:.5f}  champion {c['champion']:.5f}  "
                             f"{'ok' if c['passed'] else 'FAIL'}")
        lines.append(f"  decision: {(gate.get('decision') or {}).get('reason', '-')}")
        pre = m.get("prequential") or {}
        for role in ROLES:
            if role_metrics(pre, role):
                lines.append(f"  next-day {role:<10} " + "  ".join(
                    f"{k}@{pre.get('k')} {v:.4f}" for k, v in role_metrics(pre, role).items()))
        cfgd = out["config"]
        lines.append(f"  config: model {cfgd.get('model')}; train lr {cfgd.get('train', {}).get('lr')} "
                     f"seed {cfgd.get('train', {}).get('seed')} backend {cfgd.get('train', {}).get('backend')}"
                     "  (--json for all of it)")
        for e in out["events"]:
            lines.append(f"  event {e['at']} {e['action']}: {e['run_id']} (was {e['previous_champion']}) "
                         f"by {e['by']}: {e['reason']}")
        return "\n".join(lines)
    if action in ("promote", "rollback"):
        recs = out.get("recommendations") or {}
        return (f"{action}: champion of {model!r} is now {out['champion']} (was "
                f"{out['previous_champion']}); by {out['by']}: {out['reason']}\n"
                + (f"recommendations rewritten: {recs['table']} version {recs['version']}" if "version" in recs
                   else f"recommendations NOT rewritten: {recs.get('error') or recs.get('skipped')}"))
    lines = [f"reproduce {out['id']}: {'PASSED' if out['passed'] else 'FAILED'} (tolerance {out['tolerance']:g}; "
             f"identical weights: {out['identical_weights']}; {out['files']} files of "
             f"{out['examples_table']}@v{out['examples_version']}; retrained on {out['backend']} "
             f"x{out['world_size']})"]
    for c in out["comparisons"]:
        lines.append(f"  {c['metric']:<14} recorded {c['recorded']:.6f}  rebuilt {c['rebuilt']:.6f}  "
                     f"{'ok' if c['passed'] else 'DIFFERS'}")
    return "\n".join(lines)

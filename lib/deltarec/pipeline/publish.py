"""Stage 7 of a night: the commit that makes the run exist, and what follows it.

Reads the verified candidate checkpoint and the stages' results. Writes one
MERGE into the run ledger (``lake.runs_table``: the watermark advance and, if
the gate passed, the champion change, in one Delta commit), then the run's
prequential and gate rows (``lake.metrics_table``), the registry's audit
event and, with ``mlflow.enabled``, the MLflow mirror. A failure after the
commit is logged and never undoes it.
"""
from __future__ import annotations

import datetime as dt
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..faults import crash_point
from ..lake.ledger import CANDIDATE, CHAMPION, Ledger, RunRecord

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from .delta_job import PreparedNight
    from .strategy import StrategyChoice
    from .training import Trained

log = logging.getLogger("deltarec.nightly")


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    from .. import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def check_mlflow(cfg: "Config", lake: "LakeEngine") -> None:
    """With ``mlflow.enabled``, fail before the night's work, not after it."""
    if cfg.mlflow.enabled:
        from ..registry.mlflow_sync import client

        client(cfg, lake)


def run_metrics(night: "PreparedNight", trained: "Trained", choice: "StrategyChoice", prequential: dict[str, Any],
                gate: dict[str, Any], inputs: dict[str, Any], train_spec: dict[str, Any],
                stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's ledger ``metrics``: rows consumed / quarantined, examples,
    training, prequential, gate, lineage inputs (what ``registry
    show/reproduce`` time-travels to), the train spec, the delta job's counts
    (``delta_job``: outcomes, example kinds, retractions, state rows updated)
    and ``stages`` (``{stage: {"seconds", "spark_jobs"}}``)."""
    return {
        "rows": {"consumed": night.consumed, "accepted": night.accepted, "quarantined": night.quarantined,
                 "quarantine_reasons": night.reasons},
        "examples": night.examples,
        "train": trained.record(choice.warm.run_id if choice.warm else None),
        "prequential": prequential,
        "gate": gate,
        "inputs": inputs,
        "train_spec": train_spec,
        "delta_job": {k: v for k, v in night.stats.items() if not k.startswith("stage_")},
        "stages": stages,
    }


def publish_run(cfg: "Config", lake: "LakeEngine", ledger: Ledger, *, run_id: str, first: int, last: int,
                started: dt.datetime, choice: "StrategyChoice", trained: "Trained",
                metrics: dict[str, Any]) -> RunRecord:
    """Commit the run (champion if ``metrics["gate"]`` passed, else candidate)
    against the champion the gate compared with (:func:`after_commit` follows)."""
    crash_point("before_ledger_commit")
    gate = metrics["gate"]["decision"]
    ck = trained.checkpoint
    parent = choice.parent
    record = ledger.commit(RunRecord(
        run_id=run_id, model=cfg.model.name, source_table=cfg.lake.events_table, source_first=first,
        source_last=last, checkpoint_path=ck["path"], checkpoint_sha256=ck["sha256"], checkpoint_files=ck["files"],
        config=cfg.to_dict(), code_version=code_version(), metrics=metrics, started_at=started,
        strategy=choice.strategy, parent_run_id=parent.run_id if parent else None,
        status=CHAMPION if gate["passed"] else CANDIDATE, status_reason=gate["reason"], status_by="gate",
    ), expected_champion=choice.serving.run_id if choice.serving else None)
    log.info("run %s committed as %s: watermark %d → %d; %s", run_id, record.status, first - 1, last,
             gate["reason"])
    crash_point("after_ledger_commit")
    return record


def attempt_tables(cfg: "Config") -> tuple[str, ...]:
    """The tables whose rows carry the run id of the attempt that wrote them."""
    return cfg.lake.quarantine_table, cfg.lake.examples_table, cfg.lake.metrics_table


def drop_uncommitted_attempts(cfg: "Config", lake: "LakeEngine", record: RunRecord) -> dict[str, int]:
    """Delete the rows of earlier attempts at this run's range that never
    committed: a night killed after writing, then a new source version, and the
    rerun got another run id (3..8, not 3..7). Only after the commit: then no
    other attempt starting at ``source_first`` can commit any more, so nothing
    a live run still needs is removed. A kill before this runs leaves them for
    ``deltarec status --verify`` to report."""
    prefix = f"{record.model}-{record.source_first:06d}-"
    where = f"run_id >= '{prefix}' AND run_id < '{prefix}~' AND run_id <> '{record.run_id}'"
    dropped = {}
    for table in attempt_tables(cfg):
        try:
            if lake.exists(table) and (n := lake.delete(table, where)):
                dropped[table] = n
        except Exception as e:  # the commit stands; the rows stay for status --verify
            log.error("run %s committed, but removing earlier attempts' rows from %s failed: %s",
                      record.run_id, table, e)
    if dropped:
        log.info("run %s: removed rows of uncommitted attempts at versions %d..: %s", record.run_id,
                 record.source_first, dropped)
    return dropped


def store_run_metrics(cfg: "Config", lake: "LakeEngine", record: RunRecord) -> int:
    """Write the committed run's prequential and gate rows to
    ``lake.metrics_table`` from its ledger metrics. Only after the commit: a
    run that lost the race (same range, same run id) stores nothing, and the
    table always agrees with the ledger. Returns the rows written."""
    from ..evaluation.prequential import metric_rows, store_metrics

    m, n = record.metrics or {}, 0
    pre, gate = m.get("prequential") or {}, m.get("gate") or {}
    phases = []
    if pre:
        phases.append(("prequential", pre, pre.get("runs") or {}))
    if "candidate" in gate:  # scored (not a promotion by default)
        phases.append(("gate", gate, {"candidate": record.run_id, "champion": gate.get("champion_run_id")}))
    for phase, result, run_ids in phases:
        rows = metric_rows(record.run_id, record.model, record.source_first, record.source_last, phase, result,
                           run_ids)
        store_metrics(lake, cfg.lake.metrics_table, record.run_id, phase, rows)
        n += len(rows)
    return n


def repair_metrics(cfg: "Config", lake: "LakeEngine", record: RunRecord) -> int:
    """Store the metrics of ``record`` (the newest committed run) when the
    table has none of them: that night was killed between its commit and
    :func:`store_run_metrics`."""
    m = record.metrics or {}
    if not (m.get("prequential") or "candidate" in (m.get("gate") or {})):
        return 0
    table = cfg.lake.metrics_table
    if lake.exists(table) and lake.read_arrow(table, filters=[("run_id", "=", record.run_id)]).num_rows:
        return 0
    log.warning("run %s was committed but its metrics are not in %s (killed after its commit): writing them now",
                record.run_id, table)
    return store_run_metrics(cfg, lake, record)


def _gate_action(record: RunRecord, previous: str | None) -> str:
    return ("first" if record.parent_run_id is None and previous is None
            else "gate_promote" if record.status == CHAMPION else "gate_reject")


def repair_audit(cfg: "Config", lake: "LakeEngine", ledger: Ledger) -> dict[str, Any] | None:
    """Write the gate's registry event (and metrics rows, :func:`repair_metrics`)
    of the newest committed run when it has none: that night was killed between its ledger commit and its audit event,
    and its rerun has nothing else to do. The champion it replaced is taken to
    be its parent (the champion it was gated against)."""
    from ..registry.core import events, record_event

    latest = ledger.latest(cfg.model.name)
    if latest is not None:
        repair_metrics(cfg, lake, latest)
    if latest is None or any(e["by"] == "gate" and e["run_id"] == latest.run_id
                             for e in events(lake, cfg, latest.run_id)):
        return None
    log.warning("run %s was committed but has no registry event (killed after its commit): writing it now",
                latest.run_id)
    return record_event(lake, cfg, _gate_action(latest, latest.parent_run_id), latest.run_id, latest.parent_run_id,
                        "gate", (latest.status_reason or "") + " (event written by a later night: the run was "
                        "killed after its commit)")


def after_commit(cfg: "Config", lake: "LakeEngine", record: RunRecord, previous: RunRecord | None) -> dict[str, Any]:
    """Audit trail and the MLflow mirror; the commit already happened, so a
    failure here is logged loudly and never undoes it. Returns what MLflow
    recorded (``{}`` when disabled, ``{"error": ...}`` when it failed)."""
    from ..registry.core import record_event

    try:
        store_run_metrics(cfg, lake, record)
    except Exception as e:  # the next night's repair_audit writes them
        log.error("run %s committed, but its metrics were not written to %s: %s", record.run_id,
                  cfg.lake.metrics_table, e)
    drop_uncommitted_attempts(cfg, lake, record)
    try:
        record_event(lake, cfg, _gate_action(record, previous.run_id if previous else None), record.run_id,
                     previous.run_id if previous else None, "gate", record.status_reason or "")
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

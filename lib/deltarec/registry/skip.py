"""`deltarec skip VERSIONS --reason`: consume a bad source range without training.

A skip is a ledger row like a run's (status ``skipped``, strategy ``skip``,
no checkpoint, no examples), committed by the same MERGE, so it advances the
watermark and the next night starts after it. It must start right after the
watermark: a gap or an overlap is refused, naming the expected start.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from typing import TYPE_CHECKING, Any

from ..lake.engine import LakeError
from ..lake.ledger import SKIPPED, Ledger, RunRecord
from .core import current_user

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.registry")


def parse_versions(text: str) -> tuple[int, int]:
    """``"12..14"`` → (12, 14); ``"12"`` → (12, 12)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+))?\s*", text)
    if not m:
        raise LakeError(f"VERSIONS {text!r} is not a version range: write FIRST..LAST (e.g. 12..14) or one version")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if last < first:
        raise LakeError(f"VERSIONS {text!r}: the last version {last} is before the first {first}")
    return first, last


def skip(ledger: Ledger, lake: "LakeEngine", cfg: "Config", versions: str, *, reason: str,
         by: str | None = None) -> dict[str, Any]:
    """Record source versions ``versions`` of the configured model as
    consumed with no training (one ledger commit)."""
    if not reason or not reason.strip():
        raise LakeError("--reason is required: say why these versions are never trained on")
    first, last = parse_versions(versions)
    model, table = cfg.model.name, cfg.lake.events_table
    watermark = ledger.watermark(model)
    if first != watermark + 1:
        raise LakeError(f"cannot skip {first}..{last}: model {model!r} has consumed up to version {watermark}, so a "
                        f"skip must start at version {watermark + 1} (e.g. `deltarec skip {watermark + 1}..{last}`)"
                        if first > watermark else
                        f"cannot skip {first}..{last}: model {model!r} has already consumed up to version "
                        f"{watermark}; the next unconsumed version is {watermark + 1}")
    latest = lake.version(table)
    if latest is None or last > latest:
        raise LakeError(f"cannot skip {first}..{last}: {lake.uri(table)} is at version {latest}; only versions "
                        "that exist can be skipped")
    by = by or current_user()
    now = dt.datetime.now(dt.timezone.utc)
    record = RunRecord(
        run_id=f"{model}-skip-{first:06d}-{last:06d}", model=model, source_table=table, source_first=first,
        source_last=last, checkpoint_path="", checkpoint_sha256="", checkpoint_files={}, config={},
        code_version="", metrics={"skip": {"by": by, "reason": reason}}, started_at=now, strategy="skip",
        status=SKIPPED, status_reason=reason, status_by=by, status_at=now)
    ledger.ensure()
    ledger.commit(record)
    log.info("skip: %s versions %d..%d consumed with no training (watermark %d -> %d), by %s: %s", table, first,
             last, watermark, last, by, reason)
    return {"model": model, "run_id": record.run_id, "source_versions": [first, last], "watermark_before": watermark,
            "watermark": last, "by": by, "reason": reason, "at": now.isoformat()}


def skipped_ranges(ledger: Ledger, model: str) -> list[dict[str, Any]]:
    """Every skip of ``model``, oldest first (what `deltarec status` shows)."""
    return [{"run_id": r.run_id, "source_versions": [r.source_first, r.source_last], "by": r.status_by,
             "reason": r.status_reason, "at": r.status_at.isoformat() if r.status_at else None}
            for r in ledger.runs(model, skipped=True) if r.status == SKIPPED]


def recovery_status(ledger: Ledger, lake: "LakeEngine", cfg: "Config") -> dict[str, Any]:
    """What `deltarec status` adds: skipped version ranges and excluded runs."""
    from .exclusions import excluded_runs

    return {"skipped": skipped_ranges(ledger, cfg.model.name),
            "excluded": [{"run_id": k, **v} for k, v in excluded_runs(lake, cfg).items()]}


def describe_recovery(out: dict[str, Any]) -> list[str]:
    lines = [f"skipped: versions {s['source_versions'][0]}..{s['source_versions'][1]} (no training) by {s['by']} "
             f"at {s['at']}: {s['reason']}" for s in out["skipped"]]
    lines += [f"excluded from training: run {e['run_id']} by {e['by']} at {e['at']}: {e['reason']}"
              for e in out["excluded"]]
    return lines

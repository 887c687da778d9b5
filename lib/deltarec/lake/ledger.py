"""The run ledger: the commit point of every run.

One row per successful run of a model, written by a single MERGE keyed on
(model, source_first). That MERGE is the only thing that advances a model's
watermark, so:
- a crash before it leaves the watermark where it was (checkpoint files
  written by the crashed attempt are orphans nobody reads);
- two runs racing over the same versions cannot both commit: the second MERGE
  either matches the first row (inserts nothing) or loses Delta's conflict
  check, and fails with ConcurrentRunError.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from . import schemas
from .engine import ConcurrentRunError, LakeEngine, LakeError

SUCCEEDED = "succeeded"


@dataclass
class RunRecord:
    run_id: str
    model: str
    source_table: str
    source_first: int
    source_last: int
    checkpoint_path: str
    checkpoint_sha256: str
    checkpoint_files: dict[str, str]
    config: dict[str, Any]
    code_version: str
    metrics: dict[str, Any]
    started_at: dt.datetime
    strategy: str = "incremental"
    parent_run_id: str | None = None
    status: str = SUCCEEDED
    committed_at: dt.datetime | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The shape `deltarec status --json` prints for a run."""
        return {
            "run_id": self.run_id,
            "model": self.model,
            "status": self.status,
            "strategy": self.strategy,
            "source_table": self.source_table,
            "source_versions": [self.source_first, self.source_last],
            "parent": self.parent_run_id,
            "checkpoint": {"path": self.checkpoint_path, "sha256": self.checkpoint_sha256,
                           "files": self.checkpoint_files},
            "metrics": self.metrics,
            "code_version": self.code_version,
            "started_at": _iso(self.started_at),
            "committed_at": _iso(self.committed_at),
        }


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


class Ledger:
    def __init__(self, lake: LakeEngine, table: str = "runs"):
        self.lake = lake
        self.table = table

    def ensure(self) -> None:
        self.lake.create(self.table, schemas.RUNS)

    def runs(self, model: str | None = None) -> list[RunRecord]:
        """Committed runs, oldest first."""
        if not self.lake.exists(self.table):
            return []
        filters = [("model", "=", model)] if model else None
        rows = self.lake.read_arrow(self.table, filters=filters).to_pylist()
        out = [self._from_row(r) for r in rows]
        return sorted(out, key=lambda r: (r.model, r.source_first, r.committed_at or r.started_at))

    def watermark(self, model: str) -> int:
        """Last source version consumed by a successful run of ``model`` (-1: none)."""
        done = [r.source_last for r in self.runs(model) if r.status == SUCCEEDED]
        return max(done) if done else -1

    def latest(self, model: str) -> RunRecord | None:
        done = [r for r in self.runs(model) if r.status == SUCCEEDED]
        return max(done, key=lambda r: r.source_last) if done else None

    def get(self, run_id: str) -> RunRecord:
        for r in self.runs():
            if r.run_id == run_id:
                return r
        raise LakeError(f"no run {run_id!r} in the ledger ({self.lake.uri(self.table)}); see `deltarec status`")

    def commit(self, record: RunRecord) -> RunRecord:
        """Record a finished run; advances the watermark. Refuses a range that
        does not start right after the current watermark."""
        self.ensure()
        w = self.watermark(record.model)
        if record.source_first != w + 1:
            raise ConcurrentRunError(
                f"run {record.run_id} consumed versions {record.source_first}..{record.source_last} but "
                f"model {record.model!r} is already at watermark {w}: another run committed first; "
                "nothing was recorded, rerun to consume what is new"
            )
        record.committed_at = dt.datetime.now(dt.timezone.utc)
        row = self._to_row(record)
        result = self.lake.merge(self.table, row, on=["model", "source_first"], update=False)
        if result["inserted"] != 1:
            raise ConcurrentRunError(
                f"run {record.run_id}: the ledger already holds a run of {record.model!r} starting at "
                f"version {record.source_first}; nothing was recorded"
            )
        return record

    # ------------------------------------------------------------ rows
    @staticmethod
    def _to_row(r: RunRecord) -> pa.Table:
        d = asdict(r)
        d["checkpoint_files"] = json.dumps(r.checkpoint_files, sort_keys=True)
        d["config"] = json.dumps(r.config, sort_keys=True)
        d["metrics"] = json.dumps(r.metrics, sort_keys=True)
        return pa.Table.from_pylist([d], schema=schemas.RUNS)

    @staticmethod
    def _from_row(row: dict[str, Any]) -> RunRecord:
        row = dict(row)
        for k in ("checkpoint_files", "config", "metrics"):
            row[k] = json.loads(row[k]) if row.get(k) else {}
        return RunRecord(**row)

"""The run ledger: the commit point of every run.

One row per successful run of a model, written by a single MERGE keyed on
(model, source_first). That MERGE is the only thing that advances a model's
watermark, so:
- a crash before it leaves the watermark where it was (checkpoint files
  written by the crashed attempt are orphans nobody reads);
- two runs racing over the same versions cannot both commit: the second MERGE
  either matches the first row (inserts nothing) or loses Delta's conflict
  check, and fails with ConcurrentRunError.

Each row also carries a registry status: ``champion`` (exactly one per model:
the model in service and the parent of the next candidate), ``candidate`` (a
committed run the gate did not promote) or ``retired`` (a former champion).
Every status change of the champion pointer is one MERGE into this table, so
readers see either the old champion or the new one, never both or neither.
The watermark counts every committed run, whatever its status.

Paths inside the lake (the checkpoint, the training files and the parent
checkpoint a run records) are stored relative to the lake root and resolved
against the root the ledger is opened with, so a lake that is copied or moved
(another bucket, a restored backup) still finds its own files. Paths outside
the root stay absolute.

Over 300 lines: the ledger's consistency checks (orphan run ids, state ahead
of the ledger: ``deltarec status --verify``) read the runs this module
resolves, and stay beside them.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from .. import jsonout
from . import schemas
from . import uri as lake_uri
from .engine import ConcurrentRunError, LakeEngine, LakeError

CHAMPION, CANDIDATE, RETIRED = "champion", "candidate", "retired"
STATUSES = (CHAMPION, CANDIDATE, RETIRED)
SKIPPED = "skipped"  # `deltarec skip`: versions consumed with no training; counted only by the watermark
SUCCEEDED = "succeeded"  # ledgers written before the registry: read as committed runs


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
    status: str = CANDIDATE
    committed_at: dt.datetime | None = None
    status_reason: str | None = None
    status_by: str | None = None
    status_at: dt.datetime | None = None

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
            "status_reason": self.status_reason,
            "status_by": self.status_by,
            "status_at": _iso(self.status_at),
        }


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


_FIELDS = set(RunRecord.__dataclass_fields__)


class Ledger:
    def __init__(self, lake: LakeEngine, table: str = "runs"):
        self.lake = lake
        self.table = table

    def ensure(self, source: str | None = None) -> None:
        """Create the ledger if absent. With ``source`` (the behaviour table), a
        lake that has neither is refused before anything is created: a
        mistyped ``lake.root`` must not leave an empty ledger behind."""
        if source is not None and not self.lake.exists(self.table) and not self.lake.exists(source):
            raise LakeError(f"no behaviour table at {self.lake.uri(source)} and no run ledger at "
                            f"{self.lake.uri(self.table)}: is lake.root right? Nothing was created there; "
                            "load data first (demo.enabled=true loads the demo data) or point lake.root at your lake")
        if self.lake.exists(self.table):
            missing = set(schemas.RUNS.names) - set(self.lake.read_arrow(self.table).schema.names)
            if missing:  # a MERGE would fail deep inside the engine otherwise
                raise LakeError(f"ledger {self.lake.uri(self.table)} predates columns {sorted(missing)} "
                                "(the registry); start a new lake.root or set lake.runs_table to a new table")
        self.lake.create(self.table, schemas.RUNS)

    def runs(self, model: str | None = None, *, skipped: bool = False) -> list[RunRecord]:
        """Committed runs, oldest first; with ``skipped`` also the skip rows
        (``deltarec skip``: no model, no examples)."""
        if not self.lake.exists(self.table):
            return []
        filters = [("model", "=", model)] if model else None
        rows = self.lake.read_arrow(self.table, filters=filters).to_pylist()
        out = [self._lake_paths(self._from_row(r), self._resolve) for r in rows]
        out = [r for r in out if skipped or r.status != SKIPPED]
        return sorted(out, key=lambda r: (r.model, r.source_first, r.committed_at or r.started_at))

    def watermark(self, model: str) -> int:
        """Last source version consumed by a committed run of ``model`` (-1: none).
        Every committed run counts, champion or not: its versions are consumed."""
        done = [r.source_last for r in self.runs(model, skipped=True)]
        return max(done) if done else -1

    def latest(self, model: str) -> RunRecord | None:
        """The newest committed run, whatever its status."""
        done = self.runs(model)
        return max(done, key=lambda r: r.source_last) if done else None

    def champion(self, model: str) -> RunRecord | None:
        """The model in service. A ledger from before the registry (status
        'succeeded') has no champion row: its newest run serves."""
        runs = self.runs(model)
        champs = [r for r in runs if r.status == CHAMPION]
        if len(champs) > 1:
            raise LakeError(f"ledger {self.lake.uri(self.table)} has {len(champs)} champions of model {model!r} "
                            f"({', '.join(r.run_id for r in champs)}); fix with `deltarec registry promote ID`")
        if champs:
            return champs[0]
        legacy = [r for r in runs if r.status == SUCCEEDED]
        return max(legacy, key=lambda r: r.source_last) if legacy else None

    def previous_champion(self, model: str) -> RunRecord | None:
        """The champion before the current one: the most recently retired run
        that was superseded (not itself rolled back), so repeated rollbacks
        walk back through the champions instead of flip-flopping."""
        retired = [r for r in self.runs(model) if r.status == RETIRED
                   and not (r.status_reason or "").startswith("rolled back")]
        key = lambda r: (r.status_at or r.committed_at or r.started_at, r.source_last)  # noqa: E731
        return max(retired, key=key) if retired else None

    def orphan_run_ids(self, tables: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
        """Per table, the run ids of rows no committed run has (a killed
        attempt's quarantine, examples or metrics; ``deltarec status --verify``).
        Reads only such rows: none, on a healthy lake."""
        committed = sorted({r.run_id for r in self.runs()})
        out = {}
        for table in tables:
            if not self.lake.exists(table):
                continue
            rows = self.lake.read_arrow(table, filters=[("run_id", "!=", r) for r in committed] or None)
            ids = sorted({i for i in rows["run_id"].to_pylist() if i is not None})
            if ids:
                out[table] = ids
        return out

    def state_ahead(self, tables: tuple[str, ...] | list[str]) -> dict[str, dict[str, int]]:
        """Per state table (rows carrying ``source_version``), the rows of
        source versions no committed run consumed: newer than the last
        version any model's ledger recorded (each lineage's ranges are
        contiguous from 0, so that bound is their union). A killed or losing
        attempt's state; ``deltarec status --verify``. ``{"rows", "max_version"}``."""
        last = max((r.source_last for r in self.runs(skipped=True)), default=-1)
        out = {}
        for table in tables:
            if not self.lake.exists(table):
                continue
            rows = self.lake.read_arrow(table, filters=[("source_version", ">", last)])
            if rows.num_rows:
                out[table] = {"rows": rows.num_rows, "max_version": max(rows["source_version"].to_pylist()),
                              "ledger_last": last}
        return out

    def get(self, run_id: str) -> RunRecord:
        for r in self.runs():
            if r.run_id == run_id:
                return r
        raise LakeError(f"no run {run_id!r} in the ledger ({self.lake.uri(self.table)}); see `deltarec registry list`")

    def commit(self, record: RunRecord, *, expected_champion: str | None = None) -> RunRecord:
        """Record a finished run; advances the watermark. Refuses a range that
        does not start right after the current watermark.

        ``record.status`` is champion or candidate. A new champion retires the
        current one in the same MERGE (one Delta commit); ``expected_champion``
        is the champion the gate compared against: if another one serves by
        now (a manual promote during the run), nothing is recorded."""
        if record.status not in (CHAMPION, CANDIDATE, SKIPPED):
            raise LakeError(f"run {record.run_id}: a new run commits as {CHAMPION}, {CANDIDATE} or {SKIPPED}, "
                            f"not {record.status!r}")
        self.ensure()
        w = self.watermark(record.model)
        if record.source_first != w + 1:
            raise ConcurrentRunError(
                f"run {record.run_id} consumed versions {record.source_first}..{record.source_last} but "
                f"model {record.model!r} is already at watermark {w}: another run committed first; "
                "nothing was recorded, rerun to consume what is new"
            )
        now = dt.datetime.now(dt.timezone.utc)
        record.committed_at = now
        record.status_at = record.status_at or now
        current = self.champion(record.model)
        if record.status == CHAMPION and (current.run_id if current else None) != expected_champion:
            raise ConcurrentRunError(
                f"run {record.run_id} was gated against champion {expected_champion!r} but "
                f"{current.run_id if current else None!r} serves now; nothing was recorded, rerun the night")
        rows = [record]
        if record.status == CHAMPION and current is not None:
            rows.append(self._restatus(current, RETIRED, f"superseded by {record.run_id}",
                                       record.status_by, now))
        result = self.lake.merge(self.table, self._stored(rows), on=["model", "source_first"],
                                 update=len(rows) > 1)
        if result["inserted"] != 1 or result["updated"] != len(rows) - 1:
            raise ConcurrentRunError(
                f"run {record.run_id}: the ledger already holds a run of {record.model!r} starting at "
                f"version {record.source_first} (MERGE inserted {result['inserted']}, updated "
                f"{result['updated']}); see `deltarec registry list`"
            )
        return record

    def set_champion(self, model: str, run_id: str, *, by: str, reason: str,
                     rollback: bool = False) -> tuple[RunRecord, RunRecord | None]:
        """Make ``run_id`` the champion and retire the current one: one MERGE
        (one Delta commit) updating both rows. Returns (new, old)."""
        new = self.get(run_id)
        if new.model != model:
            raise LakeError(f"run {run_id!r} belongs to model {new.model!r}, not {model!r}")
        old = self.champion(model)
        if old is not None and old.run_id == run_id:
            raise LakeError(f"run {run_id!r} already is the champion of model {model!r}; nothing to do")
        now = dt.datetime.now(dt.timezone.utc)
        verb = "rolled back" if rollback else "superseded"
        rows = [self._restatus(new, CHAMPION, reason, by, now)]
        if old is not None:
            rows.append(self._restatus(old, RETIRED, f"{verb} by {by}: {reason}", by, now))
        result = self.lake.merge(self.table, self._stored(rows), on=["model", "source_first"], update=True)
        if result["inserted"] or result["updated"] != len(rows):
            raise ConcurrentRunError(f"changing the champion of {model!r} to {run_id!r}: MERGE inserted "
                                     f"{result['inserted']} and updated {result['updated']} rows, expected "
                                     f"0 and {len(rows)}; the ledger changed underneath, check `deltarec registry list`")
        return rows[0], rows[1] if old is not None else None

    def set_checkpoints(self, records: list[RunRecord]) -> None:
        """Record rewritten checkpoints of committed runs (a forget resets a
        user's rows): new path, sha256 and files, everything else unchanged;
        one MERGE (one Delta commit) for all of them."""
        if not records:
            return
        result = self.lake.merge(self.table, self.to_rows(records), on=["model", "source_first"], update=True)
        if result["inserted"] or result["updated"] != len(records):
            raise ConcurrentRunError(f"recording {len(records)} rewritten checkpoints: MERGE inserted "
                                     f"{result['inserted']} and updated {result['updated']} rows; the ledger "
                                     "changed underneath, run again")

    @staticmethod
    def _restatus(r: RunRecord, status: str, reason: str | None, by: str | None, at: dt.datetime) -> RunRecord:
        from dataclasses import replace

        return replace(r, status=status, status_reason=reason, status_by=by, status_at=at)

    # ------------------------------------------------------------ lake paths
    def _relative(self, path: str) -> str:
        return lake_uri.relative_to(self.lake.root, path) or path if path else path

    def _resolve(self, path: str) -> str:
        return lake_uri.resolve(self.lake.root, path) if path else path

    @staticmethod
    def _lake_paths(r: RunRecord, convert) -> RunRecord:
        """``r`` with ``convert`` applied to every lake path it records."""
        from dataclasses import replace

        metrics = dict(r.metrics)
        inputs, spec = metrics.get("inputs"), metrics.get("train_spec")
        if isinstance(inputs, dict) and isinstance(inputs.get("files"), list):
            metrics["inputs"] = {**inputs, "files": [convert(f) for f in inputs["files"]]}
        if isinstance(spec, dict) and spec.get("parent_path"):
            metrics["train_spec"] = {**spec, "parent_path": convert(spec["parent_path"])}
        return replace(r, checkpoint_path=convert(r.checkpoint_path), metrics=metrics)

    def _stored(self, records: list[RunRecord]) -> pa.Table:
        return self.to_rows([self._lake_paths(r, self._relative) for r in records])

    # ------------------------------------------------------------ rows
    @staticmethod
    def to_rows(records: list[RunRecord]) -> pa.Table:
        """``records`` as rows of the runs table (what ``commit`` MERGEs)."""
        rows = []
        for r in records:
            d = asdict(r)
            d["checkpoint_files"] = json.dumps(r.checkpoint_files, sort_keys=True)
            d["config"] = json.dumps(r.config, sort_keys=True)
            d["metrics"] = jsonout.dumps(r.metrics, sort_keys=True, default=str)  # NaN: null
            rows.append(d)
        return pa.Table.from_pylist(rows, schema=schemas.RUNS)

    @staticmethod
    def _from_row(row: dict[str, Any]) -> RunRecord:
        row = {k: v for k, v in row.items() if k in _FIELDS}
        for k in ("checkpoint_files", "config", "metrics"):
            row[k] = json.loads(row[k]) if row.get(k) else {}
        return RunRecord(**row)

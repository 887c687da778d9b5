"""The forget pass: pending requests → one batch → erased everywhere → VACUUMed.

1. **Open** (one MERGE into ``forget_log``): the pending requests become batch
   N (status ``erasing``; bad ids ``refused`` with the reason). A batch left
   ``erasing`` by a crash is resumed with exactly its requests.
2. **Model**: every retained checkpoint is rewritten without the users' rows
   (``privacy/checkpoints.py``), before the tables, which still say which
   rows were theirs.
3. **Tables**: one commit per table keyed by user (the source table when
   ``privacy.erase_source``, event index, user state, training examples,
   quarantine, recommendations, ``privacy.extra_tables``): a MERGE-delete on
   the stored keys that records the Delta app transaction
   (``deltarec-forget``, N) and the rows per user, so the rerun skips
   committed tables and still reports their counts.
4. **Erased** (one MERGE into ``forget_log``): times, rows per table,
   checkpoints, model actions; runs whose training files were rewritten are
   marked not reproducible in the registry.
Between 4 and 5 every pass **sweeps** the erased batches (``privacy/sweep.py``):
   a night that raced the erase gets its rows and checkpoint erased too.
5. **VACUUM** (``privacy/vacuum.py``), ``privacy.retention_hours`` after step 4 (and once every
   model has consumed the source table's erase): the batch's queue rows are
   deleted, every table above VACUUMed (change-data files too) and its log
   expired, orphan checkpoint directories removed; ``forget_log`` says
   ``vacuumed`` with the files deleted.

Every step is idempotent; ``crash_point`` names (``DELTAREC_CRASH_AT``):
forget_after_open, forget_after_checkpoints, forget_after_ledger,
forget_after_<table>, forget_before_log, forget_after_queue_delete,
forget_after_vacuum.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from . import requests as rq
from .keys import KeyMap, check_user_id

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.privacy")
APP_ID = "deltarec-forget"  # Delta app transaction id of the erase commits (version = batch)
QUEUE_APP_ID = "deltarec-forget-queue"


@dataclass
class Batch:
    number: int
    rows: list[dict[str, Any]]  # forget_log rows
    queue: list[dict[str, Any]]  # their forget_requests rows (raw ids)
    key_of: dict[str, str] = field(default_factory=dict)  # request id -> stored key


def user_tables(cfg: "Config", lake: "LakeEngine") -> list[tuple[str, str, bool]]:
    """(table, user column, holds raw ids) of every table keyed by user that exists."""
    L = cfg.lake
    out = []
    if cfg.privacy.erase_source:
        col = cfg.source.columns.user_id if cfg.source.columns is not None else "user_id"
        out.append((L.events_table, col, True))
    recommend = getattr(getattr(cfg, "recommend", None), "table", "recommendations")
    for t in (L.event_index_table, L.user_state_table, L.examples_table, L.quarantine_table, recommend,
              *cfg.privacy.extra_tables):
        out.append((t, "user_id", False))
    return [(t, c, raw) for t, c, raw in dict.fromkeys(out) if lake.exists(t)]


def apply_pending(cfg: "Config", lake: "LakeEngine") -> dict[str, Any]:
    """Finish or open a batch and erase it, then VACUUM the batches that are
    due. Returns what was done (no raw ids)."""
    from .sweep import sweep
    from .vacuum import vacuum_due

    keys = KeyMap(cfg, lake)
    out: dict[str, Any] = {}
    batch = open_batch(cfg, lake, keys)
    if batch is not None:
        out["erased"] = erase(cfg, lake, keys, batch)
    out["swept"] = sweep(cfg, lake, keys)
    out["vacuumed"] = vacuum_due(cfg, lake)
    return out


def open_batch(cfg: "Config", lake: "LakeEngine", keys: KeyMap) -> Batch | None:
    from ..faults import crash_point

    logged = rq.log_rows(cfg, lake)
    queue = {r["request_id"]: r for r in rq.queue(cfg, lake, keys)}
    erasing = [r for r in logged if r["status"] == rq.ERASING]
    if erasing:
        n = erasing[0]["batch"]
        rows = [r for r in logged if r["batch"] == n and r["status"] == rq.ERASING]
        log.info("forget: resuming batch %d (%d requests)", n, len(rows))
    else:
        seen = {r["request_id"] for r in logged}
        pending = [r for r in queue.values() if r["request_id"] not in seen]
        if not pending:
            return None
        n = max((r["batch"] for r in logged), default=0) + 1
        at = rq.now()
        rows = []
        for q in sorted(pending, key=lambda r: (r["requested_at"], r["request_id"])):
            why = check_user_id(q.get("user_id"), cfg)
            uid = q.get("user_id")
            rows.append({"request_id": q["request_id"], "batch": n, "status": rq.REFUSED if why else rq.ERASING,
                         "detail": f"refused: {why}; not erased (file it again with the right id)" if why else None,
                         "user_hash": keys.log_hash(keys.key(uid)) if isinstance(uid, str) and uid else None,
                         "requested_at": q["requested_at"], "requested_by": q.get("requested_by"),
                         "reason": q.get("reason"), "opened_at": at, "erased_at": at if why else None,
                         "unlearning": cfg.privacy.unlearning})
        rq.write_log(cfg, lake, rows)
        log.info("forget: batch %d opened with %d requests (%d refused)", n, len(rows),
                 sum(r["status"] == rq.REFUSED for r in rows))
        crash_point("forget_after_open")
        rows = [r for r in rows if r["status"] == rq.ERASING]
        if not rows:
            return None
    b = Batch(n, rows, [queue[r["request_id"]] for r in rows if r["request_id"] in queue])
    b.key_of = {q["request_id"]: keys.key(q["user_id"]) for q in b.queue}
    missing = [r["request_id"] for r in rows if r["request_id"] not in queue]
    if missing:  # the queue row went (someone deleted it): the hash alone cannot find the user's rows
        log.error("forget batch %d: requests %s are no longer in %s; they cannot be carried out and are "
                  "marked refused", n, missing, cfg.privacy.requests_table)
        rq.write_log(cfg, lake, [{**r, "status": rq.REFUSED, "erased_at": rq.now(),
                                  "detail": "refused: the request's row left the queue before it was carried out"}
                                 for r in rows if r["request_id"] in missing])
        b.rows = [r for r in rows if r["request_id"] not in missing]
    return b


def erase(cfg: "Config", lake: "LakeEngine", keys: KeyMap, b: Batch) -> dict[str, Any]:
    from ..faults import crash_point
    from .checkpoints import forget_in_checkpoints, mark_not_reproducible, scrub_replay

    stored = sorted(set(b.key_of.values()))
    hashes = {k: keys.log_hash(k) for k in stored}
    raw = sorted({q["user_id"] for q in b.queue})
    raw_hash = {q["user_id"]: hashes[b.key_of[q["request_id"]]] for q in b.queue}
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def took(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    checkpoints, per_key, follow = forget_in_checkpoints(cfg, lake, b.number, stored, hashes)
    took("checkpoints")
    scrub_replay(cfg, lake, stored)
    removed: dict[str, dict[str, int]] = {}  # table -> {user hash: rows}
    files: dict[str, int] = {}
    for table, column, holds_raw in user_tables(cfg, lake):
        ids, by_hash = (raw, raw_hash) if holds_raw else (stored, hashes)
        if holds_raw:  # the source's log is expired only up to what every model consumed: set its retention now
            lake.set_log_retention(table, cfg.privacy.retention_hours)
        removed[table], files[table] = erase_table(lake, table, column, ids, by_hash, b.number)
        took(table)
        crash_point(f"forget_after_{table}")
    if cfg.mlflow.enabled and follow:  # after the tables: a logged model may carry state read from them
        from .mlflow_follow import follow as follow_in_mlflow

        follow_in_mlflow(cfg, lake, follow)
        took("mlflow")
    marked = mark_not_reproducible(cfg, lake, b.number, "were rewritten by the erasure")
    crash_point("forget_before_log")
    at = rq.now()
    rows = []
    for r in b.rows:
        key = b.key_of[r["request_id"]]
        h = hashes[key]
        counts = {t: int(m.get(h, 0)) for t, m in removed.items()}
        unknown = not any(counts.values()) and not any(
            not a["action"].startswith("absent") for a in per_key.get(key, []))
        rows.append({**r, "status": rq.ERASED, "erased_at": at, "rows_removed": json.dumps(counts, sort_keys=True),
                     "checkpoints": json.dumps(checkpoints, sort_keys=True),
                     "model": json.dumps(per_key.get(key, [])),
                     "detail": "unknown user: nothing held about this id" if unknown else r.get("detail")})
    rq.write_log(cfg, lake, rows)
    log.info("forget batch %d erased: %d requests; rows per table %s; checkpoints %s; not reproducible now: %s",
             b.number, len(rows), {t: sum(m.values()) for t, m in removed.items()}, checkpoints, marked)
    took("log")
    return {"batch": b.number, "requests": len(rows), "rows_removed": {t: sum(m.values()) for t, m in removed.items()},
            "files_rewritten": files, "checkpoints": checkpoints, "not_reproducible": marked, "seconds": seconds}


def erase_table(lake: "LakeEngine", table: str, column: str, ids: list[str], by_hash: dict[str, str],
                batch: int, app_id: str = APP_ID) -> tuple[dict[str, int], int]:
    """One commit: the rows of ``ids`` leave ``table``. Returns ({user hash: rows}, files rewritten).
    With ``app_id=APP_ID`` a table that already has the batch's commit is skipped (its counts read back)."""
    if app_id == APP_ID and (lake.app_version(table, APP_ID) or 0) >= batch:  # committed before a crash
        for _, meta in reversed(lake.commit_metadata(table)):
            if meta.get("forget_batch") == batch:
                return {h: int(n) for h, n in meta.get("rows_by_user", {}).items()}, int(meta.get("files", -1))
        return {}, -1
    keys = pa.table({column: pa.array(ids, pa.string())})
    hits = lake.lookup(table, keys, [column])
    counts: dict[str, int] = {}
    for v in pc.value_counts(hits[column]).to_pylist() if hits.num_rows else []:
        h = by_hash[v["values"]]
        counts[h] = counts.get(h, 0) + int(v["counts"])
    if not counts:
        return {}, 0
    res = lake.delete_keys(table, keys, txn=(app_id, batch),
                           commit_metadata={"forget_batch": batch, "rows_by_user": counts})
    if res["rows"] != sum(counts.values()):
        log.warning("forget batch %d: %s had %d rows of the users when counted and %d when deleted (a concurrent "
                    "write); the log records the counts", batch, table, sum(counts.values()), res["rows"])
    return counts, res["files_removed"]

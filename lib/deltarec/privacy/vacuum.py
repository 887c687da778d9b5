"""Step 5 of the forget pass (``privacy/erase.py``): VACUUM, ``privacy.retention_hours``
after a batch's erasure and once every model has consumed the source table's
erase: the batch's queue rows are deleted, every table keyed by user
VACUUMed (change-data files too) and its log expired, orphan checkpoint
directories removed, and ``forget_log`` says ``vacuumed`` with the files
deleted. VACUUM is idempotent: a crash is finished by the rerun."""
from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import requests as rq
from .erase import QUEUE_APP_ID, user_tables
from .keys import KeyMap

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.privacy")


def vacuum_due(cfg: "Config", lake: "LakeEngine") -> dict[str, Any]:
    """VACUUM the batches erased at least ``privacy.retention_hours`` ago whose
    source-table erase every model has consumed."""
    from ..lake.ledger import Ledger
    from ..faults import crash_point
    from .checkpoints import mark_not_reproducible, orphan_dirs, remove_dir

    P = cfg.privacy
    t = rq.now()
    logged = rq.log_rows(cfg, lake)
    due_rows = [r for r in logged if r["status"] in (rq.ERASED, rq.REFUSED) and r["vacuumed_at"] is None
                and r["erased_at"] is not None and r["erased_at"] + dt.timedelta(hours=P.retention_hours) <= t]
    if not due_rows:
        return {}
    batches = sorted({r["batch"] for r in due_rows})
    source = cfg.lake.events_table
    consumed = None  # the source version every model has consumed (its log may expire up to there)
    if P.erase_source and lake.exists(source):
        erased_at = {v: m.get("forget_batch") for v, m in lake.commit_metadata(source) if "forget_batch" in m}
        need = max((v for v, n in erased_at.items() if n in batches), default=-1)
        ledger = Ledger(lake, cfg.lake.runs_table)
        models = {r.model for r in ledger.runs()}
        behind = [m for m in models if ledger.watermark(m) < need]
        consumed = min((ledger.watermark(m) for m in models), default=None)
        if behind:
            log.info("forget: VACUUM of batches %s waits until model(s) %s consume %s version %d (their erase)",
                     batches, behind, source, need)
            return {"waiting_for": behind}
    keys = KeyMap(cfg, lake)
    queue = [q for q in rq.queue(cfg, lake, keys) if q["request_id"] in {r["request_id"] for r in due_rows}]
    qt = P.requests_table
    if queue:
        dated = pa.Table.from_pylist([{"user_id": q["user_id"], "requested_at": q["requested_at"]} for q in queue
                                      if q.get("user_id") is not None],
                                     schema=pa.schema([rq.FORGET_REQUESTS.field("user_id"),
                                                       rq.FORGET_REQUESTS.field("requested_at")]))
        if dated.num_rows:
            lake.delete_keys(qt, dated, txn=(QUEUE_APP_ID, batches[-1]))
    crash_point("forget_after_queue_delete")
    vacuumed = 0
    tables = [t for t, _, _ in user_tables(cfg, lake)]
    for table in tables:
        vacuumed += len(lake.vacuum(table, P.retention_hours, enforce_retention=P.enforce_retention, full=True))
        if table == source:  # not past what a night still has to read from its change feed
            if consumed is not None and consumed >= 0:
                lake.expire_log(table, consumed)
        else:
            lake.set_log_retention(table, P.retention_hours)
            lake.expire_log(table)
    if lake.exists(qt):  # the queue keeps raw ids: its removed rows go now (LITE: appenders' new files are safe)
        vacuumed += len(lake.vacuum(qt, 0, enforce_retention=False, full=False))
        lake.set_log_retention(qt, 0)
        lake.expire_log(qt)
    for d in orphan_dirs(cfg, lake, P.retention_hours):
        remove_dir(d)
        vacuumed += 1
    mark_not_reproducible(cfg, lake, batches[-1], "were VACUUMed")
    crash_point("forget_after_vacuum")
    rows = [{**r, "status": rq.VACUUMED if r["status"] == rq.ERASED else r["status"], "vacuumed_at": rq.now(),
             "files_vacuumed": vacuumed} for r in due_rows]
    rq.write_log(cfg, lake, rows)
    log.info("forget: batches %s VACUUMed: %d files deleted from %s and the checkpoint area", batches, vacuumed,
             ", ".join(tables + [qt]))
    return {"batches": batches, "files_vacuumed": vacuumed, "tables": tables + [qt]}

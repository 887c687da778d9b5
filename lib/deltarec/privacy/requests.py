"""Forget requests in, proof out: the ``forget_requests`` queue and the
``forget_log`` table, and what ``deltarec forget --status`` shows.

``forget_requests`` (user_id, requested_at, requested_by, reason, request_id)
is a plain Delta table: ``deltarec forget`` appends to it and so may any
upstream system (a null ``request_id`` gets one derived from a salted hash).
A request is *pending* until a forget pass takes it into a batch; its row
stays in the queue (with the raw id) only until that batch is VACUUMed, when
the user's rows leave the disk everywhere else too.

``forget_log`` has one row per request taken into a batch, never the id:
the log hash (``keys.KeyMap.log_hash``), the batch, status (``erasing`` →
``erased`` → ``vacuumed``, or ``refused`` with the reason), requested /
erased / vacuumed times, rows removed per table, checkpoints rewritten,
what happened to the user's model rows, files vacuumed.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .keys import KeyMap, PrivacyError, check_user_id

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

TS = pa.timestamp("us", tz="UTC")
ERASING, ERASED, VACUUMED, REFUSED = "erasing", "erased", "vacuumed", "refused"

FORGET_REQUESTS = pa.schema([
    pa.field("request_id", pa.string()),
    pa.field("user_id", pa.string()),  # the raw id, as upstream knows it
    pa.field("requested_at", TS),
    pa.field("requested_by", pa.string()),
    pa.field("reason", pa.string()),
])

FORGET_LOG = pa.schema([
    pa.field("request_id", pa.string()),
    pa.field("batch", pa.int64()),
    pa.field("user_hash", pa.string()),  # HMAC(salt, stored key): recognises the user, reveals nothing
    pa.field("status", pa.string()),
    pa.field("detail", pa.string()),  # why refused; otherwise notes (e.g. "unknown user: nothing held")
    pa.field("requested_at", TS),
    pa.field("requested_by", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("opened_at", TS),  # the cut-off: changes of this user up to here are erased, later ones are new
    pa.field("erased_at", TS),
    pa.field("vacuumed_at", TS),
    pa.field("rows_removed", pa.string()),  # JSON {table: rows of this user}
    pa.field("checkpoints", pa.string()),  # JSON {run_id: rewritten | deleted} of the batch
    pa.field("model", pa.string()),  # JSON [{run_id, action}] for this user's rows
    pa.field("files_vacuumed", pa.int64()),  # files the batch's VACUUM deleted (all tables)
    pa.field("unlearning", pa.string()),  # rows | retrain
])


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def file_requests(cfg: "Config", lake: "LakeEngine", user_ids: list[str], *, by: str,
                  reason: str | None = None) -> list[dict[str, Any]]:
    """Append forget requests for raw ``user_ids`` (one commit). Refuses the
    whole call, naming the first bad id, if any id is empty or malformed."""
    if not user_ids:
        raise PrivacyError("name at least one user id: deltarec forget USER_ID... [--reason TEXT]")
    for u in user_ids:
        why = check_user_id(u, cfg)
        if why:
            raise PrivacyError(f"refused: {why} ({u!r}); a forget request needs the user's id as the source "
                               "table has it. Nothing was recorded")
    at = now()
    rows = [{"request_id": uuid.uuid4().hex, "user_id": u, "requested_at": at, "requested_by": by,
             "reason": reason} for u in dict.fromkeys(user_ids)]
    table = cfg.privacy.requests_table
    lake.create(table, FORGET_REQUESTS)
    lake.write(table, pa.Table.from_pylist(rows, schema=FORGET_REQUESTS), mode="append", schema=FORGET_REQUESTS)
    return [{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.items() if k != "user_id"}
            for r in rows]


def queue(cfg: "Config", lake: "LakeEngine", keys: KeyMap) -> list[dict[str, Any]]:
    """Every row of the queue, with a request id (derived when upstream left it null)."""
    table = cfg.privacy.requests_table
    if not lake.exists(table):
        return []
    rows = lake.read_arrow(table).to_pylist()
    for r in rows:
        if not r.get("request_id"):
            stamp = r["requested_at"].isoformat() if r.get("requested_at") else ""
            r["request_id"] = "u-" + keys.log_hash(f"{r.get('user_id')}|{stamp}")[:24]
        if r.get("requested_at") is None:
            r["requested_at"] = now()
    return rows


def log_rows(cfg: "Config", lake: "LakeEngine") -> list[dict[str, Any]]:
    table = cfg.privacy.log_table
    return lake.read_arrow(table).to_pylist() if lake.exists(table) else []


def write_log(cfg: "Config", lake: "LakeEngine", rows: list[dict[str, Any]]) -> None:
    """Insert or update forget_log rows by request id (one MERGE)."""
    if not rows:
        return
    table = cfg.privacy.log_table
    lake.create(table, FORGET_LOG)
    full = [{f: r.get(f) for f in FORGET_LOG.names} for r in rows]
    lake.merge(table, pa.Table.from_pylist(full, schema=FORGET_LOG), ["request_id"], update=True)


def status(cfg: "Config", lake: "LakeEngine") -> dict[str, Any]:
    """Pending and done requests; ``overdue``: pending (or erasing) longer than
    ``privacy.deadline_days``. No raw ids: requests by id, users by log hash."""
    keys = KeyMap(cfg, lake)
    logged = {r["request_id"]: r for r in log_rows(cfg, lake)}
    t = now()
    deadline = dt.timedelta(days=cfg.privacy.deadline_days)
    pending, done = [], []
    for r in queue(cfg, lake, keys):
        if r["request_id"] in logged:
            continue
        age = t - r["requested_at"]
        pending.append({"request_id": r["request_id"], "status": "pending",
                        "requested_at": r["requested_at"].isoformat(), "requested_by": r.get("requested_by"),
                        "age_days": round(age.total_seconds() / 86400, 2), "overdue": age > deadline})
    for r in sorted(logged.values(), key=lambda r: (r["batch"], r["request_id"])):
        finished = r["status"] in (ERASED, VACUUMED, REFUSED)
        age = (r["erased_at"] if finished and r["erased_at"] else t) - r["requested_at"]
        entry = {"request_id": r["request_id"], "status": r["status"], "batch": r["batch"],
                 "user_hash": r["user_hash"], "requested_at": r["requested_at"].isoformat(),
                 "requested_by": r["requested_by"], "reason": r["reason"], "detail": r["detail"],
                 "erased_at": r["erased_at"].isoformat() if r["erased_at"] else None,
                 "vacuumed_at": r["vacuumed_at"].isoformat() if r["vacuumed_at"] else None,
                 "rows_removed": json.loads(r["rows_removed"] or "{}"),
                 "checkpoints": json.loads(r["checkpoints"] or "{}"), "model": json.loads(r["model"] or "[]"),
                 "files_vacuumed": r["files_vacuumed"], "unlearning": r["unlearning"],
                 "age_days": round(age.total_seconds() / 86400, 2), "overdue": age > deadline}
        (done if finished else pending).append(entry)
    return {"pending": pending, "done": done, "deadline_days": cfg.privacy.deadline_days,
            "overdue": [e["request_id"] for e in pending + done if e["overdue"]]}


def describe_status(st: dict[str, Any]) -> str:
    lines = [f"forget requests: {len(st['pending'])} pending, {len(st['done'])} done "
             f"(deadline {st['deadline_days']} days)"]
    for e in st["pending"]:
        lines.append(f"  {e['request_id']:<34} {e['status']:<9} requested {e['requested_at']} by "
                     f"{e['requested_by']}  {e['age_days']:.1f} days{'  OVERDUE' if e['overdue'] else ''}")
    for e in st["done"]:
        rows = sum(e["rows_removed"].values())
        lines.append(f"  {e['request_id']:<34} {e['status']:<9} user {e['user_hash'][:12]}…  erased "
                     f"{e['erased_at'] or '-'}  rows {rows}  files vacuumed {e['files_vacuumed'] or 0}"
                     f"{'  OVERDUE' if e['overdue'] else ''}{'  (' + e['detail'] + ')' if e['detail'] else ''}")
    return "\n".join(lines)

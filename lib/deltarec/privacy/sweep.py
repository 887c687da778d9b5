"""A night racing a forget: what it wrote after the erasure is erased too.

A night that read its change feed before a batch opened can commit after the
batch's erase: its rows of the users (tonight's examples, state, index) and a
checkpoint warm-started from the champion before its rewrite. Delta's
conflict check stops only the commits that touch the same files, so every
forget pass sweeps the batches that are erased but not yet VACUUMed (their
requests, with the raw ids, are still in the queue): each table keyed by user
is looked up again and any rows found are deleted (app transaction
``deltarec-forget-sweep``), and every checkpoint that does not carry the
batch is rewritten (``privacy/checkpoints.py``). What a sweep finds is added
to the requests' ``forget_log`` rows. Nights that start after a batch opened
never write the users: the change-feed read drops them (``privacy/intake.py``).
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from . import requests as rq
from .erase import erase_table, user_tables

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from .keys import KeyMap

log = logging.getLogger("deltarec.privacy")
SWEEP_APP_ID = "deltarec-forget-sweep"


def sweep(cfg: "Config", lake: "LakeEngine", keys: "KeyMap") -> dict[str, Any]:
    from ..lake.ledger import Ledger
    from .checkpoints import forget_in_checkpoints

    erased = [r for r in rq.log_rows(cfg, lake) if r["status"] == rq.ERASED and r["vacuumed_at"] is None]
    if not erased:
        return {}
    queue = {q["request_id"]: q for q in rq.queue(cfg, lake, keys)}
    ledger = Ledger(lake, cfg.lake.runs_table)
    out: dict[str, Any] = {}
    for n in sorted({r["batch"] for r in erased}):
        rows = [r for r in erased if r["batch"] == n and r["request_id"] in queue]
        key_of = {r["request_id"]: keys.key(queue[r["request_id"]]["user_id"]) for r in rows}
        stored = sorted(set(key_of.values()))
        hashes = {k: keys.log_hash(k) for k in stored}
        raw = sorted({queue[r["request_id"]]["user_id"] for r in rows})
        raw_hash = {queue[r["request_id"]]["user_id"]: hashes[key_of[r["request_id"]]] for r in rows}
        before = {r.run_id: r.checkpoint_sha256 for r in ledger.runs()}
        _, per_key, follow = forget_in_checkpoints(cfg, lake, n, stored, hashes)
        now = {r.run_id: r.checkpoint_sha256 for r in ledger.runs()}
        rewritten = sorted(k for k, sha in now.items() if sha and before.get(k) != sha)
        found: dict[str, dict[str, int]] = {}
        for table, column, holds_raw in user_tables(cfg, lake):
            ids, by_hash = (raw, raw_hash) if holds_raw else (stored, hashes)
            counts, _ = erase_table(lake, table, column, ids, by_hash, n, app_id=SWEEP_APP_ID)
            if counts:
                found[table] = counts
        if not found and not rewritten:
            continue
        if cfg.mlflow.enabled and rewritten:
            from .mlflow_follow import follow as follow_in_mlflow

            follow_in_mlflow(cfg, lake, [r for r in follow if r.run_id in rewritten])
        log.warning("forget batch %d: a night that raced the erasure wrote %s rows and %d checkpoint(s) of its "
                    "users afterwards; erased those too", n, {t: sum(c.values()) for t, c in found.items()},
                    len(rewritten))
        update = []
        for r in rows:
            key = key_of[r["request_id"]]
            counts = json.loads(r["rows_removed"] or "{}")
            for t, c in found.items():
                counts[t] = counts.get(t, 0) + c.get(hashes[key], 0)
            cks = {**json.loads(r["checkpoints"] or "{}"), **{k: "rewritten" for k in rewritten}}
            actions = json.loads(r["model"] or "[]") + [a for a in per_key.get(key, []) if a["run_id"] in rewritten]
            note = (f"swept after a racing night: {sum(c.get(hashes[key], 0) for c in found.values())} rows, "
                    f"checkpoints {rewritten}")
            update.append({**r, "rows_removed": json.dumps(counts, sort_keys=True),
                           "checkpoints": json.dumps(cks, sort_keys=True), "model": json.dumps(actions),
                           "detail": "; ".join(x for x in (r.get("detail"), note) if x)})
        rq.write_log(cfg, lake, update)
        out[n] = {"rows": {t: sum(c.values()) for t, c in found.items()}, "checkpoints": rewritten}
    return out

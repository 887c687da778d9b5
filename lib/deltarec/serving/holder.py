"""Follow the champion: poll the ledger and the recommendations table, load a
new champion's snapshot completely off the request path, swap it in one step.

The swap is one attribute assignment (``self.current = snapshot``): a request
reads ``holder.current`` once and uses that snapshot to the end, so it sees
the old champion's model and table or the new one's, never a mix and never a
half-loaded one. A snapshot is loaded only when the newest refresh of the
table names the ledger's champion (run id and checkpoint sha256): until the
refresh for a newly promoted champion commits, the old one keeps serving and
``/health`` says what it waits for. A failed load (bad checksum, missing
files, unreadable table) keeps the old snapshot, is logged, and is shown in
``/health``; it is retried when the ledger or the table moves, or after
``retry_seconds``.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .snapshot import Snapshot, load_snapshot

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.serve")


class ModelHolder:
    def __init__(self, cfg: "Config", lake: "LakeEngine | None" = None, retry_seconds: float = 60.0):
        if lake is None:  # tables are plain Delta: read them with delta-rs whatever engine wrote them
            from ..lake.delta_rs import DeltaRsEngine

            lake = DeltaRsEngine(cfg.lake.root)
        self.cfg, self.lake, self.retry_seconds = cfg, lake, retry_seconds
        self.current: Snapshot | None = None
        self.error: str | None = None  # the last failed load or poll, while it is unresolved
        self.pending: str | None = None  # what a newer champion still waits for
        self.ledger_champion: str | None = None
        self.last_poll_at: dt.datetime | None = None
        self.swaps = 0
        self._seen: tuple | None = None  # (runs version, table version) last examined
        self._failed_at: dict[tuple, float] = {}  # (run id, sha256, table version) → when its load failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ polling
    def poll_once(self) -> bool:
        """Examine the ledger and the table once; True when a new snapshot was swapped in."""
        from ..lake.ledger import Ledger
        from .table import current_rows

        L, table = self.cfg.lake, self.cfg.recommend.table
        self.last_poll_at = dt.datetime.now(dt.timezone.utc)
        seen = (self.lake.version(L.runs_table), self.lake.version(table))
        if seen == self._seen and not self._retry_due():
            return False
        self._seen = seen
        champ = Ledger(self.lake, L.runs_table).champion(self.cfg.model.name) if seen[0] is not None else None
        self.ledger_champion = champ.run_id if champ else None
        if champ is None:
            self.pending = f"no champion of model {self.cfg.model.name!r} in {self.lake.uri(L.runs_table)} yet"
            return False
        cur = self.current
        found = current_rows(self.lake, table)  # (newest version, its refresh's metadata, refresh version)
        if found and cur and (cur.run_id, cur.checkpoint_sha256, cur.table_version) == (
                champ.run_id, champ.checkpoint_sha256, found[0]):
            self.pending = self.error = None  # whatever failed before is no longer the champion
            self._failed_at.clear()
            return False
        serving = f"serving {cur.run_id} (table version {cur.table_version})" if cur else "serving nothing yet"
        if found is None or found[1].get("run_id") != champ.run_id or \
                found[1].get("checkpoint_sha256") != champ.checkpoint_sha256:
            self.pending = (f"champion {champ.run_id} has no recommendations yet (newest {table} refresh: "
                            f"{'none' if found is None else found[1].get('run_id')}); {serving}")
            self._check_checkpoint(champ, serving)
            return False
        key = (champ.run_id, champ.checkpoint_sha256, found[0])
        try:
            snap = load_snapshot(self.lake, self.cfg, champ, found[0], found[1], refreshed=found[2])
        except Exception as e:
            self._failed_at[key] = time.monotonic()
            self.error = (f"failed to load champion {champ.run_id} with {table} version {found[0]}: "
                          f"{type(e).__name__}: {e}; {serving}")
            log.error("%s", self.error)
            return False
        self.current = snap  # the swap
        self.swaps += 1
        self.pending = self.error = None
        self._failed_at.clear()
        log.info("now serving champion %s with %s version %d (loaded in %.2fs; was %s)", snap.run_id, table,
                 snap.table_version, snap.load_seconds, f"{cur.run_id} v{cur.table_version}" if cur else "nothing")
        return True

    def _retry_due(self) -> bool:
        now = time.monotonic()
        return any(now - t >= self.retry_seconds for t in self._failed_at.values())

    def _check_checkpoint(self, champ, serving: str) -> None:
        """A champion waiting for its table whose checkpoint does not verify
        will never be served: say so now rather than only 'waiting'. Checked
        again at every change of the ledger or the table (files can rot)."""
        from ..train.checkpoint import CheckpointError, verify_checkpoint

        try:
            verify_checkpoint(champ.checkpoint_path, champ.checkpoint_sha256)
        except CheckpointError as e:
            self._failed_at[(champ.run_id, champ.checkpoint_sha256)] = time.monotonic()
            self.error = f"champion {champ.run_id} cannot be served: {e}; {serving}"
            log.error("%s", self.error)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # a poll must never end the loop (the lake may be briefly unreadable)
                self.error = f"polling the lake failed: {type(e).__name__}: {e}"
                log.error("%s", self.error)
            self._stop.wait(self.cfg.serve.poll_seconds)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deltarec-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------ reporting
    def health(self) -> dict[str, Any]:
        cur = self.current
        out: dict[str, Any] = {
            "status": "ok" if cur and not self.error else ("degraded" if cur else "unavailable"),
            "model": self.cfg.model.name, "run_id": cur.run_id if cur else None,
            "table": self.cfg.recommend.table, "table_version": cur.table_version if cur else None,
            "loaded_at": cur.loaded_at.isoformat() if cur else None,
            "load_seconds": cur.load_seconds if cur else None,
            "users": len(cur.index) if cur else 0, "catalog_items": len(cur.catalog) if cur else 0,
            "k": cur.index.depth if cur else None, "max_k": cur.max_k if cur else self.cfg.recommend.max_k,
            "ledger_champion": self.ledger_champion, "pending": self.pending, "error": self.error,
            "last_poll_at": self.last_poll_at.isoformat() if self.last_poll_at else None, "swaps": self.swaps,
        }
        return out


def answer_user(cfg: "Config", user_id: str, k: int) -> dict[str, Any]:
    """One user's top ``k`` from the current champion's table, without Spark
    (``deltarec recommend --user``); raises ``LookupError`` when there is no
    champion snapshot to answer from."""
    from .ids import user_key

    holder = ModelHolder(cfg)
    holder.poll_once()
    snap = holder.current
    if snap is None:
        raise LookupError(f"nothing to answer from: {holder.error or holder.pending}")
    res = snap.recommend(user_key(user_id, cfg), k)
    return {"user_id": user_id, "k": k, "run_id": snap.run_id, "table_version": snap.table_version,
            "fallback": res["fallback"], "from": res["from"],
            "items": [{"rank": r, "item_id": i, "score": s} for r, (i, s) in enumerate(res["items"], 1)]}

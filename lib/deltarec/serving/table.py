"""The recommendations table as readers see it: its schema, the refresh
metadata each commit carries (which champion wrote it, from which table
versions), the registry events that bind a version to a champion, and the
demo's "tomorrow" printout. Arrow and delta-rs only: the server reads these
without Spark."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

RECOMMENDATIONS = pa.schema([
    pa.field("user_id", pa.string()),  # the key user_state holds; null: the list for users not in the table
    pa.field("rank", pa.int32()),  # 1 = best
    pa.field("item_id", pa.string()),
    pa.field("score", pa.float32()),  # the model's logit; for popularity rows the count in the window
    pa.field("source", pa.string()),  # model | popularity
    pa.field("run_id", pa.string()),  # the champion that produced the row set
    pa.field("generated_at", pa.timestamp("us", tz="UTC")),
])
EVENT_ACTION = "recommendations"  # the registry event that records a table version against its champion
_EVENT_VERSION = re.compile(r"version (\d+)")


def refresh_metadata(info: dict[str, Any]) -> dict[str, Any] | None:
    """The refresh metadata of one commit (delta-rs custom metadata or
    delta-spark userMetadata), or None for a commit that is not a refresh."""
    from ..lake.delta_rs import LEGACY_METADATA_KEY, METADATA_KEY

    for key in (METADATA_KEY, LEGACY_METADATA_KEY):  # Delta's userMetadata (both engines), older delta-rs lakes
        raw = info.get(key)
        if raw:
            try:
                meta = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                continue
            if isinstance(meta, dict) and "run_id" in meta and "checkpoint_sha256" in meta:
                return meta
    return None


def latest_refresh(lake: "LakeEngine", table: str) -> tuple[int, dict[str, Any]] | None:
    """(version, metadata) of the newest refresh commit of ``table``, or None."""
    found = current_rows(lake, table)
    return None if found is None else (found[2], found[1])


def current_rows(lake: "LakeEngine", table: str) -> tuple[int, dict[str, Any], int] | None:
    """(newest version, metadata of the newest refresh, that refresh's version),
    or None before any refresh. Commits after a refresh only remove or compact
    its rows (``deltarec forget`` erasing a user, ``deltarec maintain``), so
    readers serve the newest version: an erased user is gone from the answers
    as soon as the erasure commits, not at the next refresh."""
    if not lake.exists(table):
        return None
    history = sorted(lake.history(table), key=lambda h: -int(h.get("version", -1)))
    for info in history:
        meta = refresh_metadata(info)
        if meta is not None:
            return int(history[0]["version"]), meta, int(info["version"])
    return None


def recorded_versions(lake: "LakeEngine", cfg: "Config") -> dict[str, list[int]]:
    """Champion run id → the recommendations table versions its registry events record."""
    from ..registry.core import events

    out: dict[str, list[int]] = {}
    for e in events(lake, cfg):
        m = _EVENT_VERSION.search(e["reason"] or "") if e["action"] == EVENT_ACTION else None
        if m:
            out.setdefault(e["run_id"], []).append(int(m.group(1)))
    return out


def tomorrow_rows(lake: "LakeEngine", cfg: "Config", customers: int = 3, k: int = 5) -> list[dict[str, Any]]:
    """Tomorrow's top ``k`` for the ``customers`` users with most events, one
    row per (customer, rank), from the newest refresh; [] when there is none."""
    R = cfg.recommend
    found = current_rows(lake, R.table)
    if found is None:
        return []
    version, meta, _ = found
    recs = lake.read_arrow(R.table, version)
    state = lake.read_arrow(cfg.lake.user_state_table, meta.get("user_state_version"))
    busiest = state.sort_by([("events", "descending"), ("user_id", "ascending")])["user_id"].to_pylist()
    texts = {}
    if lake.exists(cfg.lake.items_table):
        items = lake.read_arrow(cfg.lake.items_table)
        texts = dict(zip(items["item_id"].to_pylist(), items["text"].to_pylist()))
    rows = []
    for user in busiest[:customers]:
        mine = recs.filter(pc.and_(pc.equal(recs["user_id"], user), pc.less_equal(recs["rank"], k))).sort_by("rank")
        for r in mine.to_pylist():
            rows.append({"customer": user, "rank": r["rank"], "item_id": r["item_id"],
                         "description": (texts.get(r["item_id"]) or "").strip(), "score": round(r["score"], 4),
                         "source": r["source"], "run_id": r["run_id"], "table_version": version})
    return rows


def tomorrow_text(lake: "LakeEngine", cfg: "Config", customers: int = 3, k: int = 5) -> str:
    """:func:`tomorrow_rows` as text, and how to serve them: what the demo prints last."""
    rows = tomorrow_rows(lake, cfg, customers, k)
    if not rows:
        return f"no {cfg.recommend.table} table yet: run `deltarec recommend`"
    lines = [f"tomorrow's top {k} (champion {rows[0]['run_id']}, {cfg.recommend.table} table version "
             f"{rows[0]['table_version']}):"]
    for user in dict.fromkeys(r["customer"] for r in rows):
        picks = "; ".join(f"{r['item_id']} {r['description'][:30]}".strip() for r in rows if r["customer"] == user)
        lines.append(f"  customer {user}: {picks}")
    S = cfg.serve
    lines.append(f"serve them over HTTP: .venv/bin/deltarec serve   then   curl "
                 f"http://{S.host}:{S.port}/recommendations/{rows[0]['customer']}?k={k}")
    return "\n".join(lines)

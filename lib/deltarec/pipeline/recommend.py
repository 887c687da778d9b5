"""The ``recommendations`` table: every user's top ``recommend.k`` from the champion.

Written after each nightly commit, on ``registry promote`` / ``rollback`` and by
``deltarec recommend``:

- the driver reads the ledger's champion, the catalogue (items seen in the last
  ``recommend.catalog_days``) and the popularity list: catalogue-sized work;
- the users (``user_state``, or those seen in the last ``recommend.active_days``)
  are split across Spark tasks (``mapInArrow``); each task loads the champion's
  checkpoint from the lake by path, sha256 verified, once, scores its users
  against the catalogue in blocks (``model.score_all``, ``torch.topk``) and
  writes its own Parquet part into the table's directory;
- the driver commits the parts as ONE Delta overwrite whose commit metadata
  names the champion (run id, checkpoint sha256) and the table versions read,
  then appends a ``recommendations`` registry event naming the table version,
  so "what did we serve after run R" is a time-travel read.

Users with no history get the popularity list with ``source = 'popularity'``;
rows with a null ``user_id`` hold the popularity list (``recommend.max_k``
deep) for users the table does not know.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa

from ..lake import LakeError, open_lake
from ..lake.ledger import Ledger, RunRecord

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.recommend")

RECOMMENDATIONS = pa.schema([
    pa.field("user_id", pa.string()),  # the key user_state holds; null: the list for users not in the table
    pa.field("rank", pa.int32()),  # 1 = best
    pa.field("item_id", pa.string()),
    pa.field("score", pa.float32()),  # the model's logit; for popularity rows the count in the window
    pa.field("source", pa.string()),  # model | popularity
    pa.field("run_id", pa.string()),  # the champion that produced the row set
    pa.field("generated_at", pa.timestamp("us", tz="UTC")),
])
RECS_DDL = ("user_id string, rank int, item_id string, score float, source string, run_id string, "
            "generated_at timestamp")
PART_DDL = "path string, size long, rows long, users long, modified long"
EVENT_ACTION = "recommendations"
_EVENT_VERSION = re.compile(r"version (\d+)")
_MODELS: dict[tuple[str, str], Any] = {}  # per Python worker: (checkpoint path, sha256) → model


def refresh_recommendations(spark: "SparkSession", cfg: "Config", lake: "LakeEngine | None" = None, *,
                            reason: str = "on demand", by: str = "deltarec") -> dict[str, Any]:
    """Score every user with the current champion and commit the table (one
    Delta commit). Returns what was written; raises when there is no champion,
    its checkpoint does not verify, or scoring fails (the table is unchanged)."""
    from ..features.examples import bucket  # noqa: F401  (fail here, not in a task, if Spark is missing)
    from ..registry.core import record_event
    from ..serving.catalog import catalog_from_item_stats
    from ..serving.scorer import parse_exclude
    from ..train.checkpoint import verify_checkpoint

    t0 = time.perf_counter()
    lake = lake or open_lake(cfg.lake, spark)
    L, R = cfg.lake, cfg.recommend
    ledger = Ledger(lake, L.runs_table)
    runs_version = lake.version(L.runs_table)
    champ = ledger.champion(cfg.model.name)
    if champ is None:
        raise LakeError(f"model {cfg.model.name!r} has no champion in {lake.uri(L.runs_table)}: run "
                        "`deltarec nightly` first")
    verify_checkpoint(champ.checkpoint_path, champ.checkpoint_sha256)  # a clear error before any task starts
    rule = parse_exclude(R.exclude)
    ub, ib, salt = hashing(cfg, champ)
    stats_version = lake.version(L.item_stats_table)
    if stats_version is None:
        raise LakeError(f"no {L.item_stats_table} table in {lake.root}: the delta job writes it; run `deltarec nightly`")
    catalog, _ = catalog_from_item_stats(lake.read_arrow(L.item_stats_table, stats_version), R.catalog_days, ib)
    popular = popularity(lake, cfg, ledger, {i for items in catalog.items for i in items})
    state_version = lake.version(L.user_state_table)
    users = users_frame(spark, lake, cfg, state_version, ub, ib, salt)
    generated = dt.datetime.now(dt.timezone.utc)
    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
    spec = {"checkpoint": champ.checkpoint_path, "sha256": champ.checkpoint_sha256, "run_id": champ.run_id,
            "catalog": catalog.to_dict(), "popular": popular, "k": R.k, "max_k": R.max_k, "exclude": rule,
            "block_pairs": R.block_pairs, "threads": threads, "generated_at": generated,
            "table_uri": lake.uri(R.table), "refresh": uuid.uuid4().hex[:12]}
    meta = {"run_id": champ.run_id, "model": cfg.model.name, "checkpoint_path": champ.checkpoint_path,
            "checkpoint_sha256": champ.checkpoint_sha256, "runs_version": runs_version,
            "user_state_version": state_version, "item_stats_version": stats_version, "k": R.k,
            "max_k": R.max_k, "exclude": R.exclude, "catalog_days": R.catalog_days, "active_days": R.active_days,
            "popularity_days": R.popularity_days, "user_buckets": ub, "item_buckets": ib, "salt": salt,
            "catalog_items": len(catalog), "reason": reason, "generated_at": generated.isoformat()}
    if lake.name == "delta-spark":  # Spark's Delta writer: tasks write, the driver commits
        out = users.mapInArrow(score_task(spec, "rows"), RECS_DDL)
        stats = _commit_with_spark(lake, R.table, out, meta, ledger, champ)
    else:  # delta-rs: tasks write Parquet parts, the driver commits them as one transaction
        parts = users.mapInArrow(score_task(spec, "parts"), PART_DDL).collect()
        stats = _commit_parts(lake, R.table, [p.asDict() for p in parts], meta, ledger, champ)
    if stats.get("skipped"):
        log.warning("recommendations not written: %s", stats["skipped"])
        return {**stats, "run_id": champ.run_id, "seconds": round(time.perf_counter() - t0, 3)}
    version = stats["version"]
    record_event(lake, cfg, EVENT_ACTION, champ.run_id, None, by,
                 f"{R.table} version {version}: {stats['users']} users, top {R.k} ({reason})")
    result = {"table": R.table, "version": version, "run_id": champ.run_id, "users": stats["users"],
              "rows": stats["rows"], "parts": stats["parts"], "catalog_items": len(catalog),
              "seconds": round(time.perf_counter() - t0, 3)}
    log.info("recommendations: %s version %d from champion %s: %d users, %d rows, %d parts in %.1fs",
             R.table, version, champ.run_id, result["users"], result["rows"], result["parts"], result["seconds"])
    return result


def refresh_quietly(spark: "SparkSession | None", cfg: "Config", lake: "LakeEngine | None" = None, *,
                    reason: str, by: str = "deltarec") -> dict[str, Any]:
    """:func:`refresh_recommendations` after a commit that already happened (a
    night, a promote): a failure is logged loudly and returned, never raised."""
    if not cfg.recommend.enabled:
        return {"skipped": "recommend.enabled=false"}
    try:
        if spark is None:
            from ..spark import build_spark

            spark = lake.spark if lake is not None and lake.spark is not None else build_spark(cfg)
        return refresh_recommendations(spark, cfg, lake, reason=reason, by=by)
    except Exception as e:
        log.error("the recommendations table was NOT refreshed (%s): %s: %s; it still holds the previous "
                  "champion's rows; fix the cause and run `deltarec recommend`", reason, type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}


def hashing(cfg: "Config", run: RunRecord) -> tuple[int, int, str]:
    """(user buckets, item buckets, salt) the champion was trained with: its own config, not today's."""
    f = (run.config or {}).get("features") or {}
    return (int(f.get("user_buckets", cfg.features.user_buckets)),
            int(f.get("item_buckets", cfg.features.item_buckets)), str(f.get("salt", cfg.features.salt) or ""))


def popularity(lake: "LakeEngine", cfg: "Config", ledger: Ledger, allowed: set[str]) -> list[tuple[str, float]]:
    """The popularity list: catalogue items with most positive events of
    committed runs in the last ``recommend.popularity_days`` days."""
    from ..serving.catalog import popular_items

    L = cfg.lake
    committed = [r.run_id for r in ledger.runs(cfg.model.name)]
    if not committed or not lake.exists(L.examples_table):
        return []
    rows = lake.lookup(L.examples_table, pa.table({"run_id": pa.array(committed, pa.string())}),
                       ["item_id", "event_time"], where="label = 1 AND kind = 'event'")
    return popular_items(rows, allowed, cfg.recommend.popularity_days, cfg.recommend.max_k)


def users_frame(spark: "SparkSession", lake: "LakeEngine", cfg: "Config", version: int | None,
                user_buckets: int, item_buckets: int, salt: str) -> "DataFrame":
    """One row per user to score (user_id, user_idx, history_ids, history_idx),
    ids hashed as the champion hashed them, plus one row with a null user_id
    (the popularity list), spread over the scoring tasks."""
    from pyspark.sql import functions as F

    from ..features.examples import bucket

    L, R = cfg.lake, cfg.recommend
    schema = "user_id string, user_idx bigint, history_ids array<string>, history_idx array<bigint>"
    if version is None:
        state = spark.createDataFrame([], "user_id string, history_ids array<string>, last_seen timestamp")
    elif lake.name == "delta-spark":
        state = lake.read(L.user_state_table, version)
    else:  # the snapshot's Parquet files, read by the executors (delta-rs writes no deletion vectors)
        files = _delta_rs_files(lake, L.user_state_table, version)
        state = spark.read.parquet(*files) if files else spark.createDataFrame(
            [], "user_id string, history_ids array<string>, last_seen timestamp")
    if R.active_days:
        newest = state.agg(F.max("last_seen")).first()[0]
        if newest is not None:
            state = state.where(F.col("last_seen") >= F.lit(newest - dt.timedelta(days=R.active_days)))
    hist = F.coalesce(F.col("history_ids"), F.array().cast("array<string>"))
    users = state.where(F.col("user_id").isNotNull()).select(
        "user_id", bucket(F.col("user_id"), user_buckets, salt).alias("user_idx"), hist.alias("history_ids"),
        F.transform(hist, lambda i: bucket(i, item_buckets)).alias("history_idx"))
    fallback = spark.createDataFrame([(None, -1, [], [])], schema)
    parts = R.partitions or _parallelism(spark, cfg)
    return users.unionByName(fallback).repartition(parts)


def _parallelism(spark: "SparkSession", cfg: "Config") -> int:
    try:
        return max(1, spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no sparkContext
        return max(1, cfg.spark.shuffle_partitions)


# ------------------------------------------------------------ executor side
def _champion_model(path: str, sha256: str):
    """The champion, loaded (and verified) once per Python worker."""
    key = (path, sha256)
    if key not in _MODELS:
        from ..serving.model import load_model

        _MODELS.clear()
        _MODELS[key] = load_model(path, sha256)[0]
    return _MODELS[key]


def score_batch(model, catalog, batch: pa.RecordBatch | pa.Table, spec: dict[str, Any]) -> pa.Table:
    """RECOMMENDATIONS rows of the users in ``batch`` (see :func:`users_frame`)."""
    from ..serving.scorer import excluded, top_items

    ids = batch.column("user_id").to_pylist()
    hist_ids = batch.column("history_ids").to_pylist()
    hist_idx = batch.column("history_idx").to_pylist()
    uidx = batch.column("user_idx").to_pylist()
    scored = [i for i, u in enumerate(ids) if u is not None and hist_ids[i]]
    top = top_items(model, catalog, [uidx[i] for i in scored], [hist_idx[i] for i in scored], spec["k"],
                    [excluded(hist_ids[i], spec["exclude"]) for i in scored], spec["block_pairs"])
    by_row = dict(zip(scored, top))
    cols: dict[str, list] = {n: [] for n in ("user_id", "rank", "item_id", "score", "source")}
    for i, u in enumerate(ids):
        picked, source = (by_row[i], "model") if i in by_row else (
            spec["popular"][:spec["max_k"] if u is None else spec["k"]], "popularity")
        for rank, (item, score) in enumerate(picked, 1):
            cols["user_id"].append(u)
            cols["rank"].append(rank)
            cols["item_id"].append(item)
            cols["score"].append(score)
            cols["source"].append(source)
    n = len(cols["rank"])
    cols["run_id"] = [spec["run_id"]] * n
    cols["generated_at"] = [spec["generated_at"]] * n
    return pa.Table.from_pydict(cols, schema=RECOMMENDATIONS)


def score_task(spec: dict[str, Any], mode: str):
    """The ``mapInArrow`` function: ``rows`` yields the scored rows (Spark
    writes them), ``parts`` writes one Parquet file into the table directory
    and yields its path, size and counts for the driver's commit."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import os

        import pyarrow.parquet as pq
        import torch

        from ..serving.scorer import Catalog

        torch.set_num_threads(spec["threads"])
        model, catalog = None, Catalog.from_dict(spec["catalog"])
        writer, sink, name, rows, users = None, None, None, 0, 0
        try:
            for b in batches:
                if b.num_rows == 0:
                    continue
                if model is None:
                    model = _champion_model(spec["checkpoint"], spec["sha256"])
                t = score_batch(model, catalog, b, spec)
                users += b.num_rows
                if mode == "rows":
                    if t.num_rows:
                        yield from t.to_batches()
                    continue
                if writer is None:
                    name = f"part-{spec['refresh']}-{uuid.uuid4().hex[:12]}.parquet"
                    sink = _open_output(f"{spec['table_uri']}/{name}")
                    writer = pq.ParquetWriter(sink, RECOMMENDATIONS)
                writer.write_table(t)
                rows += t.num_rows
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        if writer is not None:
            path = f"{spec['table_uri']}/{name}"
            size = os.path.getsize(path) if "://" not in path else _size(path)
            yield pa.RecordBatch.from_pydict({"path": [name], "size": [size], "rows": [rows], "users": [users],
                                              "modified": [int(time.time() * 1000)]})
    return run


def _open_output(path: str):
    import os

    if "://" not in path or path.startswith("file://"):
        path = path.removeprefix("file://")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb")
    from pyarrow import fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    return fs.open_output_stream(p)


def _size(path: str) -> int:
    from pyarrow import fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(p).size


# ------------------------------------------------------------ commit (driver)
# The lake interface has no "commit files written elsewhere" yet; these two
# helpers are engine-specific on purpose and belong in lake/ once it has one.
def _delta_rs_files(lake: "LakeEngine", table: str, version: int) -> list[str]:
    from deltalake import DeltaTable

    return DeltaTable(lake.uri(table), version=version).file_uris()


def _champion_moved(ledger: Ledger, champ: RunRecord) -> str | None:
    now = ledger.champion(champ.model)
    if now is None or now.run_id != champ.run_id or now.checkpoint_sha256 != champ.checkpoint_sha256:
        return (f"the champion changed from {champ.run_id} to {now.run_id if now else None} while scoring; "
                "the refresh for the new champion writes the table")
    return None


def _commit_parts(lake: "LakeEngine", table: str, parts: list[dict[str, Any]], meta: dict[str, Any],
                  ledger: Ledger, champ: RunRecord) -> dict[str, Any]:
    from deltalake import CommitProperties, DeltaTable
    from deltalake import Schema as DeltaSchema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    from ..lake.delta_rs import METADATA_KEY

    users = sum(p["users"] for p in parts)
    rows = sum(p["rows"] for p in parts)
    meta = {**meta, "users": users - 1, "rows": rows}  # minus the popularity row
    actions = [AddAction(p["path"], p["size"], {}, p["modified"], True, json.dumps({"numRecords": p["rows"]}))
               for p in parts]
    moved = _champion_moved(ledger, champ)
    if moved:
        return {"skipped": moved}
    props = CommitProperties(custom_metadata={METADATA_KEY: json.dumps(meta, default=str)})
    uri = lake.uri(table)
    if lake.exists(table):
        DeltaTable(uri).create_write_transaction(actions, mode="overwrite", schema=RECOMMENDATIONS,
                                                 commit_properties=props)
    else:
        create_table_with_add_actions(uri, DeltaSchema.from_arrow(RECOMMENDATIONS), actions, mode="error",
                                      commit_properties=props)
    return {"version": lake.version(table), "users": users - 1, "rows": rows, "parts": len(parts)}


def _commit_with_spark(lake: "LakeEngine", table: str, scored: "DataFrame", meta: dict[str, Any],
                       ledger: Ledger, champ: RunRecord) -> dict[str, Any]:
    moved = _champion_moved(ledger, champ)
    if moved:
        return {"skipped": moved}
    scored = scored.cache()
    try:
        rows = scored.count()
        users = scored.where("user_id IS NOT NULL").select("user_id").distinct().count()
        meta = {**meta, "users": users, "rows": rows}
        (scored.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
         .option("userMetadata", json.dumps(meta, default=str)).save(lake.uri(table)))
    finally:
        scored.unpersist()
    return {"version": lake.version(table), "users": users, "rows": rows, "parts": scored.rdd.getNumPartitions()}


# ------------------------------------------------------------ reading
def refresh_metadata(info: dict[str, Any]) -> dict[str, Any] | None:
    """The refresh metadata of one commit (delta-rs custom metadata or
    delta-spark userMetadata), or None for a commit that is not a refresh."""
    from ..lake.delta_rs import METADATA_KEY

    for key in (METADATA_KEY, "userMetadata"):
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
    if not lake.exists(table):
        return None
    for info in sorted(lake.history(table), key=lambda h: -int(h.get("version", -1))):
        meta = refresh_metadata(info)
        if meta is not None:
            return int(info["version"]), meta
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
    import pyarrow.compute as pc

    R = cfg.recommend
    found = latest_refresh(lake, R.table)
    if found is None:
        return []
    version, meta = found
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

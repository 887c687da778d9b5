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
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ..lake import LakeError, open_lake
from ..lake.ledger import Ledger, RunRecord
from ..serving.batch import score_task
from ..serving.table import EVENT_ACTION, RECOMMENDATIONS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.recommend")

RECS_DDL = ("user_id string, rank int, item_id string, score float, source string, run_id string, "
            "generated_at timestamp")
# what a task's part reports (load_s / score_s: the task's seconds loading the champion / scoring)
PART_DDL = "path string, size long, rows long, users long, modified long, load_s double, score_s double"


def refresh_recommendations(spark: "SparkSession", cfg: "Config", lake: "LakeEngine | None" = None, *,
                            reason: str = "on demand", by: str = "deltarec") -> dict[str, Any]:
    """Score every user with the current champion and commit the table (one
    Delta commit). Returns what was written; raises when there is no champion,
    its checkpoint does not verify, or scoring fails (the table is unchanged)."""
    from ..features.examples import bucket  # noqa: F401  (fail here, not in a task, if Spark is missing)
    from ..registry.core import record_event
    from ..serving.catalog import catalog_from_item_stats, scoring_time
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
        raise LakeError(f"no {L.item_stats_table} table in {lake.root}: the delta job writes it; "
                        "run `deltarec nightly`")
    stats = lake.read_arrow(L.item_stats_table, stats_version)
    catalog, _ = catalog_from_item_stats(stats, R.catalog_days, ib)
    popular = popularity(lake, cfg, ledger, {i for items in catalog.items for i in items},
                         pc.max(stats["last_seen"]).as_py() if stats.num_rows else None)
    state_version = lake.version(L.user_state_table)
    repeat_k, half_life = repeat_settings(cfg, champ)
    as_of = scoring_time(stats)  # the repeat lists are scored as of the day after the data
    users = users_frame(spark, lake, cfg, state_version, ub, ib, salt, repeats=repeat_k > 0)
    t_driver = time.perf_counter()
    generated = dt.datetime.now(dt.timezone.utc)
    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
    spec = {"checkpoint": champ.checkpoint_path, "sha256": champ.checkpoint_sha256, "run_id": champ.run_id,
            "catalog": catalog.to_dict(), "popular": popular, "k": R.k, "max_k": R.max_k, "exclude": rule,
            "block_pairs": R.block_pairs, "threads": threads, "generated_at": generated,
            "table_uri": lake.uri(R.table), "refresh": uuid.uuid4().hex[:12], "repeat_as_of": as_of,
            "repeat_half_life_days": half_life}
    meta = {"run_id": champ.run_id, "model": cfg.model.name, "checkpoint_path": champ.checkpoint_path,
            "checkpoint_sha256": champ.checkpoint_sha256, "runs_version": runs_version,
            "user_state_version": state_version, "item_stats_version": stats_version, "k": R.k,
            "max_k": R.max_k, "exclude": R.exclude, "catalog_days": R.catalog_days, "active_days": R.active_days,
            "popularity_days": R.popularity_days, "user_buckets": ub, "item_buckets": ib, "salt": salt,
            "catalog_items": len(catalog), "reason": reason, "generated_at": generated.isoformat(),
            "repeat_items": repeat_k, "repeat_as_of": as_of}
    if lake.name == "delta-spark":  # Spark's Delta writer: tasks write, the driver commits
        out = users.mapInArrow(score_task(spec, "rows"), RECS_DDL)
        t_tasks = time.perf_counter()
        written = _commit_with_spark(lake, R.table, out, meta, ledger, champ)
    else:  # delta-rs: tasks write Parquet parts, the driver commits them as one transaction
        parts = [p.asDict() for p in users.mapInArrow(score_task(spec, "parts"), PART_DDL).collect()]
        t_tasks = time.perf_counter()
        written = _commit_parts(lake, R.table, parts, meta, ledger, champ)
    if written.get("skipped"):
        log.warning("recommendations not written: %s", written["skipped"])
        return {**written, "run_id": champ.run_id, "seconds": round(time.perf_counter() - t0, 3)}
    version = written["version"]
    record_event(lake, cfg, EVENT_ACTION, champ.run_id, None, by,
                 f"{R.table} version {version}: {written['users']} users, top {R.k} ({reason})")
    t_end = time.perf_counter()
    result = {"table": R.table, "version": version, "run_id": champ.run_id, "users": written["users"],
              "rows": written["rows"], "parts": written["parts"], "catalog_items": len(catalog),
              "seconds": round(t_end - t0, 3),
              "phases": {"driver": round(t_driver - t0, 3), "tasks": round(t_tasks - t_driver, 3),
                         "commit": round(t_end - t_tasks, 3)}}
    if lake.name != "delta-spark":  # inside the tasks phase: the slowest task's model load and scoring
        result["phases"]["task_load_max"] = round(max((p["load_s"] for p in parts), default=0.0), 3)
        result["phases"]["task_score_max"] = round(max((p["score_s"] for p in parts), default=0.0), 3)
    log.info("recommendations: %s version %d from champion %s: %d users, %d rows, %d parts in %.1fs (%s)",
             R.table, version, champ.run_id, result["users"], result["rows"], result["parts"], result["seconds"],
             ", ".join(f"{k} {v:.1f}s" for k, v in result["phases"].items()))
    return result


def refresh_quietly(spark: "SparkSession | None", cfg: "Config", lake: "LakeEngine | None" = None, *,
                    reason: str, by: str = "deltarec", only_if_exists: bool = False) -> dict[str, Any]:
    """:func:`refresh_recommendations` after a commit that already happened (a
    night, a promote): a failure is logged loudly and returned, never raised.
    ``only_if_exists``: skip when the lake has no table yet (a registry change
    on a lake whose nights never wrote one starts no Spark job)."""
    if not cfg.recommend.enabled:
        return {"skipped": "recommend.enabled=false"}
    if only_if_exists and lake is not None and not lake.exists(cfg.recommend.table):
        return {"skipped": f"no {cfg.recommend.table} table yet (`deltarec recommend` writes one)"}
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


def repeat_settings(cfg: "Config", run: RunRecord) -> tuple[int, float]:
    """(``features.repeat_items``, ``features.repeat_half_life_days``) the
    champion was trained with: its own config, like :func:`hashing` (0: no
    lists; a model that does not read them ignores them)."""
    f = (run.config or {}).get("features") or {}
    return (int(f.get("repeat_items", cfg.features.repeat_items)),
            float(f.get("repeat_half_life_days", cfg.features.repeat_half_life_days)))


def popularity(lake: "LakeEngine", cfg: "Config", ledger: Ledger, allowed: set[str],
               newest: dt.datetime | None = None) -> list[tuple[str, float]]:
    """The popularity list: catalogue items with most positive events of
    committed runs in the last ``recommend.popularity_days`` days before
    ``newest`` (the data's clock; the scan skips older files by their stats)."""
    from ..serving.catalog import popular_items

    L, days = cfg.lake, cfg.recommend.popularity_days
    committed = [r.run_id for r in ledger.runs(cfg.model.name)]
    if not committed or not lake.exists(L.examples_table):
        return []
    keys = pa.table({"run_id": pa.array(committed, pa.string())})
    where = "label = 1 AND kind = 'event'"
    rows = None
    if newest is not None and days:
        cut = (newest - dt.timedelta(days=days + 1)).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        rows = lake.lookup(L.examples_table, keys, ["item_id", "event_time"],
                           where=f"{where} AND event_time >= '{cut}'")
    if rows is None or rows.num_rows == 0:  # no recent positives: all time
        rows = lake.lookup(L.examples_table, keys, ["item_id", "event_time"], where=where)
    return popular_items(rows, allowed, days, cfg.recommend.max_k)


def users_frame(spark: "SparkSession", lake: "LakeEngine", cfg: "Config", version: int | None,
                user_buckets: int, item_buckets: int, salt: str, *, repeats: bool = False) -> "DataFrame":
    """One row per user to score (user_id, user_idx, history_ids, history_idx),
    ids hashed as the champion hashed them, plus one row with a null user_id
    (the popularity list), spread over the scoring tasks. ``repeats``: with
    the user's repeat lists too (``features.repeats.STATE_COLUMNS``, times as
    µs; nulls when user_state predates them), for a champion that reads them."""
    from pyspark.sql import functions as F

    from ..features.examples import bucket
    from ..features.repeats import micros_columns

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
        F.transform(hist, lambda i: bucket(i, item_buckets)).alias("history_idx"),
        *(micros_columns(state) if repeats else []))
    fallback = spark.createDataFrame([(None, -1, [], [])], schema)
    parts = R.partitions or _parallelism(spark, cfg)
    return users.unionByName(fallback, allowMissingColumns=True).repartition(parts)


def _parallelism(spark: "SparkSession", cfg: "Config") -> int:
    """Spark's default parallelism (spark.shuffle_partitions sets it: 2-3 tasks per core);
    a reused Python worker keeps the champion it loaded for the next task."""
    try:
        return max(1, spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no sparkContext
        return max(1, cfg.spark.shuffle_partitions)


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

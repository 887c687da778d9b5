"""The Spark half of a run: the change feed of versions (first, last] of the
behaviour table → validated changes, quarantine, event index, state, training
examples. Change semantics: ``features/validate.py``.

Idempotent: running it twice for the same range leaves the lake as after one
run, and a retry after a crash over a longer range (same ``first``) as one
run over that range:

- ``quarantine_events``: ``replaceWhere`` on run_id; ``training_examples``: the
  run's partition replaced in one commit (``LakeEngine.replace_partition``);
- ``event_index``: ``replaceWhere source_version >= first`` (only earlier
  runs' rows, ``source_version < first``, count as "consumed before");
- ``user_state`` / ``item_stats``: each MERGE commit records the source range
  it applied (commit metadata). The state before tonight is read by time
  travel as of the version just before the first commit that applied a
  version >= ``first``; tonight's rows are absolute values computed from it,
  so repeating the MERGE changes nothing.

A run that lost a race changes nothing: before its first write and again
before each state write it checks that no run committed a range from its
``first`` on (``check_not_overtaken``); and as that check and the write are
not one transaction, the writes themselves never take another run's place:
the index replaces only this run's versions (``first..last``), and a state
row is updated only by a row of the same or a later applied source version
(``STATE_UPDATE_IF``), so a loser resumed after the winner's commit cannot
move a row backwards.

Cost follows the night, not the history, and so does the driver's memory:
tonight's keys (a Spark DataFrame, broadcast: night-sized) find their slice
of the event index (duplicate ids; every row of the events tonight's updates,
deletes and cancellations refer to) and of ``user_state`` by Spark joins with
the tables read by the executors (``LakeEngine.read_on_executors``);
``item_stats`` is read whole by the executors (catalogue-sized: popularity
negatives need it). The change feed is read by the executors, and the
writes (quarantine, index, state MERGEs, examples) take DataFrames: the
driver collects counts and file lists, not rows (on delta-rs it streams
staged Parquet into delta-rs a batch at a time: ``lake/staging.py``). Each Spark job costs a fixed fraction of
a second, so counts come from what is written anyway; shared intermediates
are computed once and their plans cut (``pipeline/held.py``: planning deep
plans again for each action cost more than the jobs); ``stats["stage_seconds"]`` and
``stats["stage_spark_jobs"]`` say where a night's time went
(``benchmarks/delta_scaling.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..faults import crash_point
from ..features.changes import cancel_rewrites, check_change_fraction, check_drift, map_source, mapped_columns
from ..features.examples import build_examples, trained_types
from ..features.items import read_items
from ..features.prior import prior_index, tonight_keys
from ..features.state import next_item_stats, next_user_state
from ..features.validate import check_threshold, validate
from ..lake import schemas
from ..lake.engine import ConcurrentRunError, LakeError
from ..lake.ledger import Ledger
from .held import Held
from .stages import StageClock

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

# State tables of the delta job (relative to lake.root).
# Default names; a run uses cfg.lake.{event_index,user_state,item_stats}_table.
EVENT_INDEX_TABLE = "event_index"
USER_STATE_TABLE = "user_state"
ITEM_STATS_TABLE = "item_stats"
# A state row moves only forward: never replaced by one computed from older source versions.
STATE_UPDATE_IF = "t.source_version IS NULL OR s.source_version >= t.source_version"
ADAPTIVE = "spark.sql.adaptive.enabled"
SHUFFLE = "spark.sql.shuffle.partitions"
REWRITES = "_rewrites"  # not a change type: the count of unchanged rewrites, beside the kinds


@dataclass
class PreparedNight:
    run_id: str
    first: int
    last: int
    consumed: int
    accepted: int
    quarantined: int
    reasons: dict[str, int]
    examples: int
    examples_df: "DataFrame"  # this run's rows of training_examples (as written)
    items: "DataFrame"  # the catalogue negatives are drawn from (item_id, ...)
    stats: dict = field(default_factory=dict)  # anything else worth recording in the run's metrics


def base_version(lake: "LakeEngine", table: str, first: int) -> int | None:
    """The version of a state table before any commit that applied source
    versions >= ``first`` (None: no table yet)."""
    if not lake.exists(table):
        return None
    metas = lake.commit_metadata(table)
    ahead = [m for _, m in metas if int(m.get("source_first", -1)) > first]
    if ahead:
        raise LakeError(
            f"{table} already holds source versions {ahead[-1]['source_first']}..{ahead[-1]['source_last']} "
            f"(run {ahead[-1].get('run_id')}), after this run's first version {first}: an earlier range cannot "
            "be prepared again on top of later state. Restore the table or start a new lake"
        )
    mine = [v for v, m in metas if int(m.get("source_last", -1)) >= first]
    return min(mine) - 1 if mine else lake.version(table)


def check_not_overtaken(cfg: "Config", lake: "LakeEngine", first: int, last: int, run_id: str) -> None:
    """Raise ConcurrentRunError when a committed run already consumed version
    ``first`` or later: this run lost the race and must write nothing more."""
    watermark = Ledger(lake, cfg.lake.runs_table).watermark(cfg.model.name)
    if watermark >= first:
        raise ConcurrentRunError(
            f"run {run_id}: another run of model {cfg.model.name!r} committed {cfg.lake.events_table} versions "
            f"up to {watermark} while this one prepared {first}..{last}; it stops before writing "
            "(the other run's state stands, nothing of this run was recorded). Run the nightly again to "
            "consume what is new")


def read_source_changes(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", first: int,
                        last: int) -> "DataFrame":
    """Change rows of (first, last] in the behaviour schema (mapped from your own
    table when ``source.columns`` is set), after the schema-drift check."""
    table = cfg.lake.events_table
    raw = lake.read_changes(table, first, last)
    before = lake.scan(table, where="1 = 0", version=first - 1).schema if first > 0 else None
    m = cfg.source.columns
    check_drift(table, raw.schema, before, **({} if m is None else {"read": mapped_columns(m, cfg.source.key)}))
    from ..privacy import ingest  # forgotten users' changes stay out; pseudonyms in

    mapped = raw if m is None else map_source(raw, m, key=cfg.source.key, event_types=cfg.source.event_types)
    return ingest(spark, cfg, lake, mapped)


def _check_change_fraction(cfg: "Config", lake: "LakeEngine", first: int, kinds: dict[str, int],
                           n_rewrites: int) -> None:
    """Stop when the deletes and updates (less the unchanged rewrites
    cancelled) touch more than validation.max_change_fraction of the table."""
    deletes, updates = kinds.get("delete", 0), kinds.get("update_postimage", 0)
    if (deletes or updates) and first > 0:  # the table's size: only on nights that need it
        rows = lake.row_count(cfg.lake.events_table, version=first - 1)
        check_change_fraction(cfg.lake.events_table, rows, deletes, updates, n_rewrites,
                              cfg.validation.max_change_fraction)


def prepare_night(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", first: int, last: int,
                  run_id: str) -> PreparedNight:
    held = Held()  # released in `finally`, before training needs the memory
    session = {k: spark.conf.get(k, None) for k in (ADAPTIVE, SHUFFLE)}
    try:
        return _prepare(spark, cfg, lake, first, last, run_id, held)
    finally:
        held.release()
        for key, value in session.items():  # the session's own settings again
            _set_conf(spark, key, value)


def _set_conf(spark: "SparkSession", key: str, value: str | None) -> None:
    if value is None:
        spark.conf.unset(key)
    else:
        spark.conf.set(key, value)


def small_night(spark: "SparkSession", cfg: "Config", rows: int, adaptive: str | None) -> bool:
    """A night of fewer than ``spark.adaptive_min_rows`` change rows runs
    with adaptive execution off (as while it was counted) and its shuffles in
    ``spark.small_night_partitions`` partitions; a larger one gets the
    session's setting ``adaptive`` back and keeps its partitions
    (prepare_night restores both after the night either way)."""
    small = rows < cfg.spark.adaptive_min_rows
    _set_conf(spark, ADAPTIVE, "false" if small else adaptive)
    if small and cfg.spark.small_night_partitions:
        spark.conf.set(SHUFFLE, str(cfg.spark.small_night_partitions))
    return small


def _prepare(spark, cfg, lake, first, last, run_id, held: Held) -> PreparedNight:
    from pyspark.sql import functions as F

    c = F.col
    tables, features = cfg.lake, cfg.features
    stage = StageClock(spark)
    index_table, users_table, items_table = (  # this lineage's state tables
        cfg.lake.event_index_table, cfg.lake.user_state_table, cfg.lake.item_stats_table)
    items = read_items(cfg, lake)  # (item_id, text) through source.items, checked first; None: no catalogue
    keep, cut = held.keep, held.cut
    # The change rows once (a leaf): cancel_rewrites and the keys read them in
    # several branches, and over the feed's own plan (files joined with their
    # versions) each branch re-read the files and broadcast the mapping again.
    # A 2,438-row demo night's read_changes: 11 Spark jobs before, 6 with this
    # cut and cancel_rewrites' join-free windows.
    changes, rewrites = cancel_rewrites(cut(read_source_changes(spark, cfg, lake, first, last)))
    changes = keep(changes)
    keys = keep(tonight_keys(changes))
    adaptive = spark.conf.get(ADAPTIVE, None)
    if cfg.spark.adaptive_min_rows:  # off while the night is counted (one small aggregate): see small_night
        spark.conf.set(ADAPTIVE, "false")
    # change rows per kind and the unchanged rewrites cancelled: one Spark job
    kinds = {r["_change_type"]: int(r["count"]) for r in keys.groupBy("_change_type").count().unionByName(
        rewrites.groupBy(F.lit(REWRITES).alias("_change_type")).count()).collect()}
    n_rewrites = kinds.pop(REWRITES, 0)
    _check_change_fraction(cfg, lake, first, kinds, n_rewrites)
    adaptive_off = small_night(spark, cfg, sum(kinds.values()), adaptive)
    stage.mark("read_changes")
    # night-sized slices of the history, read by several outputs: computed once
    prior_ids, prior = prior_index(lake, keys, first, index_table, materialize=cut)
    if prior is not None:
        prior = cut(prior)
    stage.mark("index_lookup")
    v = validate(changes, cfg.validation, run_id, trained_types=trained_types(features),
                 prior_ids=prior_ids, prior=prior,
                 rating_scale=(features.rating.min, features.rating.max), materialize=cut)
    # validation's outputs: night-sized, each read by several of the outputs below
    # (accepted rows only by the tallies: not held, one Spark job fewer)
    accepted, events, retractions = v.accepted, cut(v.events), cut(v.retractions)

    # Counted in one aggregate (every Spark job costs a fixed fraction of a
    # second); the quarantine's rows stay on the executors until written.
    tallies = (accepted.groupBy(F.lit("outcome").alias("what"), c("outcome").alias("value")).count()
               .unionByName(retractions.groupBy(F.lit("cause").alias("what"), c("cause").alias("value")).count())
               .unionByName(v.quarantined.groupBy(F.lit("reason").alias("what"), c("reason").alias("value")).count())
               .collect())
    outcomes = {r["value"]: int(r["count"]) for r in tallies if r["what"] == "outcome"}
    causes = {r["value"]: int(r["count"]) for r in tallies if r["what"] == "cause"}
    reasons = {r["value"]: int(r["count"]) for r in tallies if r["what"] == "reason"}
    n_accepted = sum(outcomes.values())
    n_quarantined = sum(reasons.values())
    consumed = n_accepted + n_quarantined
    check_threshold(reasons, consumed, cfg.validation.max_quarantine_fraction)
    stage.mark("validate")

    # ---- state as of before tonight (time travel past this range's own commits)
    meta = {"run_id": run_id, "source_first": str(first), "source_last": str(last)}
    for table, schema in ((users_table, schemas.USER_STATE), (items_table, schemas.ITEM_STATS)):
        lake.create(table, schema)
    # Users touched tonight: tonight's rows' users and the earlier owners of the
    # events they change (a superset is fine: next_user_state joins by user).
    touched = keys.select("user_id")
    touched = (touched if prior is None else touched.unionByName(prior.select("user_id"))).distinct()
    base_users = cut(lake.read_on_executors(users_table, base_version(lake, users_table, first))
                     .join(F.broadcast(touched), "user_id", "left_semi"))
    base_items = keep(lake.read_on_executors(items_table, base_version(lake, items_table, first)))

    # Tonight's state rows stay on the executors: the MERGEs take the DataFrames
    # (delta-rs: staged Parquet streamed into delta-rs; lake/staging.py).
    # (both already in their tables' columns and types: features/state.py)
    new_users = next_user_state(base_users, events, retractions, features)
    new_items = cut(next_item_stats(base_items, events, retractions, features, items))
    stats_after = base_items.join(new_items.select("item_id"), "item_id", "left_anti").unionByName(new_items)
    if items is None:  # no catalogue table: negatives come from every item seen so far
        items = stats_after.select("item_id")
    stage.mark("state")

    examples = build_examples(events, retractions, items, features, run_id, history=base_users,
                              item_stats=stats_after)

    # ---- writes, each idempotent (see the module docstring)
    def guard():
        check_not_overtaken(cfg, lake, first, last, run_id)

    guard()
    lake.create(tables.quarantine_table, schemas.QUARANTINE_EVENTS)
    lake.write(tables.quarantine_table, v.quarantined, mode="overwrite", replace_where=f"run_id = '{run_id}'",
               schema=schemas.QUARANTINE_EVENTS)
    lake.create(index_table, schemas.EVENT_INDEX)
    guard()
    lake.write(index_table, v.index, mode="overwrite",  # only this run's versions: later ones are another run's
               replace_where=f"source_version >= {first} AND source_version <= {last}", schema=schemas.EVENT_INDEX)
    # Rows updated: the MERGEs' own counts (a MERGE of no rows commits nothing)
    guard()
    merged = lake.merge(users_table, new_users, ["user_id"], update=True, commit_metadata=meta,
                        update_if=STATE_UPDATE_IF)
    n_users = merged["inserted"] + merged["updated"]
    guard()
    merged = lake.merge(items_table, new_items, ["item_id"], update=True, commit_metadata=meta,
                        update_if=STATE_UPDATE_IF)
    n_items = merged["inserted"] + merged["updated"]
    stage.mark("write_state")
    crash_point("after_state_write")
    # The executors write the examples' Parquet files and the driver commits them
    # (one transaction, replacing this run's partition): no row passes through the
    # driver, whatever the night's or the history's size. Rows per kind come back
    # with the files written.
    guard()  # a loser paused here must not replace the winner's examples of the same run id
    written = lake.replace_partition(tables.examples_table, examples, {"run_id": run_id},
                                     schemas.TRAINING_EXAMPLES, count_by="kind")
    kinds = written["counts"]
    stage.mark("examples")

    new_examples = lake.read_partition(tables.examples_table, {"run_id": run_id})  # read by the executors
    stage.mark("report")
    stats = {"outcomes": outcomes, "example_kinds": kinds, "retractions": causes, "rewrites_cancelled": n_rewrites,
             "users_updated": n_users, "items_updated": n_items, "adaptive_off": adaptive_off,
             "shuffle_partitions": int(spark.conf.get(SHUFFLE)),
             "stage_seconds": stage.seconds, "stage_spark_jobs": stage.jobs}
    return PreparedNight(run_id, first, last, consumed, n_accepted, n_quarantined, reasons,
                         sum(kinds.values()), new_examples, items, stats)

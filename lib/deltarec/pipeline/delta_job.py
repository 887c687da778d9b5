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

Cost follows the night, not the history: tonight's keys (one small collect)
find their slice of the event index (duplicate ids; every row of the events
tonight's updates, deletes and cancellations refer to) and of ``user_state``
through the engine's ``lookup`` — with delta-rs a column read and an Arrow
semi-join, so nothing history-sized becomes a Spark DataFrame; ``item_stats``
is read whole (catalogue-sized: popularity negatives need it). Each Spark job
costs a fixed fraction of a second, so counts come from what is written
anyway and shared intermediates are cached; ``stats["stage_seconds"]`` and
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
from ..features.state import next_item_stats, next_user_state
from ..features.cancellations import match_cancellations
from ..features.validate import CANCEL, CONSUMED_CHANGES, EVENT_CHANGES, check_threshold, validate
from ..lake import schemas
from ..lake.engine import ConcurrentRunError, LakeError, plain_strings, to_arrow
from ..lake.ledger import Ledger
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


def _check_change_fraction(cfg: "Config", lake: "LakeEngine", first: int, keys, rewrites: "DataFrame") -> int:
    """Unchanged rewrites cancelled (counted); stop when the rest of the deletes
    and updates touch more than validation.max_change_fraction of the table."""
    n_rewrites = rewrites.count()
    kinds = _counts(keys, "_change_type")
    deletes, updates = kinds.get("delete", 0), kinds.get("update_postimage", 0)
    if (deletes or updates) and first > 0:  # the table's size costs a Spark job: only on nights that need it
        rows = lake.scan(cfg.lake.events_table, version=first - 1).count()
        check_change_fraction(cfg.lake.events_table, rows, deletes, updates, n_rewrites,
                              cfg.validation.max_change_fraction)
    return n_rewrites


def _tonight_keys(changes: "DataFrame"):
    """Tonight's consumed change rows, key columns only, on the driver (one
    small collect): what the lookups into the history-sized tables start from."""
    from pyspark.sql import functions as F

    return changes.where(F.col("_change_type").isin(*CONSUMED_CHANGES)).select(
        "_change_type", "event_id", "user_id", "item_id", "event_type", "event_time",
        F.col("_commit_version").cast("long").alias("source_version")).toArrow()


def _prior_index(lake: "LakeEngine", keys, first: int, table: str = EVENT_INDEX_TABLE):
    """Arrow slices of the event index of earlier runs (``source_version <
    first``): (the ids among tonight's inserts consumed before — duplicates;
    every row of the events tonight's updates and deletes refer to, and of the
    purchases tonight's cancellations could retract). Found by the engine's
    ``lookup``: the cost per history row is a column read, not Spark."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists(table):
        return None, None
    before = f"source_version < {first}"
    ct = keys["_change_type"]
    ids = lake.lookup(table, keys.filter(pc.equal(ct, "insert")).select(["event_id"]), ["event_id"], before)
    changed = pc.unique(keys.filter(pc.is_in(ct, pa.array(["update_postimage", "delete"])))["event_id"].drop_null())
    prior = lake.lookup(table, pa.table({"event_id": changed}), None, before)
    cancels = keys.filter(pc.and_(pc.is_in(ct, pa.array(list(EVENT_CHANGES))),
                                  pc.fill_null(pc.equal(keys["event_type"], CANCEL), False)))
    held = lake.lookup(table, cancels.select(["user_id", "item_id"]), ["event_id"], before)["event_id"]
    held = pc.filter(held, pc.invert(pc.is_in(held, changed)))  # those are in `prior` already, every row
    if len(held):
        # only the purchase the cancellation rule picks among these (the rest of a
        # popular pair's history never reaches Spark): the final choice among it
        # and tonight's purchases is validate's, by the same rule
        rows = lake.lookup(table, pa.table({"event_id": pc.unique(held)}), None, before)
        keep = match_cancellations(cancels, rows)["event_id"]
        prior = pa.concat_tables([prior, rows.filter(pc.is_in(rows["event_id"], keep))], promote_options="permissive")
    return ids, prior


def prepare_night(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", first: int, last: int,
                  run_id: str) -> PreparedNight:
    cached: list = []

    def keep(df):  # cached for this run only: released in `finally`, before training needs the memory
        cached.append(df if df.is_cached else df.cache())
        return df

    try:
        return _prepare(spark, cfg, lake, first, last, run_id, keep)
    finally:
        for df in cached:
            df.unpersist()


def _df(spark, arrow):
    return None if arrow is None else spark.createDataFrame(arrow)


def _counts(arrow, column: str) -> dict[str, int]:
    import pyarrow.compute as pc

    return {r["values"]: int(r["counts"]) for r in pc.value_counts(arrow[column]).to_pylist()}


def _prepare(spark, cfg, lake, first, last, run_id, keep) -> PreparedNight:
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark.sql import functions as F

    c = F.col
    tables, features = cfg.lake, cfg.features
    stage = StageClock(spark)
    index_table, users_table, items_table = (  # this lineage's state tables
        cfg.lake.event_index_table, cfg.lake.user_state_table, cfg.lake.item_stats_table)
    items = read_items(cfg, lake)  # (item_id, text) through source.items, checked first; None: no catalogue
    changes, rewrites = cancel_rewrites(read_source_changes(spark, cfg, lake, first, last))
    changes = keep(changes)
    keys = plain_strings(_tonight_keys(changes))
    n_rewrites = _check_change_fraction(cfg, lake, first, keys, rewrites)
    stage.mark("read_changes")
    prior_ids, prior = _prior_index(lake, keys, first, index_table)
    stage.mark("index_lookup")
    v = validate(changes, cfg.validation, run_id, trained_types=trained_types(features),
                 prior_ids=_df(spark, prior_ids), prior=_df(spark, prior),
                 rating_scale=(features.rating.min, features.rating.max))
    for df in v.cached:
        keep(df)
    accepted = keep(v.accepted)
    events = keep(v.events)
    retractions = keep(v.retractions)

    # Counted from what is written anyway (the quarantine as Arrow) and one
    # aggregate for the rest: every Spark job costs a fixed fraction of a second.
    quarantined = to_arrow(v.quarantined, schemas.QUARANTINE_EVENTS)
    reasons = _counts(quarantined, "reason")
    tallies = (accepted.groupBy(F.lit("outcome").alias("what"), c("outcome").alias("value")).count()
               .unionByName(retractions.groupBy(F.lit("cause").alias("what"), c("cause").alias("value")).count())
               .collect())
    outcomes = {r["value"]: int(r["count"]) for r in tallies if r["what"] == "outcome"}
    causes = {r["value"]: int(r["count"]) for r in tallies if r["what"] == "cause"}
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
    touched = pa.chunked_array(keys["user_id"].chunks + (prior["user_id"].chunks if prior is not None else []),
                               pa.string())
    base_users = keep(_df(spark, lake.lookup(users_table, pa.table({"user_id": pc.unique(touched)}),
                                             version=base_version(lake, users_table, first))))
    base_items = keep(lake.scan(items_table, version=base_version(lake, items_table, first)))  # catalogue-sized

    new_users = to_arrow(next_user_state(base_users, events, retractions, features), schemas.USER_STATE)
    new_items = to_arrow(next_item_stats(base_items, events, retractions, features,
                                         items),
                         schemas.ITEM_STATS)
    tonight_items = _df(spark, new_items)
    stats_after = base_items.join(tonight_items.select("item_id"), "item_id", "left_anti").unionByName(tonight_items)
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
    lake.write(tables.quarantine_table, quarantined, mode="overwrite", replace_where=f"run_id = '{run_id}'",
               schema=schemas.QUARANTINE_EVENTS)
    lake.create(index_table, schemas.EVENT_INDEX)
    guard()
    lake.write(index_table, v.index, mode="overwrite",  # only this run's versions: later ones are another run's
               replace_where=f"source_version >= {first} AND source_version <= {last}", schema=schemas.EVENT_INDEX)
    n_users, n_items = new_users.num_rows, new_items.num_rows
    if n_users:
        guard()
        lake.merge(users_table, new_users, ["user_id"], update=True, commit_metadata=meta, update_if=STATE_UPDATE_IF)
    if n_items:
        guard()
        lake.merge(items_table, new_items, ["item_id"], update=True, commit_metadata=meta, update_if=STATE_UPDATE_IF)
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
             "users_updated": n_users, "items_updated": n_items,
             "stage_seconds": stage.seconds, "stage_spark_jobs": stage.jobs}
    return PreparedNight(run_id, first, last, consumed, n_accepted, n_quarantined, reasons,
                         sum(kinds.values()), new_examples, items, stats)

"""The Spark half of a run: the change feed of versions (first, last] of the
behaviour table → validated changes, quarantine, event index, state, training
examples. Change semantics: ``features/validate.py``.

Idempotent: running it twice for the same range leaves the lake as after one
run, and a retry after a crash over a longer range (same ``first``) as one
run over that range:

- ``quarantine_events`` and ``training_examples``: ``replaceWhere`` on run_id;
- ``event_index``: ``replaceWhere source_version >= first`` (only earlier
  runs' rows, ``source_version < first``, count as "consumed before");
- ``user_state`` / ``item_stats``: each MERGE commit records the source range
  it applied (commit metadata). The state before tonight is read by time
  travel as of the version just before the first commit that applied a
  version >= ``first``; tonight's rows are absolute values computed from it,
  so repeating the MERGE changes nothing.

Cost follows the night, not the history: the event index is read as one
column (event ids, for duplicates) plus the few rows that tonight's updates,
deletes and cancellations refer to, both filtered by delta-rs / Spark before
they reach the job; the state is read for the catalogue's items and the users.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..features.changes import check_drift, map_source, mapped_columns
from ..features.examples import build_examples, trained_types
from ..features.state import next_item_stats, next_user_state
from ..features.validate import CANCEL, check_threshold, validate
from ..lake import schemas
from ..lake.engine import LakeError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

# State tables of the delta job (relative to lake.root).
# Default names; a run uses cfg.lake.{event_index,user_state,item_stats}_table.
EVENT_INDEX_TABLE = "event_index"
USER_STATE_TABLE = "user_state"
ITEM_STATS_TABLE = "item_stats"
EXAMPLES_PER_WRITE = 400_000  # rows per Arrow slice written by the driver (delta-rs)
LOOKUP_LIMIT = 20_000  # ids / users tonight beyond which the index slice is read without an IN list


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


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


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


def read_source_changes(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", first: int,
                        last: int) -> "DataFrame":
    """Change rows of (first, last] in the behaviour schema (mapped from your own
    table when ``source.columns`` is set), after the schema-drift check."""
    L = cfg.lake
    raw = lake.read_changes(L.events_table, first, last)
    before = lake.scan(L.events_table, where="1 = 0", version=first - 1).schema if first > 0 else None
    m = cfg.source.columns
    if m is None:
        check_drift(L.events_table, raw.schema, before)
        return raw
    check_drift(L.events_table, raw.schema, before, read=mapped_columns(m))
    return map_source(raw, m)


def _prior_index(lake: "LakeEngine", changes: "DataFrame", first: int, table: str = EVENT_INDEX_TABLE):
    """(event ids consumed before ``first``, index rows tonight's lookups need)."""
    from pyspark.sql import functions as F

    if not lake.exists(table):
        return None, None
    before = f"source_version < {first}"
    ids = lake.scan(table, ["event_id"], where=before)
    c = F.col
    keys = [r[0] for r in changes.where(c("_change_type").isin("update_postimage", "delete")
                                        & c("event_id").isNotNull()).select("event_id").distinct().collect()]
    users = [r[0] for r in changes.where(c("_change_type").isin("insert", "update_postimage")
                                         & (c("event_type") == CANCEL) & c("user_id").isNotNull())
             .select("user_id").distinct().collect()]
    if not keys and not users:
        return ids, None
    if len(keys) + len(users) > LOOKUP_LIMIT:
        return ids, lake.scan(table, where=before)
    cond = " OR ".join(([f"event_id IN ({_sql_list(keys)})"] if keys else [])
                       + ([f"user_id IN ({_sql_list(users)})"] if users else []))
    return ids, lake.scan(table, where=f"{before} AND ({cond})")


def prepare_night(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", first: int, last: int,
                  run_id: str) -> PreparedNight:
    cached: list = []

    def keep(df):  # cached for this run only: released in `finally`, before training needs the memory
        cached.append(df.cache())
        return df

    try:
        return _prepare(spark, cfg, lake, first, last, run_id, keep)
    finally:
        for df in cached:
            df.unpersist()


def _prepare(spark, cfg, lake, first, last, run_id, keep) -> PreparedNight:
    from pyspark.sql import functions as F

    L, FC = cfg.lake, cfg.features
    changes = keep(read_source_changes(spark, cfg, lake, first, last))
    index_table, users_table, items_table = (  # this lineage's state tables
        cfg.lake.event_index_table, cfg.lake.user_state_table, cfg.lake.item_stats_table)
    prior_ids, prior = _prior_index(lake, changes, first, index_table)
    v = validate(changes, cfg.validation, run_id, trained_types=trained_types(FC), prior_ids=prior_ids, prior=prior)
    keep(v.checked)
    accepted = keep(v.accepted)
    quarantined = keep(v.quarantined)
    events = keep(v.events)
    retractions = keep(v.retractions)

    reasons = {r["reason"]: int(r["count"]) for r in quarantined.groupBy("reason").count().collect()}
    outcomes = {r["outcome"]: int(r["count"]) for r in accepted.groupBy("outcome").count().collect()}
    n_accepted = sum(outcomes.values())
    n_quarantined = sum(reasons.values())
    consumed = n_accepted + n_quarantined
    check_threshold(reasons, consumed, cfg.validation.max_quarantine_fraction)

    # ---- state as of before tonight (time travel past this range's own commits)
    meta = {"run_id": run_id, "source_first": str(first), "source_last": str(last)}
    for table, schema in ((users_table, schemas.USER_STATE), (items_table, schemas.ITEM_STATS)):
        lake.create(table, schema)
    base_users = lake.scan(users_table, version=base_version(lake, users_table, first))
    base_items = lake.scan(items_table, version=base_version(lake, items_table, first))
    touched_users = events.select("user_id").unionByName(retractions.select("user_id")).distinct()
    base_users = keep(base_users.join(F.broadcast(touched_users), "user_id", "left_semi"))
    base_items = keep(base_items)  # catalogue-sized: popularity negatives need all of it

    items = lake.read(L.items_table) if lake.exists(L.items_table) else None
    new_users = keep(next_user_state(base_users, events, retractions, FC))
    new_items = keep(next_item_stats(base_items, events, retractions, FC,
                                items.select("item_id", "text") if items is not None else None))
    stats_after = base_items.join(new_items.select("item_id"), "item_id", "left_anti").unionByName(new_items)
    if items is None:  # no catalogue table: negatives come from every item seen so far
        items = stats_after.select("item_id")

    examples = build_examples(events, retractions, items, FC, run_id, history=base_users,
                              item_stats=stats_after)

    # ---- writes, each idempotent (see the module docstring)
    lake.create(L.quarantine_table, schemas.QUARANTINE_EVENTS)
    lake.write(L.quarantine_table, quarantined, mode="overwrite", replace_where=f"run_id = '{run_id}'",
               schema=schemas.QUARANTINE_EVENTS)
    lake.create(index_table, schemas.EVENT_INDEX)
    lake.write(index_table, v.index, mode="overwrite", replace_where=f"source_version >= {first}",
               schema=schemas.EVENT_INDEX)
    n_users, n_items = new_users.count(), new_items.count()
    if n_users:
        lake.merge(users_table, new_users, ["user_id"], update=True, commit_metadata=meta)
    if n_items:
        lake.merge(items_table, new_items, ["item_id"], update=True, commit_metadata=meta)
    lake.create(L.examples_table, schemas.TRAINING_EXAMPLES, partition_by=["run_id"])
    # A big night (a first run over years of history) is written in slices, so
    # the driver never holds more than ~EXAMPLES_PER_WRITE rows as Arrow. Each
    # slice is a hash range of event ids, itself in the seeded shuffle order.
    expected = outcomes.get("event", 0) * (1 + FC.negatives) + sum(outcomes.values())
    slices = 1 + expected // EXAMPLES_PER_WRITE
    part = F.pmod(F.xxhash64(F.col("event_id"), F.lit(FC.seed + 1)), F.lit(slices))
    for k in range(slices):
        lake.write(L.examples_table, examples.where(part == k) if slices > 1 else examples,
                   mode="overwrite" if k == 0 else "append", replace_where=f"run_id = '{run_id}'" if k == 0 else None,
                   partition_by=["run_id"], schema=schemas.TRAINING_EXAMPLES)

    new_examples = lake.scan(L.examples_table, where=f"run_id = '{run_id}'")  # one partition
    kinds = {r["kind"]: int(r["count"]) for r in new_examples.groupBy("kind").count().collect()}
    causes = {r["cause"]: int(r["count"]) for r in retractions.groupBy("cause").count().collect()}
    stats = {"outcomes": outcomes, "example_kinds": kinds, "retractions": causes,
             "users_updated": n_users, "items_updated": n_items}
    return PreparedNight(run_id, first, last, consumed, n_accepted, n_quarantined, reasons,
                         sum(kinds.values()), new_examples, items, stats)

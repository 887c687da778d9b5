"""The Spark half of a run on real Delta tables (delta-rs) and real Spark:
change semantics (insert, update, delete, cancellation), quarantine reasons,
dedup across runs, schema drift, MERGE state, a second source schema, and
idempotence."""
import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from conftest import make_config

from deltarec.features import validate as V
from deltarec.features.cancellations import cancellation_matches
from deltarec.features.changes import SchemaDriftError
from deltarec.lake import open_lake, schemas
from deltarec.pipeline import delta_job as J

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
T0 = NOW - dt.timedelta(days=3)


def ev(eid, user, item, hours=0.0, etype="purchase", qty=1, price=1.0, rating=None, order="o1"):
    return {"event_id": eid, "user_id": user, "item_id": item, "event_time": T0 + dt.timedelta(hours=hours),
            "event_type": etype, "order_id": order, "quantity": qty, "price": price, "rating": rating}


def table(rows):
    return pa.Table.from_pylist(rows, schema=schemas.BEHAVIOR_EVENTS)


def setup(spark, lake_root, *overrides):
    cfg = make_config(lake_root, "demo.enabled=false", "features.negatives=0", "features.holdout_fraction=0.5",
                      "features.retraction_weight=2.0",
                      "validation.max_change_fraction=1",  # tables of a few rows: any change is a big share
                      *overrides)
    return cfg, open_lake(cfg.lake, spark)


def append(cfg, lake, rows):
    return lake.write(cfg.lake.events_table, table(rows), enable_cdf=True, schema=schemas.BEHAVIOR_EVENTS)


def rows_of(df, *cols):
    return sorted(tuple(r[c] for c in cols) for r in df.collect())


def quarantine(lake, run_id):
    q = lake.read("quarantine_events").where(f"run_id = '{run_id}'")
    return {(r["event_id"], r["change_type"]): r["reason"] for r in q.collect()}


def test_insert_update_delete_semantics(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    append(cfg, lake, [ev("a", "u1", "i1", 1), ev("b", "u1", "i2", 2), ev("c", "u2", "i1", 3),
                       ev("e", None, "i4", 4)])
    n0 = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    assert (n0.accepted, n0.quarantined) == (3, 1)
    dtab = DeltaTable(lake.uri(cfg.lake.events_table))
    dtab.update(predicate="event_id = 'a'", updates={"item_id": "'i9'"})  # v1: a correction of the item
    dtab.update(predicate="event_id = 'b'", updates={"quantity": "5"})  # v2: nothing trainable changed
    dtab.delete("event_id = 'c'")  # v3: a retraction
    dtab.delete("event_id = 'e'")  # v4: deletes an event that was quarantined, never consumed
    n1 = J.prepare_night(spark, cfg, lake, 1, 4, "r1")
    got = rows_of(n1.examples_df, "event_id", "user_id", "item_id", "label", "weight", "kind")
    assert got == [("a", "u1", "i9", 1.0, 1.0, "event"), ("a:r1", "u1", "i1", 0.0, 2.0, "retraction"),
                   ("c:r3", "u2", "i1", 0.0, 2.0, "retraction")]
    assert quarantine(lake, "r1") == {("e", "delete"): V.UNMATCHED_RETRACTION}
    assert n1.stats["outcomes"] == {"event": 1, "correction": 1, "retraction": 1}
    ex = {r["event_id"]: r for r in n1.examples_df.collect()}
    assert ex["a"]["holdout"] == ex["a:r1"]["holdout"]  # an event and its retraction on the same side
    assert ex["a"]["history_ids"] == ["i1", "i2"]  # u1's history from user_state, before tonight
    # MERGE state: u1's history grows by the corrected event; retractions counted
    us = {r["user_id"]: r for r in lake.read(J.USER_STATE_TABLE).collect()}
    assert us["u1"]["history_ids"] == ["i1", "i2", "i9"] and us["u1"]["events"] == 3
    assert us["u2"]["retractions"] == 1 and us["u2"]["events"] == 1
    pop = {r["item_id"]: r["popularity"] for r in lake.read(J.ITEM_STATS_TABLE).collect()}
    assert pop == {"i1": 0, "i2": 1, "i9": 1}  # i1: a moved away, c deleted


def test_cancellation_retracts_the_latest_matching_purchase(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    append(cfg, lake, [ev("p1", "u1", "i1", 1), ev("p2", "u1", "i1", 2), ev("x1", "u1", "i1", 3, "cancel", qty=-1),
                       ev("x2", "u2", "i5", 3, "cancel", qty=-2)])
    n0 = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    got = rows_of(n0.examples_df, "event_id", "kind", "label")
    assert got == [("p1", "event", 1.0), ("p2", "event", 1.0), ("p2:r0", "retraction", 0.0)]
    assert quarantine(lake, "r0") == {("x2", "insert"): V.UNMATCHED_CANCELLATION}
    # the next night: p2 is already retracted, so x3 takes p1 (from the event index); x4 finds nothing
    append(cfg, lake, [ev("x3", "u1", "i1", 5, "cancel", qty=-1), ev("x4", "u1", "i1", 6, "cancel", qty=-1)])
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert rows_of(n1.examples_df, "event_id", "kind") == [("p1:r1", "retraction")]
    assert quarantine(lake, "r1") == {("x4", "insert"): V.UNMATCHED_CANCELLATION}


def test_each_quarantine_reason(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "validation.horizon_days=30", "validation.id_pattern='[A-Za-z0-9_-]+'",
                      "validation.max_quarantine_fraction=1.0")
    future = ev("future", "u", "i")
    future["event_time"] = NOW + dt.timedelta(days=2)
    old = ev("old", "u", "i")
    old["event_time"] = NOW - dt.timedelta(days=40)
    notime = ev("notime", "u", "i")
    notime["event_time"] = None
    want = {
        None: V.NULL_EVENT_ID, "ctl": V.MALFORMED_ID, "x" * 200: V.MALFORMED_ID, "pat": V.MALFORMED_ID,
        "qty": V.NON_POSITIVE_QUANTITY, "price": V.NON_POSITIVE_PRICE, "nouser": V.NULL_USER_ID,
        "noitem": V.NULL_ITEM_ID, "notime": V.NULL_EVENT_TIME, "type": V.UNKNOWN_EVENT_TYPE,
        "future": V.FUTURE_TIMESTAMP, "old": V.TOO_LATE,
    }
    append(cfg, lake, [
        ev(None, "u", "i"), ev("ctl", "u\x07", "i"), ev("x" * 200, "u", "i"), ev("pat", "u", "i 1"),
        ev("qty", "u", "i", qty=0), ev("price", "u", "i", price=-1.0), ev("nouser", " ", "i"),
        ev("noitem", "u", None), notime, ev("type", "u", "i", etype="bogus"), future, old,
        ev("ok", "u", "i", 1), ev("ok", "u", "i", 2),  # the second is a duplicate within the night
    ])
    n0 = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    q = lake.read("quarantine_events").where("run_id = 'r0'").collect()
    assert {r["event_id"]: r["reason"] for r in q if r["event_id"] != "ok"} == want
    assert [r["reason"] for r in q if r["event_id"] == "ok"] == [V.DUPLICATE_EVENT_ID]
    kept = [r["event_time"] for r in n0.examples_df.collect()]
    dup = [r["event_time"] for r in q if r["event_id"] == "ok"]
    assert len(kept) == 1 and kept[0] < dup[0]  # the first of the two "ok" rows wins
    # an id consumed by an earlier run is a duplicate too; a new one is not
    append(cfg, lake, [ev("ok", "u", "i", 3), ev("new", "u", "i", 4)])
    J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert quarantine(lake, "r1") == {("ok", "insert"): V.DUPLICATE_EVENT_ID}


def test_schema_addition_is_carried_and_type_change_fails(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    append(cfg, lake, [ev("a", "u1", "i1")])
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    extra = table([ev("b", "u1", "i2", 1)]).append_column("channel", pa.array(["web"]))
    write_deltalake(lake.uri(cfg.lake.events_table), extra, mode="append", schema_mode="merge")
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert rows_of(n1.examples_df, "event_id") == [("b",)]
    changed = table([ev("c", "u1", "i3", 2)])
    changed = changed.set_column(changed.schema.get_field_index("quantity"), "quantity", pa.array(["1"]))
    write_deltalake(lake.uri(cfg.lake.events_table), changed, mode="overwrite", schema_mode="overwrite")
    with pytest.raises(SchemaDriftError) as e:
        J.prepare_night(spark, cfg, lake, 2, 2, "r2")
    assert "'quantity' was bigint and is now string" in str(e.value)


def snapshot(lake, run_ids):
    def rows(name, where=None):
        df = lake.read(name)
        if where:
            df = df.where(where)
        return sorted((tuple(r) for r in df.collect()), key=repr)

    sel = "run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")"
    return {t: rows(t) for t in (J.USER_STATE_TABLE, J.ITEM_STATS_TABLE, J.EVENT_INDEX_TABLE)} | {
        "training_examples": rows("training_examples", sel), "quarantine_events": rows("quarantine_events", sel)}


def test_rerun_leaves_the_lake_as_one_run(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "features.negatives=2", "features.negative_sampling=popularity",
                      "features.time_decay_half_life_days=1.0")
    append(cfg, lake, [ev(f"e{k}", f"u{k % 3}", f"i{k % 4}", k) for k in range(8)] + [ev("bad", None, "i1")])
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    append(cfg, lake, [ev("n1", "u1", "i2", 10), ev("n2", "u5", "i3", 11), ev("xc", "u0", "i0", 12, "cancel"),
                       ev("bad2", "u1", "i1", 13, qty=-3)])
    DeltaTable(lake.uri(cfg.lake.events_table)).delete("event_id = 'e1'")
    adaptive, partitions = spark.conf.get(J.ADAPTIVE), spark.conf.get(J.SHUFFLE)
    held = set(spark.sparkContext._jsc.getPersistentRDDs().keySet())
    first = J.prepare_night(spark, cfg, lake, 1, 2, "r1")
    assert first.stats["adaptive_off"] and spark.conf.get(J.ADAPTIVE) == adaptive  # restored
    # a small night shuffles into spark.small_night_partitions: one file per staged write; then restored
    assert first.stats["shuffle_partitions"] == cfg.spark.small_night_partitions == 1 != int(partitions)
    assert spark.conf.get(J.SHUFFLE) == partitions and len(lake.data_files("training_examples", {"run_id": "r1"})) == 1
    # what the night cached or cut (local checkpoints) is released: training gets the executors' memory back
    # (only the night's own: an earlier test's RDD may be cleaned by Spark's ContextCleaner meanwhile, once
    # its handles are garbage collected: the full suite saw two go during this night)
    assert set(spark.sparkContext._jsc.getPersistentRDDs().keySet()) - held == set()
    once = snapshot(lake, ["r0", "r1"])
    on = cfg.replace(spark=cfg.spark.replace(adaptive_min_rows=0))  # the rerun with adaptive execution
    again = J.prepare_night(spark, on, lake, 1, 2, "r1")
    assert not again.stats["adaptive_off"] and again.stats["shuffle_partitions"] == int(partitions)
    assert snapshot(lake, ["r0", "r1"]) == once
    assert (again.consumed, again.examples, again.reasons) == (first.consumed, first.examples, first.reasons)
    kinds = first.stats["example_kinds"]
    assert kinds["negative"] == 2 * kinds["event"] and kinds["retraction"] == 2  # the delete and the cancel


def test_labels_history_decay_and_popularity_negatives(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "features.negatives=4", "features.negative_sampling=popularity",
                      "features.time_decay_half_life_days=1.0", "features.history_length=2",
                      "features.history_before=time")
    rows = [ev(f"h{k}", f"v{k}", "hot", 0.01 * k) for k in range(60)] + [ev("c1", "w", "cold1"), ev("c2", "w", "cold2")]
    append(cfg, lake, rows)
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    append(cfg, lake, [ev("a1", "w", "cold1", 24), ev("a2", "w", "hot", 48), ev("a3", "w", "cold2", 72),
                       ev("k1", "w", "x", 60, etype="click"), ev("b1", "w", "p", 72), ev("b2", "w", "q", 72)])
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    ex = {r["event_id"]: r for r in n1.examples_df.collect()}
    # history: user_state before tonight ([cold1, cold2]) then tonight's earlier events, last 2
    assert ex["a1"]["history_ids"] == ["cold1", "cold2"]
    assert ex["a2"]["history_ids"] == ["cold2", "cold1"]
    assert ex["a3"]["history_ids"] == ["hot", "x"]  # the click (t=60h) came before a3 (t=72h)
    # one basket (same user and time as a3): no line of it is another's past
    assert ex["b1"]["history_ids"] == ex["b2"]["history_ids"] == ["hot", "x"]
    assert ex["b2"]["history_idx"] == [ex["a2"]["item_idx"], ex["k1"]["item_idx"]]
    # half-life 1 day, measured back from the night's newest event (a3)
    assert ex["a3"]["weight"] == pytest.approx(1.0) and ex["a1"]["weight"] == pytest.approx(0.25)
    negs = [r for r in ex.values() if r["kind"] == "negative"]
    assert len(negs) == 4 * 6 and all(r["weight"] == ex[r["event_id"].split(":")[0]]["weight"] for r in negs)
    hot = sum(r["item_id"] == "hot" for r in negs) / len(negs)
    assert hot > 0.6  # popularity 61 of 68 (uniform over the 6 items would give 0.17)


def test_ratings_source_through_the_column_mapping(spark, lake_root):
    cfg, lake = setup(
        spark, lake_root, "source.columns.user_id=user", "source.columns.item_id=movie",
        "source.columns.event_time=ts", "source.columns.rating=stars", "source.columns.default_event_type=rating",
        "features.rating.threshold=4")
    ts = int((T0).timestamp())
    ratings = pa.table({"user": ["1", "1", "2", "3"], "movie": ["m1", "m2", "m1", "m3"],
                        "stars": ["5", "2", "4", "five"], "ts": pa.array([ts, ts + 60, ts + 120, ts + 180], pa.int64())})
    lake.write(cfg.lake.events_table, ratings, enable_cdf=True)
    n0 = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    got = rows_of(n0.examples_df, "user_id", "item_id", "label", "kind")
    assert got == [("1", "m1", 1.0, "event"), ("1", "m2", 0.0, "event"), ("2", "m1", 1.0, "event")]
    q = lake.read("quarantine_events").collect()
    assert [(r["reason"], r["detail"]) for r in q] == [(V.TYPE_MISMATCH, "rating: stars=five is not double")]
    # a re-rating is a correction: the old label is retracted, the new one trained
    DeltaTable(lake.uri(cfg.lake.events_table)).update(predicate="movie = 'm2'", updates={"stars": "'5'"})
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert rows_of(n1.examples_df, "user_id", "item_id", "label", "kind") == [
        ("1", "m2", 0.0, "retraction"), ("1", "m2", 1.0, "event")]
    assert [r["history_ids"] for r in n1.examples_df.collect()] == [["m1", "m2"]] * 2


def test_cancellation_after_a_correction_judges_the_newest_row(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    append(cfg, lake, [ev("p1", "u1", "i1", 1)])
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    DeltaTable(lake.uri(cfg.lake.events_table)).update(predicate="event_id = 'p1'", updates={"item_id": "'i2'"})
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert rows_of(n1.examples_df, "event_id", "item_id", "kind") == [("p1", "i2", "event"),
                                                                      ("p1:r1", "i1", "retraction")]
    # p1 no longer holds (u1, i1): cancelling that pair finds nothing; cancelling (u1, i2) retracts p1
    append(cfg, lake, [ev("x1", "u1", "i1", 5, "cancel", qty=-1), ev("x2", "u1", "i2", 5, "cancel", qty=-1)])
    n2 = J.prepare_night(spark, cfg, lake, 2, 2, "r2")
    assert rows_of(n2.examples_df, "event_id", "item_id", "kind") == [("p1:r2", "i2", "retraction")]
    assert quarantine(lake, "r2") == {("x1", "insert"): V.UNMATCHED_CANCELLATION}


def test_index_lookup_reads_only_the_keys_rows(spark, lake_root):
    from deltarec.lake.engine import LakeEngine

    cfg, lake = setup(spark, lake_root)
    rows = pa.Table.from_pylist([{"k": f"k{n}", "u": f"u{n % 3}", "v": n, "h": [f"i{n}"] * (n % 2)}
                                 for n in range(3000)])
    lake.write("lk", rows.slice(0, 1500))
    lake.write("lk", rows.slice(1500))
    few = pa.table({"k": ["k7", "k2999", "nope", None, "k7"]})  # an IN list in the scan
    many = pa.table({"k": [f"k{n}" for n in range(0, 6000, 2)]})  # above the IN-list size: joined in Arrow
    pairs = pa.table({"u": ["u1", "u2"], "k": ["k1", "k1"]})  # two key columns
    for keys, where, want in ((few, None, {7, 2999}), (many, "v >= 1000", set(range(1000, 3000, 2))),
                              (pairs, None, {1}), (few.slice(0, 0), None, set())):
        got = lake.lookup("lk", keys, ["v", "h"], where)
        assert got.column_names == ["v", "h"] and set(got["v"].to_pylist()) == want and got.num_rows == len(want)
        assert got["h"].to_pylist() == [[f"i{n}"] * (n % 2) for n in got["v"].to_pylist()]
        # the engines' shared default (a Spark semi-join) returns the same rows
        spark_side = LakeEngine.lookup(lake, "lk", keys, ["v", "h"], where)
        assert sorted(spark_side["v"].to_pylist()) == sorted(got["v"].to_pylist())
    assert lake.lookup("lk", few, version=0).num_rows == 1  # time travel: k2999 came in version 1


def test_late_cancellation_takes_the_purchase_at_or_before_it(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    append(cfg, lake, [ev("p0", "u1", "i1", 0.5), ev("p1", "u1", "i1", 1), ev("p2", "u1", "i1", 10),
                       ev("q1", "u2", "i1", 1)])
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    # x1 arrives late (5h, between p1 and p2); x2 (20h) takes the newest; x3 (0.1h) precedes every purchase
    append(cfg, lake, [ev("x1", "u1", "i1", 5, "cancel", qty=-1), ev("x2", "u1", "i1", 20, "cancel", qty=-1),
                       ev("x3", "u1", "i1", 0.1, "cancel", qty=-1)])
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert rows_of(n1.examples_df, "event_id", "kind") == [("p1:r1", "retraction"), ("p2:r1", "retraction")]
    assert quarantine(lake, "r1") == {("x3", "insert"): V.UNMATCHED_CANCELLATION}


def test_history_negatives_come_from_the_users_own_past_items(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "features.negatives=2", "features.history_negatives=3",
                      "features.history_length=5")
    append(cfg, lake, [ev("p1", "w", "a"), ev("p2", "w", "b", 1), ev("p3", "w", "c", 2), ev("p4", "w", "a", 3),
                       ev("z1", "v", "d", 1), ev("z2", "v", "e", 1)])
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    append(cfg, lake, [ev("t1", "w", "b", 24), ev("t2", "v", "f", 24)])
    n1 = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    ex = [{**r.asDict(), "src": r["event_id"].split(":")[0]} for r in n1.examples_df.collect()]
    hist = [r for r in ex if ":h" in r["event_id"]]
    # w's past items other than tonight's b: {a, c}; v's past {d, e}
    assert sorted(r["event_id"] for r in hist) == [f"{e}:h{j}" for e in ("t1", "t2") for j in range(3)]
    by_src = {"t1": {"a", "c"}, "t2": {"d", "e"}}
    assert all(r["item_id"] in by_src[r["src"]] and r["label"] == 0.0 and r["kind"] == "negative" for r in hist)
    assert {r["item_id"] for r in hist if r["src"] == "t1"} == {"a", "c"}  # both drawn in 3 tries (seeded)
    n_items = len({"a", "b", "c", "d", "e", "f"})  # the catalogue the uniform negatives are drawn from
    # weight: uniform negatives put negatives / n_items on each item; history ones as much on each past item
    assert all(r["weight"] == pytest.approx(2 * 2 / (n_items * 3)) for r in hist)
    pos = {r["event_id"]: r for r in ex if r["kind"] == "event"}
    assert all(r["history_ids"] == pos[r["src"]]["history_ids"] for r in hist)
    assert {r["item_idx"] for r in hist if r["item_id"] == "a"} == {
        i for p, i in zip(pos["t1"]["history_ids"], pos["t1"]["history_idx"]) if p == "a"}
    # a later rerun of the same range gives the same rows (seeded by event id)
    again = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert rows_of(again.examples_df, "event_id", "item_id", "weight") == rows_of(n1.examples_df, "event_id", "item_id", "weight")


def test_history_before_the_events_day_or_its_time(spark, lake_root):
    """history_before=day: an event's history is what a nightly model serves it
    with, everything before its day; =time: everything before its time. Never
    the rest of its own basket."""
    day = dt.datetime.combine((NOW - dt.timedelta(days=3)).date(), dt.time(), NOW.tzinfo)
    hours = lambda h: (day + dt.timedelta(hours=h) - T0).total_seconds() / 3600  # noqa: E731 (ev() counts from T0)
    rows = [ev("x", "u", "ix", hours(1)), ev("y1", "u", "iy", hours(5)), ev("y2", "u", "iy2", hours(5)),
            ev("z", "u", "iz", hours(30))]
    got = {}
    for mode in ("day", "time"):
        cfg, lake = setup(spark, Path(lake_root) / mode, "features.history_length=5", f"features.history_before={mode}")
        append(cfg, lake, rows)
        n0 = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
        got[mode] = {r["event_id"]: r["history_ids"] for r in n0.examples_df.collect()}
    assert got["day"] == {"x": [], "y1": [], "y2": [], "z": ["ix", "iy", "iy2"]}
    assert got["time"] == {"x": [], "y1": ["ix"], "y2": ["ix"], "z": ["ix", "iy", "iy2"]}


def test_the_cancellation_rule(spark):
    """The rule validate applies, in Spark: the latest purchase in force at or
    before the cancellation (in time and version), judged by each event's
    newest row, one purchase per cancellation and the earliest cancellation
    first."""
    def h(hours):
        return T0 + dt.timedelta(hours=hours)

    def idx(eid, user, item, hours, version, trained=True, etype="purchase"):
        return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype, "event_time": h(hours),
                "rating": None, "trained": trained, "source_version": version}

    rows = pa.Table.from_pylist([
        idx("p0", "u1", "i1", 0.5, 0), idx("p1", "u1", "i1", 1, 0), idx("p2", "u1", "i1", 10, 0),
        idx("c1", "u1", "i1", 12, 0), idx("c1", "u1", "i2", 12, 1),  # corrected to i2: no longer holds (u1, i1)
        idx("r1", "u1", "i1", 15, 0), idx("r1", "u1", "i1", 15, 1, trained=False),  # retracted at version 1
        idx("late", "u1", "i1", 18, 5),  # a purchase committed after the cancellations below
        idx("t1", "u2", "i1", 3, 0), idx("t2", "u2", "i1", 3, 1),  # same time: the newer version wins
        idx("v1", "u3", "i1", 3, 0, etype="click"),  # not a purchase
    ], schema=schemas.EVENT_INDEX)
    cancels = pa.Table.from_pylist([
        {"event_id": "x1", "user_id": "u1", "item_id": "i1", "event_time": h(5), "source_version": 2},   # -> p1
        {"event_id": "x2", "user_id": "u1", "item_id": "i1", "event_time": h(20), "source_version": 2},  # -> p2
        {"event_id": "x3", "user_id": "u1", "item_id": "i1", "event_time": h(0.1), "source_version": 2},  # none
        {"event_id": "x0", "user_id": "u1", "item_id": "i1", "event_time": h(4), "source_version": 2},  # claims p1
        {"event_id": "y1", "user_id": "u1", "item_id": "i2", "event_time": h(13), "source_version": 2},  # -> c1
        {"event_id": "z1", "user_id": "u2", "item_id": "i1", "event_time": h(4), "source_version": 2},  # -> t2
        {"event_id": "w1", "user_id": "u3", "item_id": "i1", "event_time": h(4), "source_version": 2},  # none
    ], schema=pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
                         ("event_time", schemas.TS), ("source_version", pa.int64())]))
    got = [r.asDict() for r in cancellation_matches(spark.createDataFrame(cancels),
                                                    spark.createDataFrame(rows)).collect()]
    pairs = {r["_cancel_id"]: r["event_id"] for r in got}
    # x0 (4h) and x1 (5h) both pick p1: the earlier x0 claims it, x1 matches nothing
    assert pairs == {"x0": "p1", "x2": "p2", "y1": "c1", "z1": "t2"}
    by_cancel = {r["_cancel_id"]: r for r in got}
    utc = dt.timezone.utc
    assert by_cancel["x2"]["_purchase_time"].astimezone(utc) == h(10)
    assert by_cancel["x2"]["event_time"].astimezone(utc) == h(20)
    assert by_cancel["x2"]["_cv"] == 2 and by_cancel["y1"]["user_id"] == "u1" and by_cancel["y1"]["item_id"] == "i2"
    # nothing known: nothing matched
    assert cancellation_matches(spark.createDataFrame(cancels), spark.createDataFrame(rows.slice(0, 0))).count() == 0


def rule_by_hand(cancels: pa.Table, rows: pa.Table) -> tuple[dict, dict]:
    """The cancellation rule as plain loops (the oracle): each cancellation's
    pick, and the matches once the earliest cancellation claims a purchase
    several picked."""
    events: dict[str, list] = {}
    for r in rows.to_pylist():
        events.setdefault(r["event_id"], []).append(r)
    held = []
    for rs in events.values():
        newest = max(rs, key=lambda r: (r["source_version"], not r["trained"]))  # one version: not in force first
        if newest["trained"] and newest["event_type"] == "purchase":
            held.append(newest)
    picks = {}
    for x in cancels.to_pylist():
        cand = [p for p in held if (p["user_id"], p["item_id"]) == (x["user_id"], x["item_id"])
                and p["event_time"] <= x["event_time"] and p["source_version"] <= x["source_version"]]
        if cand:
            best = max(cand, key=lambda p: (p["event_time"], p["source_version"], p["event_id"]))
            picks[x["event_id"]] = (best["event_id"], (x["event_time"], x["source_version"], x["event_id"]))
    claims: dict[str, tuple] = {}
    for cid, (eid, key) in picks.items():
        if eid not in claims or key < claims[eid]:
            claims[eid] = key
    return {cid: eid for cid, (eid, _) in picks.items()}, {key[2]: eid for eid, key in claims.items()}


def test_the_rule_in_spark_is_the_rule_by_hand(spark):
    """The delta job pre-selects earlier runs' purchases with
    ``latest_purchases`` and validate applies ``cancellation_matches``, both
    in Spark (nothing reaches the driver): on random histories with
    corrections, retractions, ties in time and several cancellations per
    pair, they give what the rule written as plain loops gives."""
    import numpy as np

    from deltarec.features.cancellations import latest_purchases

    rng = np.random.default_rng(7)
    rows = []
    for k in range(300):  # 40 events of 3 users x 2 items, 7-8 rows each (corrections, retractions)
        eid = f"e{k % 40}"
        rows.append({"event_id": eid, "user_id": f"u{rng.integers(3)}", "item_id": f"i{rng.integers(2)}",
                     "event_type": str(rng.choice(["purchase", "purchase", "click"])),
                     "event_time": T0 + dt.timedelta(hours=int(rng.integers(20))), "rating": None,
                     "trained": bool(rng.random() < 0.8), "source_version": k // 40})  # an event's row per version
    rows = pa.Table.from_pylist(rows, schema=schemas.EVENT_INDEX)
    cancels = pa.Table.from_pylist([
        {"event_id": f"x{k}", "user_id": f"u{rng.integers(3)}", "item_id": f"i{rng.integers(2)}",
         "event_time": T0 + dt.timedelta(hours=int(rng.integers(24))), "source_version": int(rng.integers(3, 9))}
        for k in range(25)], schema=pa.schema([("event_id", pa.string()), ("user_id", pa.string()),
                                               ("item_id", pa.string()), ("event_time", schemas.TS),
                                               ("source_version", pa.int64())]))
    picks, matches = rule_by_hand(cancels, rows)
    assert len(picks) >= 5 and len(matches) < len(picks), (picks, matches)  # some claims were contested
    sc, sr = spark.createDataFrame(cancels), spark.createDataFrame(rows)
    assert {r["_cancel_id"]: r["event_id"] for r in latest_purchases(sc, sr).collect()} == picks
    assert {r["_cancel_id"]: r["event_id"] for r in cancellation_matches(sc, sr).collect()} == matches


def test_unchanged_rewrites_cancel_by_the_kth_rule(spark):
    """cancel_rewrites: the k-th delete of a content pairs with its k-th insert
    when the insert is not earlier; the pairs leave the changes, one row each
    is counted, and everything else stays exactly once."""
    from deltarec.features.changes import cancel_rewrites

    def row(kind, v, event, qty=1):
        return (f"e{event}", "u1", f"i{event}", "purchase", dt.datetime(2024, 1, 1), qty, kind, v)

    rows = [
        row("delete", 1, 1), row("insert", 1, 1),  # same commit (an overwrite): pair
        row("delete", 1, 2), row("insert", 2, 2),  # rewritten a commit later: pair
        row("insert", 1, 3), row("delete", 2, 3),  # inserted, then deleted: no pair
        row("delete", 1, 4), row("delete", 2, 4), row("insert", 3, 4),  # 2 deletes, 1 insert: one pair
        row("delete", 1, 5), row("insert", 1, 5, qty=2),  # content changed: no pair
        row("update_preimage", 2, 6), row("update_postimage", 2, 6),  # updates never pair
        row("insert", 3, 7),  # alone
    ]
    cols = "event_id string, user_id string, item_id string, event_type string, event_time timestamp, " \
           "quantity int, _change_type string, _commit_version long"
    kept, pairs = cancel_rewrites(spark.createDataFrame(rows, cols))

    def key(r):
        return (r[0], r[6], r[7], r[5])

    # the rule by hand
    left, n_pairs = list(rows), 0
    for content in {r[:6] for r in rows}:
        dels = sorted((r for r in left if r[:6] == content and r[6] == "delete"), key=lambda r: r[7])
        ins = sorted((r for r in left if r[:6] == content and r[6] == "insert"), key=lambda r: r[7])
        for d, i in zip(dels, ins):
            if d[7] <= i[7]:
                left.remove(d), left.remove(i)
                n_pairs += 1
    got = sorted(key(tuple(r[c] for c in ("event_id", "user_id", "item_id", "event_type", "event_time",
                                         "quantity", "_change_type", "_commit_version"))) for r in kept.collect())
    assert got == sorted(key(r) for r in left)
    assert pairs.count() == n_pairs == 3
    assert set(kept.columns) == {c.split()[0] for c in cols.split(", ")}  # no helper columns leak
    assert {("e3", "insert"), ("e3", "delete"), ("e4", "delete"), ("e5", "delete"), ("e5", "insert"),
            ("e6", "update_preimage"), ("e6", "update_postimage"), ("e7", "insert")} == {(k[0], k[1]) for k in got}

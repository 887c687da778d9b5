"""The lake interface as a contract: one suite, run against every engine.

As delta-io runs one test mixin against two clients, each test here takes a
``lake`` parametrised over the engines and holds it to what the rest of
deltarec relies on: the change feed (inserts, update pre/post images,
deletes), write modes and replaceWhere, MERGE (insert-only and upsert) and its
counts, lookup, scan, time travel, the files of a partition, history, commit
metadata read back, two writers racing for one key, delete.

delta-rs runs everywhere (with the shared SparkSession where the interface
returns DataFrames). delta-spark runs where Delta Lake's jars are configured:
``DELTAREC_DELTA_JARS`` (README "Tests") gives them to the shared session when
it starts (one SparkContext per process), and the engine works in its own
session of that context. Without the jars its parametrisation is skipped,
saying why.
"""
import datetime as dt
import importlib.util
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltarec.config import LakeConfig
from deltarec.lake import ConcurrentRunError, LakeError, open_lake, schemas
from deltarec.lake.engine import CHANGE_COLUMNS

DELTA_JARS = os.environ.get("DELTAREC_DELTA_JARS")
NO_JARS = ("delta-spark needs Delta Lake's jars: set DELTAREC_DELTA_JARS to them, comma-separated (README "
           "'Tests'); Maven Central is not reachable here and no PyPI package ships them")
ENGINES = ["delta-rs", pytest.param("delta-spark", marks=pytest.mark.skipif(not DELTA_JARS, reason=NO_JARS))]

T0 = dt.datetime(2011, 1, 1, tzinfo=dt.timezone.utc)
EVENTS = schemas.BEHAVIOR_EVENTS
# A partitioned table with a list column, like training_examples.
EXAMPLES = pa.schema([("run_id", pa.string()), ("event_id", pa.string()), ("label", pa.float32()),
                      ("history_idx", pa.list_(pa.int64()))])
KEYED = pa.schema([("model", pa.string()), ("first", pa.int64()), ("note", pa.string())])


@pytest.fixture(scope="module")
def delta_session(spark):
    """delta-spark's own session of the shared context: its own SQL conf, so
    the userMetadata a MERGE sets never reaches the other engine's session."""
    if importlib.util.find_spec("delta") is None:
        pytest.fail("DELTAREC_DELTA_JARS is set but the `delta` Python module is missing: "
                    "pip install delta-spark==4.4.1 (the jars' Python half)")
    return spark.newSession()


@pytest.fixture(params=ENGINES)
def lake(request, spark, tmp_path):
    session = spark if request.param == "delta-rs" else request.getfixturevalue("delta_session")
    engine = open_lake(LakeConfig(root=str(tmp_path / "lake"), engine=request.param), session)
    assert engine.name == request.param
    return engine


def events(ids, user="u1", qty=1):
    n = len(ids)
    return pa.table({
        "event_id": ids, "user_id": [user] * n, "item_id": [f"i-{i}" for i in ids],
        "event_time": pa.array([T0] * n, schemas.TS), "event_type": ["purchase"] * n,
        "order_id": ["o1"] * n, "quantity": pa.array([qty] * n, pa.int64()), "price": [1.0] * n,
        "rating": pa.nulls(n, pa.float64()),
    }, schema=EVENTS)


def examples(run, n):
    return pa.table({"run_id": [run] * n, "event_id": [f"{run}-{i}" for i in range(n)],
                     "label": pa.array([1.0] * n, pa.float32()),
                     "history_idx": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64()))},
                    schema=EXAMPLES)


def keyed(*rows):
    return pa.table({"model": [r[0] for r in rows], "first": pa.array([r[1] for r in rows], pa.int64()),
                     "note": [r[2] for r in rows]}, schema=KEYED)


def rows(data, *cols):
    """Sorted tuples of ``cols`` from a Spark DataFrame or an Arrow table."""
    if isinstance(data, pa.Table):
        return sorted(tuple(r[c] for c in cols) for r in data.select(list(cols)).to_pylist())
    return sorted(tuple(r) for r in data.select(*cols).collect())


def ids(data):
    return [r[0] for r in rows(data, "event_id")]


# ------------------------------------------------------------ tables and versions
def test_a_missing_table_is_absent_and_named_in_errors(lake):
    assert not lake.exists("nope") and lake.version("nope") is None
    for call in (lambda: lake.read("nope"), lambda: lake.read_arrow("nope"), lambda: lake.history("nope"),
                 lambda: lake.read_changes("nope", 0, 0), lambda: lake.scan("nope"),
                 lambda: lake.merge("nope", keyed(("m", 0, "x")), ["model"], update=False)):
        with pytest.raises(LakeError, match="'nope'"):
            call()


def test_create_is_idempotent_and_gives_an_empty_table_of_the_schema(lake):
    lake.create("ex", EXAMPLES, partition_by=["run_id"])
    v = lake.version("ex")
    lake.create("ex", EXAMPLES, partition_by=["run_id"])
    assert lake.exists("ex") and lake.version("ex") == v
    empty = lake.read_arrow("ex")
    assert empty.num_rows == 0 and [(f.name, f.type) for f in empty.schema] == [(f.name, f.type) for f in EXAMPLES]
    assert lake.scan("ex").columns == EXAMPLES.names


def test_write_returns_the_new_version_and_keeps_the_schema(lake, spark):
    v0 = lake.write("events", events(["a", "b"]))
    assert v0 == lake.version("events")
    # a Spark DataFrame with its columns shuffled, one too many and one of another type: cast to the schema
    c = events(["c"])
    c = c.set_column(c.schema.get_field_index("quantity"), "quantity", pa.array([1], pa.int32()))
    extra = spark.createDataFrame(c.append_column("junk", pa.array(["?"])))
    v1 = lake.write("events", extra.select("junk", *reversed(EVENTS.names)), schema=EVENTS)
    assert v1 == v0 + 1 == lake.version("events")
    got = lake.read_arrow("events")
    assert [(f.name, f.type) for f in got.schema] == [(f.name, f.type) for f in EVENTS]
    assert ids(got) == ["a", "b", "c"]
    assert rows(got, "event_id", "event_time", "quantity", "rating")[0] == ("a", T0, 1, None)


# ------------------------------------------------------------ change data feed
def test_change_feed_gives_inserts_update_images_and_deletes(lake):
    v0 = lake.write("events", events(["a", "b"]), enable_cdf=True)
    v1 = lake.write("events", events(["c"]))
    lake.merge("events", events(["a"], qty=5), ["event_id"], update=True)
    v2 = lake.version("events")
    assert lake.delete("events", "event_id = 'b'") == 1
    v3 = lake.version("events")
    assert v0 < v1 < v2 < v3

    changes = lake.read_changes("events", v1, v3)
    assert changes.columns == EVENTS.names + list(CHANGE_COLUMNS)
    assert rows(changes, "_change_type", "event_id", "_commit_version", "quantity") == [
        ("delete", "b", v3, 1), ("insert", "c", v1, 1),
        ("update_postimage", "a", v2, 5), ("update_preimage", "a", v2, 1)]
    # the feed is on from the table's first version: the first rows are in it too
    assert rows(lake.read_changes("events", 0, v0), "_change_type", "event_id") == [("insert", "a"), ("insert", "b")]
    assert rows(lake.read_changes("events", v3, v3), "_change_type", "event_id") == [("delete", "b")]
    for first, last in ((v3, v3 + 1), (v2, v1), (-1, v1)):
        with pytest.raises(LakeError, match="version"):
            lake.read_changes("events", first, last)


def test_time_travel_reads_each_version_as_it_was(lake):
    v0 = lake.write("events", events(["a", "b"]))
    v1 = lake.write("events", events(["c"]))
    lake.delete("events", "event_id = 'a'")
    assert ids(lake.read("events", version=v0)) == ["a", "b"]
    assert ids(lake.read("events", version=v1)) == ["a", "b", "c"]
    assert ids(lake.read("events")) == ["b", "c"]
    assert ids(lake.read_arrow("events", version=v0)) == ["a", "b"]
    assert ids(lake.scan("events", columns=["event_id"], where="event_id <> 'b'", version=v1)) == ["a", "c"]
    for bad in (-1, lake.version("events") + 1):
        with pytest.raises(LakeError, match="versions 0.."):
            lake.read("events", version=bad)


# ------------------------------------------------------------ write modes, files
def test_replace_where_rewrites_one_partition_and_overwrite_all(lake):
    lake.create("ex", EXAMPLES, partition_by=["run_id"])
    for run, n in (("r1", 3), ("r2", 2), ("r1", 4)):  # r1 written twice: the rerun replaces it
        lake.write("ex", examples(run, n), mode="overwrite", replace_where=f"run_id = '{run}'", partition_by=["run_id"])
    assert {r: lake.read_arrow("ex", filters=[("run_id", "=", r)]).num_rows for r in ("r1", "r2")} == {"r1": 4, "r2": 2}
    got = lake.read_arrow("ex", filters=[("run_id", "=", "r2")])
    assert rows(got, "event_id", "history_idx") == [("r2-0", [0, 1]), ("r2-1", [1, 2])]
    lake.write("ex", examples("r3", 1), mode="overwrite", partition_by=["run_id"])
    assert ids(lake.read("ex")) == ["r3-0"]


def _file_ids(files):
    # pyarrow opens local paths and file:/ URIs alike; the partition column lives in the path
    return sorted(i for f in files for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist())


def test_data_files_are_the_current_files_of_one_partition(lake):
    lake.create("ex", EXAMPLES, partition_by=["run_id"])
    for run, n in (("r1", 3), ("r2", 2), ("r1", 4)):
        lake.write("ex", examples(run, n), mode="overwrite", replace_where=f"run_id = '{run}'", partition_by=["run_id"])
    r1 = lake.data_files("ex", {"run_id": "r1"})
    assert r1 and all("run_id=r1" in f for f in r1)
    assert _file_ids(r1) == [f"r1-{i}" for i in range(4)]  # the rerun's files only, not the replaced ones
    assert _file_ids(lake.data_files("ex", {"run_id": "r2"})) == ["r2-0", "r2-1"]
    assert _file_ids(lake.data_files("ex")) == ids(lake.read("ex"))
    assert lake.data_files("ex", {"run_id": "r9"}) == []


def test_snapshot_files_are_the_files_of_a_past_version(lake):
    """What `registry reproduce` checks a run's training files against."""
    lake.create("ex", EXAMPLES, partition_by=["run_id"])
    v1 = lake.write("ex", examples("r1", 3), mode="overwrite", replace_where="run_id = 'r1'", partition_by=["run_id"])
    then = lake.data_files("ex")
    v2 = lake.write("ex", examples("r1", 2), mode="overwrite", replace_where="run_id = 'r1'", partition_by=["run_id"])
    strip = lambda fs: sorted(f.removeprefix("file://").removeprefix("file:") for f in fs)  # noqa: E731
    assert strip(lake.snapshot_files("ex", v1)) == strip(then) and _file_ids(then) == ["r1-0", "r1-1", "r1-2"]
    assert strip(lake.snapshot_files("ex", v2)) == strip(lake.data_files("ex")) != strip(then)


def test_replace_partition_writes_from_the_executors_and_replaces_only_that_partition(lake, spark):
    lake.create("ex", EXAMPLES, partition_by=["run_id"])
    lake.write("ex", examples("r2", 2), partition_by=["run_id"])
    night = spark.createDataFrame(examples("r1", 7)).repartition(3, "event_id").orderBy("event_id")
    got = lake.replace_partition("ex", night, {"run_id": "r1"}, EXAMPLES, count_by="label")
    assert got["rows"] == 7 and got["counts"] == {"1.0": 7} and got["version"] == lake.version("ex")
    files = lake.data_files("ex", {"run_id": "r1"})
    assert len(files) == got["files"] and got["files"] >= 1
    # sorted file paths keep the DataFrame's order (a worker's shard is a contiguous slice of it)
    assert [i for f in files for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist()] == \
        sorted(f"r1-{i}" for i in range(7))
    assert rows(lake.read("ex"), "event_id", "history_idx")[:2] == [("r1-0", [0, 1]), ("r1-1", [1, 2])]
    part = lake.read_partition("ex", {"run_id": "r1"})  # what the night hands on: read by the executors
    assert part.columns == EXAMPLES.names and rows(part, "run_id", "event_id", "history_idx")[:2] == [
        ("r1", "r1-0", [0, 1]), ("r1", "r1-1", [1, 2])] and part.count() == 7
    # a rerun replaces the partition (fewer rows now), an empty one empties it; r2 is never touched
    again = lake.replace_partition("ex", spark.createDataFrame(examples("r1", 2)), {"run_id": "r1"}, EXAMPLES)
    assert again["rows"] == 2 and ids(lake.read_arrow("ex", filters=[("run_id", "=", "r1")])) == ["r1-0", "r1-1"]
    lake.replace_partition("ex", spark.createDataFrame(examples("r1", 2)).limit(0), {"run_id": "r1"}, EXAMPLES)
    assert lake.data_files("ex", {"run_id": "r1"}) == [] and ids(lake.read("ex")) == ["r2-0", "r2-1"]
    assert lake.read_partition("ex", {"run_id": "r1"}).columns == EXAMPLES.names
    assert lake.read_partition("ex", {"run_id": "r1"}).count() == 0
    # rows of another partition are refused, not committed under this one
    with pytest.raises(Exception, match="r9|partition"):
        lake.replace_partition("ex", spark.createDataFrame(examples("r9", 1)), {"run_id": "r1"}, EXAMPLES)
    assert ids(lake.read("ex")) == ["r2-0", "r2-1"]


def test_replace_partition_creates_the_table(lake, spark):
    got = lake.replace_partition("fresh", spark.createDataFrame(examples("r1", 3)), {"run_id": "r1"}, EXAMPLES)
    assert got["rows"] == 3 and ids(lake.read("fresh")) == ["r1-0", "r1-1", "r1-2"]
    assert [(f.name, f.type) for f in lake.read_arrow("fresh").schema] == [(f.name, f.type) for f in EXAMPLES]


# ------------------------------------------------------------ MERGE
def test_merge_inserts_new_keys_and_updates_only_when_asked(lake):
    lake.create("runs", KEYED)
    on = ["model", "first"]
    assert lake.merge("runs", keyed(("m", 0, "a"), ("m", 5, "b")), on, update=False) == {"inserted": 2, "updated": 0}
    # insert-only: a known key is left as it was
    assert lake.merge("runs", keyed(("m", 5, "B"), ("n", 5, "c")), on, update=False) == {"inserted": 1, "updated": 0}
    assert rows(lake.read("runs"), "model", "first", "note") == [("m", 0, "a"), ("m", 5, "b"), ("n", 5, "c")]
    # upsert, from a Spark DataFrame
    src = lake.spark.createDataFrame(keyed(("m", 5, "B"), ("m", 9, "d")))
    assert lake.merge("runs", src, on, update=True) == {"inserted": 1, "updated": 1}
    assert rows(lake.read("runs"), "model", "first", "note") == [
        ("m", 0, "a"), ("m", 5, "B"), ("m", 9, "d"), ("n", 5, "c")]


def test_commit_metadata_reads_back_what_each_merge_recorded(lake):
    lake.create("state", KEYED)
    lake.merge("state", keyed(("m", 0, "a")), ["model"], update=True, commit_metadata={"run_id": "r1", "source_first": "0"})
    va = lake.version("state")
    lake.merge("state", keyed(("m", 1, "b")), ["model"], update=True)
    lake.merge("state", keyed(("m", 2, "c")), ["model"], update=True, commit_metadata={"run_id": "r2", "source_first": "3"})
    vc = lake.version("state")
    assert lake.commit_metadata("state") == [(va, {"run_id": "r1", "source_first": "0"}),
                                             (vc, {"run_id": "r2", "source_first": "3"})]


def test_history_lists_every_commit_newest_first(lake):
    lake.write("events", events(["a", "b"]))
    lake.merge("events", events(["c"]), ["event_id"], update=False)
    lake.delete("events", "event_id = 'a'")
    h = lake.history("events")
    assert [e["version"] for e in h] == list(range(lake.version("events"), -1, -1))
    assert [e["operation"] for e in h[:3]] == ["DELETE", "MERGE", "WRITE"]
    assert all(e["timestamp"] is not None for e in h)


def test_two_merges_of_one_key_at_once_exactly_one_wins(lake):
    """The ledger's guarantee: two runs racing to insert the same key cannot
    both commit; the loser gets the engine's conflict as ConcurrentRunError."""
    conflicts = 0
    for attempt in range(5):
        table = f"race{attempt}"
        lake.create(table, KEYED)
        start, out = threading.Barrier(2), {}

        def run(who):
            start.wait()
            try:
                out[who] = lake.merge(table, keyed(("m", 0, who)), ["model", "first"], update=False)
            except ConcurrentRunError as e:
                out[who] = e
            except Exception as e:  # anything else is a failure of the contract
                out[who] = AssertionError(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=run, args=(w,)) for w in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not [v for v in out.values() if isinstance(v, AssertionError)], out
        winners = [w for w, v in out.items() if isinstance(v, dict) and v["inserted"] == 1]
        assert len(winners) == 1, out  # the other one conflicted, or ran after and found the key
        assert rows(lake.read(table), "model", "first", "note") == [("m", 0, winners[0])]
        conflicts += sum(isinstance(v, ConcurrentRunError) for v in out.values())
        if conflicts:
            break
    assert conflicts, "five races, never a conflict: the losing side of the conflict check went untested"


# ------------------------------------------------------------ reads of a slice
def test_scan_reads_only_the_named_columns_of_matching_rows(lake):
    lake.write("events", events(["a", "b"], user="u1", qty=1))
    lake.write("events", events(["c", "d"], user="u2", qty=3))
    got = lake.scan("events", columns=["event_id", "quantity"], where="quantity > 1 AND user_id IN ('u2', 'u3')")
    assert got.columns == ["event_id", "quantity"] and rows(got, "event_id", "quantity") == [("c", 3), ("d", 3)]
    none = lake.scan("events", where="1 = 0")
    assert none.columns == EVENTS.names and none.count() == 0
    assert ids(lake.scan("events", where="rating IS NULL AND NOT (event_id = 'a')")) == ["b", "c", "d"]


def test_read_arrow_filters(lake):
    lake.write("events", events(["a", "b"], qty=1))
    lake.write("events", events(["c"], qty=3))
    assert ids(lake.read_arrow("events", filters=[("quantity", ">", 1)])) == ["c"]
    assert ids(lake.read_arrow("events", filters=[("event_id", "in", ["a", "c"]), ("quantity", "=", 1)])) == ["a"]
    assert ids(lake.read_arrow("events", filters=[("event_id", "!=", "a")])) == ["b", "c"]
    with pytest.raises(LakeError, match="operator"):
        lake.read_arrow("events", filters=[("event_id", "like", "a%")])


def test_lookup_finds_the_rows_of_given_keys(lake):
    v0 = lake.write("events", events(["a", "b"], user="u1"))
    lake.write("events", events(["c"], user="u2", qty=2))
    lake.write("events", events(["d"], user="u3"))
    keys = pa.table({"user_id": ["u1", "u2", "u2", "zz", None]})  # repeats, unknown and null keys
    got = lake.lookup("events", keys, columns=["event_id", "user_id"])
    assert isinstance(got, pa.Table) and got.column_names == ["event_id", "user_id"]
    assert rows(got, "event_id", "user_id") == [("a", "u1"), ("b", "u1"), ("c", "u2")]
    assert ids(lake.lookup("events", keys, where="quantity > 1")) == ["c"]
    assert ids(lake.lookup("events", keys, version=v0)) == ["a", "b"]
    two = pa.table({"user_id": ["u1", "u2"], "event_id": ["b", "a"]})  # keys of two columns: both must match
    assert ids(lake.lookup("events", two)) == ["b"]
    empty = lake.lookup("events", pa.table({"user_id": pa.array([], pa.string())}), columns=["event_id"])
    assert empty.num_rows == 0 and empty.column_names == ["event_id"]
    with pytest.raises(LakeError, match="no column"):
        lake.lookup("events", pa.table({"nope": ["x"]}))


def test_delete_removes_matching_rows_and_counts_them(lake):
    lake.write("events", events(["a", "b"], qty=1))
    lake.write("events", events(["c"], qty=3))
    v = lake.version("events")
    assert lake.delete("events", "quantity = 1") == 2
    assert lake.version("events") == v + 1 and ids(lake.read("events")) == ["c"]
    assert lake.delete("events", "event_id = 'zz'") == 0 and ids(lake.read("events")) == ["c"]


def test_delete_keys_is_one_commit_with_an_app_transaction_and_vacuum_removes_the_old_files(lake, tmp_path):
    """The erasure primitives of privacy/: rows of the given keys go in one
    commit that records the app transaction; VACUUM (retention 0, check off)
    then deletes the files that still held them."""
    from pathlib import Path

    lake.write("events", events(["a", "b"], user="u-gone"))
    lake.write("events", events(["c"], user="u-kept"))
    old = set(lake.data_files("events"))
    v = lake.version("events")
    out = lake.delete_keys("events", pa.table({"user_id": ["u-gone", "u-unknown"]}), txn=("erase-app", 3),
                           commit_metadata={"forget_batch": 3})
    assert out["rows"] == 2 and out["files_removed"] >= 1 and lake.version("events") == v + 1
    assert ids(lake.read("events")) == ["c"]
    assert lake.app_version("events", "erase-app") == 3 and lake.app_version("events", "other-app") is None
    assert (lake.version("events"), {"forget_batch": 3}) in lake.commit_metadata("events")
    gone = old - set(lake.data_files("events"))
    assert gone and all(Path(f.removeprefix("file://")).exists() for f in gone)  # kept for time travel
    removed = lake.vacuum("events", 0, enforce_retention=False)
    assert removed and not any(Path(f.removeprefix("file://")).exists() for f in gone)
    on_disk = [p.read_bytes() for p in Path(lake.uri("events").removeprefix("file://")).rglob("*.parquet")]
    assert on_disk and not any(b"u-gone" in d for d in on_disk) and ids(lake.read("events")) == ["c"]


# ------------------------------------------------------------ one lake, either engine
@pytest.mark.skipif(not DELTA_JARS, reason=NO_JARS)
def test_each_engine_reads_what_the_other_wrote(spark, delta_session, tmp_path):
    rs = open_lake(LakeConfig(root=str(tmp_path), engine="delta-rs"), spark)
    ds = open_lake(LakeConfig(root=str(tmp_path), engine="delta-spark"), delta_session)
    rs.write("events", events(["a", "b"]), enable_cdf=True)
    rs.create("state", KEYED)
    rs.merge("state", keyed(("m", 0, "a")), ["model"], update=True, commit_metadata={"run_id": "r1"})
    assert ds.version("events") == 0 and ds.commit_metadata("state") == [(1, {"run_id": "r1"})]
    ds.write("events", events(["c"]))
    ds.merge("state", keyed(("m", 1, "b")), ["model"], update=True, commit_metadata={"run_id": "r2"})
    assert rows(rs.read_changes("events", 0, 1), "_change_type", "event_id") == [
        ("insert", "a"), ("insert", "b"), ("insert", "c")]
    assert rs.commit_metadata("state") == [(1, {"run_id": "r1"}), (2, {"run_id": "r2"})]
    assert rows(ds.read_changes("events", 0, 1), "event_id", "_commit_version") == [("a", 0), ("b", 0), ("c", 1)]

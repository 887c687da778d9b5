"""The delta-rs engine's change feed read by the executors (lake/change_feed.py)
against delta-rs's own ``load_cdf``: the same rows, every column, on real
delta-rs tables with commits of every kind; and the tables it must not read as
raw Parquet (read through delta-rs instead), and an expired log (refused)."""
import datetime as dt
import os

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from deltarec.config import LakeConfig
from deltarec.lake import LakeError, open_lake
from deltarec.lake import change_feed
from deltarec.lake.engine import CHANGE_COLUMNS, plain_strings

T0 = dt.datetime(2011, 1, 1, tzinfo=dt.timezone.utc)
SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int64()), ("x", pa.float64()),
                    ("t", pa.timestamp("us", tz="UTC")), ("tags", pa.list_(pa.string()))])


def rows_of(ids, n=1):
    return pa.table({"id": ids, "n": [n] * len(ids), "x": [0.5 * n] * len(ids), "t": [T0] * len(ids),
                     "tags": [[i, "a b+c"] for i in ids]}, schema=SCHEMA)


@pytest.fixture
def lake(spark, tmp_path):
    return open_lake(LakeConfig(root=str(tmp_path / "lake"), engine="delta-rs"), spark)


def load_cdf(spark, uri, first, last):
    """What the engine returned before: delta-rs's load_cdf in the driver, then
    Spark (None when it has no rows: Spark refuses its chunkless columns)."""
    dt_ = DeltaTable(uri)
    cdf = pa.RecordBatchReader.from_stream(dt_.load_cdf(starting_version=first, ending_version=last)).read_all()
    return spark.createDataFrame(plain_strings(cdf)) if cdf.num_rows else None


def load_cdf_rows(spark, uri, first, last):
    df = load_cdf(spark, uri, first, last)
    return [] if df is None else sorted(tuple(r) for r in df.collect())


def every_kind(lake, name="events"):
    """A CDF table with appends, a delete, an update, a MERGE, an optimize and
    an overwrite (no _change_data: its add and remove files are the feed)."""
    uri = lake.uri(name)
    write_deltalake(uri, rows_of(["a", "b", "c"]), configuration={"delta.enableChangeDataFeed": "true"})  # v0
    write_deltalake(uri, rows_of(["d", "e"], 2), mode="append")  # v1
    DeltaTable(uri).delete("id = 'b'")  # v2
    DeltaTable(uri).update({"n": "n + 10"}, predicate="id IN ('c', 'd')")  # v3
    (DeltaTable(uri).merge(rows_of(["a", "f"], 7), "t.id = s.id", source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())  # v4
    write_deltalake(uri, rows_of(["g"], 3), mode="append")  # v5
    DeltaTable(uri).optimize.compact()  # v6: dataChange=false, no rows in the feed
    write_deltalake(uri, rows_of(["h", "i"], 4), mode="overwrite")  # v7: removes every file, adds one
    return uri


def test_executors_read_what_load_cdf_reads(spark, lake):
    uri = every_kind(lake)
    ops = [h["operation"] for h in sorted(DeltaTable(uri).history(), key=lambda h: h["version"])]
    assert ops == ["WRITE", "WRITE", "DELETE", "UPDATE", "MERGE", "WRITE", "OPTIMIZE", "WRITE"]
    dt_ = DeltaTable(uri)
    for first, last in ((0, 7), (0, 0), (1, 4), (2, 3), (4, 6), (6, 6), (7, 7), (5, 7)):
        files = change_feed.plan(uri, dt_, first, last, "events")
        assert files is not None, (first, last)  # read by the executors, not delta-rs in the driver
        got = lake.read_changes("events", first, last)
        assert got.columns == SCHEMA.names + list(CHANGE_COLUMNS)
        want = load_cdf(spark, uri, first, last)
        if want is None:  # the optimize alone: no rows (the old path failed on them)
            assert (first, last) == (6, 6) and got.count() == 0
            continue
        assert sorted(tuple(r) for r in got.collect()) == sorted(tuple(r) for r in want.collect()), (first, last)
        assert [(f.name, f.dataType) for f in got.schema] == [(f.name, f.dataType) for f in want.schema]
    # the overwrite's feed: every earlier row deleted (files added at v0..v5), both new ones inserted
    v7 = sorted((r["_change_type"], r["id"]) for r in lake.read_changes("events", 7, 7).collect())
    assert v7 == [("delete", i) for i in "acdefg"] + [("insert", "h"), ("insert", "i")]
    # a file added at v1 and removed at v7 gives a row at each version
    e = sorted((r["_commit_version"], r["_change_type"]) for r in lake.read_changes("events", 0, 7).collect()
               if r["id"] == "e")
    assert e == [(1, "insert"), (7, "delete")]


def test_tables_raw_parquet_would_misread_go_through_delta_rs(spark, lake):
    # partitioned: the partition column is in the log, not in the files
    part = lake.uri("part")
    write_deltalake(part, rows_of(["a", "b"]), partition_by=["n"], configuration={"delta.enableChangeDataFeed": "true"})
    DeltaTable(part).delete("id = 'a'")
    # schema changed within the range: older files lack the new column
    grown = lake.uri("grown")
    write_deltalake(grown, rows_of(["a"]), configuration={"delta.enableChangeDataFeed": "true"})
    write_deltalake(grown, rows_of(["b"]).append_column("extra", pa.array(["z"])), mode="append", schema_mode="merge")
    # deletion vectors enabled: files may hold deleted rows
    dv = lake.uri("dv")
    write_deltalake(dv, rows_of(["a"]), configuration={"delta.enableChangeDataFeed": "true",
                                                        "delta.enableDeletionVectors": "true"})
    for name, uri, first, last in (("part", part, 0, 1), ("grown", grown, 0, 1), ("dv", dv, 0, 0)):
        assert change_feed.plan(uri, DeltaTable(uri), first, last, name) is None, name
        assert sorted(tuple(r) for r in lake.read_changes(name, first, last).collect()) == \
            load_cdf_rows(spark, uri, first, last), name
    # after the schema change, a range of the new schema only is the executors' again
    assert change_feed.plan(grown, DeltaTable(grown), 1, 1, "grown") is None  # v1 itself changed it
    write_deltalake(grown, rows_of(["c"]).append_column("extra", pa.array(["y"])), mode="append")
    assert change_feed.plan(grown, DeltaTable(grown), 2, 2, "grown") is not None
    assert sorted(tuple(r) for r in lake.read_changes("grown", 2, 2).collect()) == load_cdf_rows(spark, grown, 2, 2)


def test_an_expired_log_is_refused_naming_the_version(lake):
    uri = every_kind(lake)
    DeltaTable(uri).create_checkpoint()
    os.remove(os.path.join(uri, "_delta_log", f"{2:020d}.json"))  # what log expiry does to old entries
    with pytest.raises(LakeError, match="log entry of version 2 .* is gone"):
        lake.read_changes("events", 1, 3)
    assert lake.read_changes("events", 3, 7).count() > 0  # later versions stay readable


def test_a_vacuumed_file_is_named(lake):
    uri = every_kind(lake)
    gone = os.path.join(uri, DeltaTable(uri).get_add_actions(flatten=True).column("path")[0].as_py())
    os.remove(gone)  # what a VACUUM past the range does
    with pytest.raises(LakeError, match=f"data file {gone} not found .* VACUUMed"):
        lake.read_changes("events", 7, 7)


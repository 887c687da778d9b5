"""Lake engines on real Delta tables: change feed, replace-where, MERGE, ledger."""
import datetime as dt
import os

import pyarrow as pa
import pytest

from deltarec.config import LakeConfig
from deltarec.lake import ConcurrentRunError, open_lake, schemas
from deltarec.lake.ledger import Ledger, RunRecord

T0 = dt.datetime(2011, 1, 1, tzinfo=dt.timezone.utc)


def events(ids, user="u1", qty=1):
    n = len(ids)
    return pa.table({
        "event_id": ids, "user_id": [user] * n, "item_id": [f"i{i}" for i in range(n)],
        "event_time": pa.array([T0] * n, schemas.TS), "event_type": ["purchase"] * n,
        "order_id": ["o1"] * n, "quantity": pa.array([qty] * n, pa.int64()), "price": [1.0] * n,
        "rating": pa.nulls(n, pa.float64()),
    }, schema=schemas.BEHAVIOR_EVENTS)


@pytest.fixture
def rs_lake(spark, lake_root):
    return open_lake(LakeConfig(root=str(lake_root), engine="delta-rs"), spark)


def test_change_feed_gives_inserts_updates_and_deletes(rs_lake):
    from deltalake import DeltaTable

    v0 = rs_lake.write("behavior_events", events(["a", "b"]), enable_cdf=True)
    v1 = rs_lake.write("behavior_events", events(["c"]))
    DeltaTable(rs_lake.uri("behavior_events")).update({"quantity": "5"}, predicate="event_id = 'a'")
    rs_lake.delete("behavior_events", "event_id = 'b'")
    assert (v0, v1, rs_lake.version("behavior_events")) == (0, 1, 3)
    rows = rs_lake.read_changes("behavior_events", 1, 3).collect()
    kinds = sorted((r["_change_type"], r["event_id"], r["_commit_version"]) for r in rows)
    assert kinds == [("delete", "b", 3), ("insert", "c", 1), ("update_postimage", "a", 2),
                     ("update_preimage", "a", 2)]
    post = [r for r in rows if r["_change_type"] == "update_postimage"][0]
    assert post["quantity"] == 5
    # time travel still sees the first version
    assert sorted(r["event_id"] for r in rs_lake.read("behavior_events", version=0).collect()) == ["a", "b"]


def test_replace_where_overwrites_only_that_run(rs_lake):
    t = schemas.TRAINING_EXAMPLES

    def ex(run, n):
        return pa.table({
            "run_id": [run] * n, "event_id": [f"{run}{i}" for i in range(n)], "user_id": ["u"] * n,
            "item_id": ["i"] * n, "user_idx": pa.array([1] * n, pa.int64()), "item_idx": pa.array([2] * n, pa.int64()),
            "label": pa.array([1.0] * n, pa.float32()), "weight": pa.array([1.0] * n, pa.float32()),
            "event_time": pa.array([T0] * n, schemas.TS), "kind": ["event"] * n,
            "history_ids": pa.array([[]] * n, pa.list_(pa.string())),
            "history_idx": pa.array([[]] * n, pa.list_(pa.int64())), "holdout": [False] * n}, schema=t)

    rs_lake.create("ex", t, partition_by=["run_id"])
    for run, n in (("r1", 3), ("r2", 2), ("r1", 4)):  # r1 written twice: the rerun replaces it
        rs_lake.write("ex", ex(run, n), mode="overwrite", replace_where=f"run_id = '{run}'", partition_by=["run_id"])
    counts = {r: len(rs_lake.read_arrow("ex", filters=[("run_id", "=", r)])) for r in ("r1", "r2")}
    assert counts == {"r1": 4, "r2": 2}
    files = rs_lake.data_files("ex", {"run_id": "r2"})
    assert files and all("run_id=r2" in f for f in files)


def _record(first, last, run_id=None):
    return RunRecord(run_id=run_id or f"m-{first}-{last}", model="m", source_table="behavior_events",
                     source_first=first, source_last=last, checkpoint_path="/x", checkpoint_sha256="0" * 64,
                     checkpoint_files={}, config={}, code_version="t", metrics={"a": 1}, started_at=T0)


def test_ledger_advances_watermark_only_on_commit_and_refuses_overlap(rs_lake):
    ledger = Ledger(rs_lake)
    assert ledger.watermark("m") == -1
    ledger.commit(_record(0, 4))
    ledger.commit(_record(5, 6))
    assert ledger.watermark("m") == 6
    assert [r.run_id for r in ledger.runs("m")] == ["m-0-4", "m-5-6"]
    assert ledger.get("m-5-6").metrics == {"a": 1}
    # a second run over versions already consumed cannot commit
    with pytest.raises(ConcurrentRunError, match="already at watermark 6"):
        ledger.commit(_record(5, 7, run_id="late"))
    assert ledger.watermark("m") == 6 and len(ledger.runs("m")) == 2


def test_ledger_merge_rejects_same_start_twice(rs_lake):
    """The MERGE key (model, source_first) stops a racing duplicate even when
    the watermark check was passed before the other commit landed."""
    ledger = Ledger(rs_lake)
    ledger.ensure()
    rs_lake.merge("runs", Ledger._to_rows([_record(0, 3)]), on=["model", "source_first"], update=False)
    res = rs_lake.merge("runs", Ledger._to_rows([_record(0, 3, "dup")]), on=["model", "source_first"], update=False)
    assert res["inserted"] == 0 and len(ledger.runs("m")) == 1


DELTA_JARS = os.environ.get("DELTAREC_DELTA_JARS")


@pytest.mark.skipif(not DELTA_JARS, reason="delta-spark engine needs the Delta Lake jars: set DELTAREC_DELTA_JARS "
                    "to their paths (Maven Central is not reachable here, no PyPI package ships them)")
def test_delta_spark_engine_reads_what_delta_rs_wrote(tmp_path):  # pragma: no cover - needs jars
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[1]").appName("delta-spark-test")
             .config("spark.jars", DELTA_JARS)
             .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
             .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
             .getOrCreate())
    rs = open_lake(LakeConfig(root=str(tmp_path), engine="delta-rs"), spark)
    rs.write("behavior_events", events(["a", "b"]), enable_cdf=True)
    ds = open_lake(LakeConfig(root=str(tmp_path), engine="delta-spark"), spark)
    assert ds.version("behavior_events") == 0
    ds.write("behavior_events", events(["c"]))
    assert sorted(r["event_id"] for r in ds.read_changes("behavior_events", 0, 1).collect()) == ["a", "b", "c"]
    assert rs.version("behavior_events") == 1


def test_auto_engine_without_delta_jars_is_delta_rs(spark, lake_root):
    from deltarec.lake.delta_spark import delta_jvm_available

    lake = open_lake(LakeConfig(root=str(lake_root), engine="auto"), spark)
    assert lake.name == ("delta-spark" if delta_jvm_available(spark) else "delta-rs")

"""delta-rs specifics, the run ledger and engine choice, on real Delta tables.
What every engine must do is in test_lake_contract.py."""
import datetime as dt
import os

import pyarrow as pa
import pytest

from deltarec.config import LakeConfig
from deltarec.lake import ConcurrentRunError, LakeError, open_lake, schemas
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
    rs_lake.merge("runs", Ledger.to_rows([_record(0, 3)]), on=["model", "source_first"], update=False)
    res = rs_lake.merge("runs", Ledger.to_rows([_record(0, 3, "dup")]), on=["model", "source_first"], update=False)
    assert res["inserted"] == 0 and len(ledger.runs("m")) == 1


DELTA_JARS = os.environ.get("DELTAREC_DELTA_JARS")


def test_auto_engine_is_the_one_this_session_can_run(spark, lake_root):
    """``auto`` must pick delta-spark exactly when the session has Delta's jars:
    in this run, when DELTAREC_DELTA_JARS gave them to the shared session
    (conftest). Without a session there is no JVM to ask: delta-rs."""
    expected = "delta-spark" if DELTA_JARS else "delta-rs"
    assert open_lake(LakeConfig(root=str(lake_root), engine="auto"), spark).name == expected
    assert open_lake(LakeConfig(root=str(lake_root), engine="auto"), None).name == "delta-rs"


@pytest.mark.skipif(bool(DELTA_JARS), reason="DELTAREC_DELTA_JARS gave this session Delta's jars: "
                    "delta-spark starts, so its refusal cannot be seen here")
def test_delta_spark_without_the_jars_refuses_to_start_and_says_what_to_do(spark, lake_root):
    with pytest.raises(LakeError, match="Delta Lake jars are not on Spark's classpath.*lake.engine=delta-rs"):
        open_lake(LakeConfig(root=str(lake_root), engine="delta-spark"), spark)

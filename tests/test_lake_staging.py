"""The delta-rs engine's writes and MERGEs of a Spark DataFrame: the executors
write staged Parquet files (lake/staging.py), the driver streams them into
delta-rs and removes them, on success and on failure; real tables, the shared
SparkSession."""
import os
import time

import pyarrow as pa
import pytest

from deltarec.config import LakeConfig
from deltarec.lake import open_lake
from deltarec.lake import staging

SCHEMA = pa.schema([("k", pa.string()), ("n", pa.int64()), ("tags", pa.list_(pa.string()))])


def rows(keys, n):
    return pa.table({"k": keys, "n": [n] * len(keys), "tags": [[k, "x"] for k in keys]}, schema=SCHEMA)


@pytest.fixture
def lake(spark, tmp_path):
    return open_lake(LakeConfig(root=str(tmp_path / "lake"), engine="delta-rs"), spark)


def staging_dirs(lake):
    d = os.path.join(lake.root, staging.STAGING_DIR)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def table_rows(lake, name):
    return sorted(tuple(r.values()) for r in lake.read_arrow(name).to_pylist())


def test_staged_rows_stream_in_order_and_in_batches(spark, lake):
    df = spark.createDataFrame(rows([f"k{i:04d}" for i in range(1000)], 1)).repartition(3, "k").sortWithinPartitions("k")
    with staging.staged(df, lake.root, SCHEMA) as st:
        assert st.rows == 1000 and len(st.files) == 3 and all(os.path.exists(f) for f in st.files)
        batches = list(st.reader(batch_rows=100))
        assert max(b.num_rows for b in batches) <= 100  # the driver holds a batch at a time
        got = pa.Table.from_batches(batches, SCHEMA)
        want = df.toArrow()
        assert got.to_pylist() == want.cast(SCHEMA).to_pylist()  # every row, in the DataFrame's order
    assert staging_dirs(lake) == []


def test_dataframe_write_and_merge_match_the_arrow_ones(spark, lake):
    base, tonight = rows(["a", "b", "c"], 1), rows(["b", "d"], 2)
    for name, source in (("arrow", lambda t: t), ("frame", spark.createDataFrame)):
        assert lake.write(name, source(base), schema=SCHEMA) == 0
        counts = lake.merge(name, source(tonight), ["k"], update=True, commit_metadata={"run": name})
        assert counts == {"inserted": 1, "updated": 1}, name
        lake.write(name, source(rows(["e"], 3)), mode="overwrite", replace_where="n = 3", schema=SCHEMA)
    assert table_rows(lake, "frame") == table_rows(lake, "arrow")
    assert [m for _, m in lake.commit_metadata("frame")] == [{"run": "frame"}]
    # a MERGE of no rows commits nothing, as delta-rs's own MERGE of an empty table
    v = lake.version("frame")
    assert lake.merge("frame", spark.createDataFrame(rows(["z"], 9)).limit(0), ["k"], update=True) == \
        {"inserted": 0, "updated": 0}
    assert lake.version("frame") == v
    assert staging_dirs(lake) == []


def test_a_failed_write_leaves_the_table_and_no_staging_files(spark, lake):
    lake.write("t", rows(["a"], 1), schema=SCHEMA)
    df = spark.createDataFrame(rows(["b"], 2))
    with pytest.raises(Exception, match="no_such_column"):  # delta-rs refuses it after the files were staged
        lake.write("t", df, mode="overwrite", replace_where="no_such_column = 1", schema=SCHEMA)
    with pytest.raises(Exception):  # the executors fail while staging: a key that is no number
        lake.merge("t", df.withColumn("n", df["k"]), ["k"], update=True)
    assert lake.version("t") == 0 and table_rows(lake, "t") == [("a", 1, ["a", "x"])]
    assert staging_dirs(lake) == []


def test_staging_left_by_a_crash_is_swept_when_stale(lake):
    old, young = (os.path.join(lake.root, staging.STAGING_DIR, n) for n in ("old", "young"))
    for d in (old, young):
        os.makedirs(d)
        open(os.path.join(d, "part-00000-x.snappy.parquet"), "wb").close()
    stale = time.time() - (staging.STALE_HOURS + 1) * 3600
    os.utime(old, (stale, stale))
    assert staging.sweep(lake.root) == [old]
    assert staging_dirs(lake) == ["young"]  # may be another run's, still writing

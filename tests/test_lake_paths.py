"""Lake paths without a cluster: the URI forms engines and Spark hand out
(lake/uri.py), training files listed from the Delta log (lake/delta_log.py,
on logs delta-rs wrote), Delta's commit conflicts told apart from other errors
(lake/conflicts.py), and a ledger whose lake paths survive a copied lake."""
import datetime as dt
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.config import LakeConfig
from deltarec.data.shards import read_shard
from deltarec.lake import LakeError, open_lake
from deltarec.lake import uri as U
from deltarec.lake.conflicts import CONFLICTS, delta_conflict
from deltarec.lake.delta_log import add_files, raw_parquet_problem
from deltarec.lake.ledger import Ledger, RunRecord
from deltarec.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint

T0 = dt.datetime(2011, 1, 1, tzinfo=dt.timezone.utc)


# ------------------------------------------------------------ URIs
@pytest.mark.parametrize("given, local", [
    ("/data/lake/t/part-0.parquet", "/data/lake/t/part-0.parquet"),
    ("file:/data/lake/run_id=a%20b/x.parquet", "/data/lake/run_id=a b/x.parquet"),  # Hadoop's form (Spark)
    ("file:///data/lake/x.parquet", "/data/lake/x.parquet"),  # RFC 8089's
    ("file://localhost/data/x", "/data/x"),
    ("dbfs:/mnt/lake/x", "/dbfs/mnt/lake/x"),  # Databricks' FUSE mount
    ("dbfs:/Volumes/c/s/v/x", "/Volumes/c/s/v/x"),  # Unity Catalog volumes are mounted at /Volumes
])
def test_local_forms_name_a_local_path(given, local):
    assert U.local_path(given) == local and U.is_local(given)
    assert U.filesystem(given) == (None, local)
    assert U.delta_rs_uri(given) == local


@pytest.mark.parametrize("given, fs_type, path", [
    ("gs://bucket/lake/x.parquet", "GcsFileSystem", "bucket/lake/x.parquet"),
    ("abfss://box@acct.dfs.core.windows.net/lake/x", "AzureFileSystem", "box/lake/x"),
])
def test_object_store_uris_open_through_pyarrow(given, fs_type, path):
    fs, p = U.filesystem(given)
    assert type(fs).__name__ == fs_type and p == path


def test_hadoop_schemes_are_the_same_stores_under_pyarrow_names():
    assert U.delta_rs_uri("s3a://bucket/lake") == "s3://bucket/lake"
    assert U.delta_rs_uri("s3n://bucket/lake") == "s3://bucket/lake"
    assert U.scheme("S3A://b/k") == "s3a" and U.scheme("/x") is None and U.scheme("C:/x") is None


def test_unsupported_and_remote_host_uris_are_refused_naming_them():
    with pytest.raises(LakeError, match=r"'wasbs://c@a.blob.core.windows.net/x'.*not supported"):
        U.filesystem("wasbs://c@a.blob.core.windows.net/x")
    with pytest.raises(LakeError, match="host 'nas'"):
        U.local_path("file://nas/share/x")


def test_paths_relative_to_the_lake_root_in_any_form():
    root = "/data/lake"
    assert U.relative_to(root, "/data/lake/checkpoints/m/r/a1") == "checkpoints/m/r/a1"
    assert U.relative_to(root, "file:///data/lake/ex/p.parquet") == "ex/p.parquet"
    assert U.relative_to(root, "/data/lake2/x") is None and U.relative_to(root, "/data/lake") is None
    assert U.relative_to("s3://b/lake", "s3a://b/lake/x/y") == "x/y"
    assert U.resolve("/new/lake", "checkpoints/a") == "/new/lake/checkpoints/a"
    assert U.resolve("/new/lake", "/elsewhere/a") == "/elsewhere/a"
    assert U.resolve("s3://b/lake", "checkpoints/a") == "s3://b/lake/checkpoints/a"


def test_shards_and_checkpoints_open_every_local_form(tmp_path):
    f = tmp_path / "run_id=a b" / "part-0.parquet"
    f.parent.mkdir()
    pq.write_table(pa.table({"user_idx": [1, 2], "item_idx": [3, 4], "label": pa.array([1.0, 0.0], pa.float32()),
                             "weight": pa.array([1.0, 1.0], pa.float32())}), f)
    hadoop = "file:" + str(f).replace(" ", "%20")
    for form in (str(f), hadoop, "file://" + str(f).replace(" ", "%20")):
        assert read_shard([form], 0, 1)["item_idx"].to_pylist() == [3, 4], form
    model = torch.nn.Linear(2, 1)
    saved = save_checkpoint("file:" + str(tmp_path / "ck"), model, None, {"m": 1})
    assert verify_checkpoint(str(tmp_path / "ck"), saved.sha256) == saved.files
    assert load_checkpoint("file://" + str(tmp_path / "ck"), saved.sha256).meta == {"m": 1}


# ------------------------------------------------------------ the Delta log
EX = pa.schema([("run_id", pa.string()), ("v", pa.int64())])


def _write(path, run, n, mode="append", **kw):
    from deltalake import write_deltalake

    write_deltalake(path, pa.table({"run_id": [run] * n, "v": list(range(n))}, schema=EX), mode=mode,
                    partition_by=["run_id"], **kw)


def _rows(files):
    return sorted(v for f in files for v in pq.read_table(U.local_path(f), columns=["v"])["v"].to_pylist())


def test_files_of_a_partition_come_from_the_log_add_actions(tmp_path):
    t = str(tmp_path / "ex")
    _write(t, "r1", 3)
    _write(t, "a b/c", 2)  # a value that is escaped twice over (directory name, then the log's URI)
    _write(t, "r1", 4, mode="overwrite", predicate="run_id = 'r1'")  # the rerun replaces r1's files
    _write(t, "r2", 1)
    r1 = add_files(t, {"run_id": "r1"})
    assert r1 and all(os.path.isfile(f) and "/run_id=r1/" in f for f in r1) and _rows(r1) == [0, 1, 2, 3]
    odd = add_files(t, {"run_id": "a b/c"})
    assert len(odd) == 1 and _rows(odd) == [0, 1] and os.path.isfile(odd[0])
    assert add_files(t, {"run_id": "r9"}) == []
    assert len(add_files(t)) == 3 and add_files(t) == sorted(add_files(t))
    assert _rows(add_files(t, {"run_id": "r1"}, version=0)) == [0, 1, 2]  # time travel: the first write's file
    # the table's own URI form comes back (here Hadoop's file:/ form)
    assert all(f.startswith("file:" + t) for f in add_files("file:" + t, {"run_id": "r1"}))
    with pytest.raises(LakeError, match="not partitioned by 'v'"):
        add_files(t, {"v": "1"})
    with pytest.raises(LakeError, match="does not exist"):
        add_files(str(tmp_path / "nope"))


@pytest.mark.parametrize("conf, what", [({"delta.enableDeletionVectors": "true"}, "deletion vectors"),
                                        ({"delta.columnMapping.mode": "name"}, "column mapping")])
def test_tables_workers_cannot_read_as_plain_parquet_are_refused(tmp_path, conf, what):
    from deltalake import DeltaTable

    t = str(tmp_path / "ex")
    DeltaTable.create(t, EX, partition_by=["run_id"], configuration=conf)
    _write(t, "r1", 2)
    with pytest.raises(LakeError, match=f"'ex'.*as plain Parquet, but it (has|uses) {what}"):
        add_files(t, {"run_id": "r1"}, table="ex")
    # what delta-spark's DESCRIBE DETAIL reports says the same
    assert what in raw_parquet_problem({k.upper(): v for k, v in conf.items()}, [])
    assert raw_parquet_problem({}, ["deletionVectors"]) and raw_parquet_problem({}, ["columnMapping"])
    assert raw_parquet_problem({"delta.enableChangeDataFeed": "true"}, ["appendOnly"]) is None


def test_engine_data_files_are_the_log_listing(spark, tmp_path):
    lake = open_lake(LakeConfig(root=str(tmp_path / "lake"), engine="delta-rs"), spark)
    lake.create("ex", EX, partition_by=["run_id"])
    lake.write("ex", pa.table({"run_id": ["r1", "r2"], "v": [1, 2]}, schema=EX), partition_by=["run_id"])
    assert lake.data_files("ex", {"run_id": "r2"}) == add_files(lake.uri("ex"), {"run_id": "r2"})
    assert _rows(lake.data_files("ex", {"run_id": "r2"})) == [2]


# ------------------------------------------------------------ conflicts
@pytest.mark.parametrize("name", list(CONFLICTS))
def test_a_delta_conflict_is_known_by_its_java_class_before_delta_converts_it(spark, name):
    from pyspark.errors.exceptions.captured import UnknownException

    # what classic PySpark raises when delta.exceptions has not installed its conversion
    e = UnknownException(desc=f"io.delta.exceptions.{name}: Files were added to the root of the table",
                         stackTrace="")
    assert delta_conflict(e) == name


def test_a_delta_conflict_is_known_by_its_error_class():
    class Grpc(Exception):  # the shape of Spark Connect's generic error: a condition, no Python subclass
        def getCondition(self):
            return "DELTA_CONCURRENT_APPEND"

    assert delta_conflict(Grpc("[DELTA_CONCURRENT_APPEND] Files were added")) == "ConcurrentAppendException"


def test_other_errors_are_not_conflicts_even_when_they_say_concurrent(spark):
    from pyspark.errors.exceptions.captured import UnknownException

    with pytest.raises(Exception) as missing:  # a real py4j error that merely names a Delta class
        spark._jvm.java.lang.Class.forName("io.delta.exceptions.ConcurrentAppendException")
    assert "io.delta.exceptions.ConcurrentAppendException" in str(missing.value)
    assert delta_conflict(missing.value) is None
    with pytest.raises(Exception) as analysis:  # a real error with an error class of its own
        spark.sql("SELECT * FROM deltarec_no_such_table")
    assert delta_conflict(analysis.value) is None
    assert delta_conflict(UnknownException(desc="java.util.ConcurrentModificationException: oops",
                                           stackTrace="")) is None
    assert delta_conflict(RuntimeError("ConcurrentAppendException somewhere in a message")) is None


def test_delta_python_classes_are_conflicts_when_the_package_is_installed():
    dx = pytest.importorskip("delta.exceptions", reason="the delta-spark Python package is not installed here "
                             "(pip install delta-spark==4.4.1); the Java-class and error-class paths are tested above")
    assert all(hasattr(dx, n) for n in CONFLICTS)


# ------------------------------------------------------------ the ledger
def test_the_ledger_stores_lake_paths_relative_to_the_root_and_a_copied_lake_finds_its_own(spark, tmp_path):
    root = tmp_path / "lake"
    lake = open_lake(LakeConfig(root=str(root), engine="delta-rs"), spark)
    ck = save_checkpoint(str(root / "checkpoints" / "m" / "m-0-1" / "a1"), torch.nn.Linear(2, 1), None, {})
    outside = str(tmp_path / "elsewhere" / "part-9.parquet")
    files = [lake.uri("training_examples") + "/run_id=m-0-1/part-0.parquet", outside]
    Ledger(lake).commit(RunRecord(
        run_id="m-0-1", model="m", source_table="behavior_events", source_first=0, source_last=1,
        checkpoint_path=ck.path, checkpoint_sha256=ck.sha256, checkpoint_files=ck.files, config={},
        code_version="t", metrics={"inputs": {"files": files}, "train_spec": {"parent_path": ck.path}},
        started_at=T0, status="champion"))
    stored = lake.read_arrow("runs").to_pylist()[0]
    assert stored["checkpoint_path"] == "checkpoints/m/m-0-1/a1"
    assert str(root) not in stored["metrics"] and outside in stored["metrics"]  # outside the root: absolute

    copy = tmp_path / "restored"
    shutil.copytree(root, copy)
    shutil.rmtree(root)  # the original is gone: nothing may still point at it
    run = Ledger(open_lake(LakeConfig(root=str(copy), engine="delta-rs"), spark)).get("m-0-1")
    assert run.checkpoint_path == f"{copy}/checkpoints/m/m-0-1/a1"
    verify_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
    assert run.metrics["inputs"]["files"] == [f"{copy}/training_examples/run_id=m-0-1/part-0.parquet", outside]
    assert run.metrics["train_spec"]["parent_path"] == run.checkpoint_path

"""End to end on small real data: the demo's runs, the no-op rerun, a crash
before the ledger commit, and the quarantine threshold."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, make_config
from deltarec.features.validate import QuarantineThresholdExceeded
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.faults import CRASH_ENV
from deltarec.lake.ledger import CHAMPION
from deltarec.pipeline.demo import append_day, demo_days, run_demo
from deltarec.pipeline.nightly import run_nightly
from deltarec.train.checkpoint import sha256_bytes, verify_checkpoint


def status_json(lake_root, *extra) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "deltarec.cli", "status", "--json", "--conf", str(ROOT / "conf" / "local.yaml"),
         "--set", f"lake.root={lake_root}", *extra], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def checkpoint_dirs(lake_root) -> set[str]:
    return {str(p.parent) for p in Path(lake_root, "checkpoints").rglob("manifest.json")}


def test_demo_runs_nights_then_rerun_is_a_noop(spark, lake_root, real_data_path):
    cfg = make_config(lake_root)
    results = run_demo(spark, cfg, out=lambda *_: None)
    assert [r.status for r in results] == ["committed"] * 3
    assert results[0].strategy == "full" and {r.strategy for r in results[1:]} == {"incremental"}

    st = status_json(lake_root, "--verify")
    runs = st["runs"]
    assert len(runs) == 3 and {r["status"] for r in runs} <= {"champion", "candidate", "retired"}
    assert [r["status"] for r in runs].count("champion") == 1
    ranges = [tuple(r["source_versions"]) for r in runs]
    assert ranges[0][0] == 0 and ranges[-1][1] == st["watermark"] == st["source_latest_version"]
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 + 1 == b0 and a0 <= a1  # contiguous, no overlap
    for r in runs:
        ck = r["checkpoint"]
        assert ck["verified"] is True
        manifest = Path(ck["path"], "manifest.json").read_bytes()
        assert sha256_bytes(manifest) == ck["sha256"]
        for name, digest in ck["files"].items():
            assert sha256_bytes(Path(ck["path"], name).read_bytes()) == digest
    # each run's parent is the champion when it ran (contract 3): the previous run if the gate promoted it
    champion_then = runs[0]["run_id"] if runs[1]["status"] == "candidate" else runs[1]["run_id"]
    assert [r["parent"] for r in runs] == [None, runs[0]["run_id"], champion_then]
    # every night reports rows and prequential metrics measured before training
    for r in runs[1:]:
        m = r["metrics"]
        assert m["rows"]["consumed"] == m["rows"]["accepted"] + m["rows"]["quarantined"] > 0
        assert {"champion", "stale", "popularity"} <= set(m["prequential"])
        assert 0.0 <= m["prequential"]["champion"]["ndcg"] <= 1.0
        assert m["prequential"]["runs"]["champion"] == r["parent"]
    # every run records where its time went: each stage's seconds and Spark jobs, the delta job's in detail
    for r, res in zip(runs, results):
        stages = r["metrics"]["stages"]
        want = {"strategy", "delta_job.read_changes", "delta_job.validate", "delta_job.examples", "inputs",
                "prequential", "train", "gate"}
        assert want <= set(stages), set(stages)
        assert all(st["seconds"] >= 0 and st["spark_jobs"] >= 0 for st in stages.values())
        assert stages["delta_job.validate"]["spark_jobs"] > 0 and stages["train"]["seconds"] > 0
        assert sum(st["seconds"] for st in stages.values()) <= res.seconds
        assert r["metrics"]["delta_job"]["outcomes"]["event"] > 0  # the delta job's counts are kept too
    assert runs[0]["metrics"]["stages"]["prequential"]["spark_jobs"] == 0  # the first run has no one to score
    # the ranking model's item clock (model.item_time): each checkpoint knows the items' purchases up to the
    # day after the newest purchase it trained on, and the first training learned to read it
    lake = open_lake(cfg.lake, spark)
    for r in runs:
        state = load_file(str(Path(r["checkpoint"]["path"], "model.safetensors")))
        ex = lake.read_arrow(cfg.lake.examples_table, filters=[("run_id", "=", r["run_id"])]).to_pandas()
        bought = ex[(ex["label"] > 0) & (ex["kind"] == "event") & ~ex["holdout"].astype(bool)]
        newest_day = int(bought["event_time"].max().timestamp() // 86_400)
        assert int(state["clock.as_of"]) == newest_day + 1, r["run_id"]
    assert state["item_time.weight"].abs().sum() > 0

    before = checkpoint_dirs(lake_root)
    again = run_demo(spark, cfg, out=lambda *_: None)  # lake exists: just a nightly run
    assert [r.status for r in again] == ["noop"]
    assert checkpoint_dirs(lake_root) == before
    assert len(Ledger(open_lake(cfg.lake, spark)).runs()) == 3


def trainable_rows(lake, cfg, run_ids) -> int:
    """Examples of these runs that train (contract 2: holdout rows are for the gate only)."""
    ex = lake.read_arrow(cfg.lake.examples_table, filters=[("run_id", "in", list(run_ids))])
    return ex.num_rows - (sum(ex["holdout"].to_pylist()) if "holdout" in ex.column_names else 0)


def seed_days(spark, cfg, n):
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    for _, ev in days[:n]:
        append_day(lake, cfg, ev, items)
    return lake


def test_crash_after_checkpoint_before_ledger_commit_keeps_watermark(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "demo.enabled=false")
    lake = seed_days(spark, cfg, 2)
    args = [sys.executable, "-m", "deltarec.cli", "nightly", "--conf", str(ROOT / "conf" / "local.yaml")]
    for o in ["lake.root=" + str(lake_root), "demo.enabled=false", "train.backend=local", "train.num_proc=1",
              "train.batch_size=256", "features.user_buckets=2048", "features.item_buckets=1024",
              "model.embedding_dim=8", "model.hidden=[16]", "spark.master=local[1]"]:
        args += ["--set", o]
    crashed = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, CRASH_ENV: "before_ledger_commit",
                                  "PYTHONPATH": str(ROOT / "lib")})
    assert crashed.returncode == 86, crashed.stderr[-3000:]
    orphans = checkpoint_dirs(lake_root)
    assert len(orphans) == 1  # the files were written and are complete ...
    verify_checkpoint(orphans.pop())
    ledger = Ledger(lake)
    assert ledger.watermark(cfg.model.name) == -1 and ledger.runs() == []  # ... but nothing was committed

    res = run_nightly(spark, cfg, lake=lake)
    assert res.status == "committed" and res.source_versions == (0, 1)
    runs = ledger.runs()
    assert len(runs) == 1 and ledger.watermark(cfg.model.name) == 1
    assert runs[0].checkpoint_path not in orphans  # the orphan is never referenced


def test_quarantine_threshold_fails_the_run_and_commits_nothing(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "demo.enabled=false", "validation.max_quarantine_fraction=0.01")
    lake = seed_days(spark, cfg, 1)
    with pytest.raises(QuarantineThresholdExceeded, match="null_user_id="):
        run_nightly(spark, cfg, lake=lake)
    assert Ledger(lake).watermark(cfg.model.name) == -1
    assert checkpoint_dirs(lake_root) == set()


def test_nightly_with_two_horovod_processes(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "train.backend=horovod", "train.num_proc=2", "demo.max_days=3",
                      "demo.nights=1")
    results = run_demo(spark, cfg, out=lambda *_: None)
    assert [r.status for r in results] == ["committed", "committed"]
    run = Ledger(open_lake(cfg.lake, spark)).runs()[-1]
    train = run.metrics["train"]
    assert train["backend"] == "horovod" and train["world_size"] == 2
    assert sorted(r["rank"] for r in train["ranks"]) == [0, 1]
    assert all(r["examples"] > 0 for r in train["ranks"])
    trainable = trainable_rows(open_lake(cfg.lake, spark), cfg, [run.run_id])
    assert sum(r["examples"] for r in train["ranks"]) == trainable * cfg.train.epochs


def test_nightly_without_source_table_says_what_to_do(spark, lake_root):
    from deltarec.lake import LakeError

    with pytest.raises(LakeError, match="load data first"):
        run_nightly(spark, make_config(lake_root, "demo.enabled=false"))


def test_corrupt_latest_checkpoint_is_refused_and_the_previous_one_used(spark, lake_root, real_data_path, caplog):
    # gate off: the second run is the champion whatever its metrics, so the night below must refuse it
    cfg = make_config(lake_root, "demo.history_days=3", "demo.nights=1", "gate.enabled=false")
    first, second = run_demo(spark, cfg, out=lambda *_: None)
    lake = open_lake(cfg.lake, spark)
    assert second.registry_status == CHAMPION and Ledger(lake).champion(cfg.model.name).run_id == second.run_id
    weights = Path(second.checkpoint["path"], "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[4][1], items)
    with caplog.at_level("ERROR", logger="deltarec.nightly"):
        third = run_nightly(spark, cfg, lake=lake)
    assert third.status == "committed"
    assert any(f"refusing checkpoint of run {second.run_id}" in r.getMessage() for r in caplog.records)
    runs = Ledger(lake).runs()
    assert runs[-1].parent_run_id == first.run_id  # not the corrupt second run (the champion)
    assert runs[-1].metrics["train"]["warm_start"] == first.run_id
    assert runs[-1].source_first == second.source_versions[1] + 1  # the watermark still moves on


def test_full_strategy_retrains_from_scratch_over_all_history(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "demo.history_days=3", "demo.nights=1")
    run_demo(spark, cfg, out=lambda *_: None)
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[4][1], items)
    full = make_config(lake_root, "demo.history_days=3", "demo.nights=1", "train.strategy=full")
    champion = Ledger(lake).champion(full.model.name)
    res = run_nightly(spark, full, lake=lake)
    runs = Ledger(lake).runs()
    train = runs[-1].metrics["train"]
    assert res.strategy == "full" and train["warm_start"] is None
    assert runs[-1].parent_run_id == champion.run_id  # lineage still links the runs (to the champion)
    all_examples = trainable_rows(lake, full, [r.run_id for r in runs])  # full: every committed run's
    assert train["examples_trained"] == all_examples * full.train.full_epochs


def test_prequential_popularity_counts_committed_positives_in_the_window(spark, lake_root):
    """The popular items the prequential baseline serves: positives of committed
    runs only, event_time in [since, until), most first, ties by index."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa

    from deltarec.lake import schemas
    from deltarec.pipeline.prequential import popular

    cfg = make_config(lake_root)
    lake = open_lake(cfg.lake, spark)
    rng = np.random.default_rng(3)
    n = 400
    t0 = dt.datetime(2011, 1, 1, tzinfo=dt.timezone.utc)
    rows = {f.name: [None] * n for f in schemas.TRAINING_EXAMPLES}
    rows.update(run_id=rng.choice(["r0", "r1", "r2"], n).tolist(), item_idx=rng.integers(0, 12, n).tolist(),
                label=rng.choice([0.0, 1.0], n).tolist(),
                event_time=[t0 + dt.timedelta(hours=int(h)) for h in rng.integers(0, 240, n)],
                event_id=[f"e{i}" for i in range(n)])
    table = pa.Table.from_pydict(rows, schema=schemas.TRAINING_EXAMPLES)
    lake.create(cfg.lake.examples_table, schemas.TRAINING_EXAMPLES, partition_by=["run_id"])
    lake.write(cfg.lake.examples_table, table, partition_by=["run_id"], schema=schemas.TRAINING_EXAMPLES)
    since, until = t0 + dt.timedelta(days=2), t0 + dt.timedelta(days=7)

    got = popular(lake, cfg.lake.examples_table, ["r0", "r2"], since, until, 5)
    hours = np.array([(t - t0).total_seconds() / 3600 for t in rows["event_time"]])
    keep = (np.isin(rows["run_id"], ["r0", "r2"]) & (np.array(rows["label"]) == 1)
            & (hours >= 48) & (hours < 168))
    counts = np.bincount(np.array(rows["item_idx"])[keep], minlength=12)
    want = sorted(range(12), key=lambda i: (-counts[i], i))[:5]
    assert got.tolist() == want and counts[want[0]] > counts[want[-1]]
    assert popular(lake, cfg.lake.examples_table, [], since, until, 5) is None
    later = t0 + dt.timedelta(days=11)  # after every event
    assert popular(lake, cfg.lake.examples_table, ["r0"], later, later + dt.timedelta(days=30), 5) is None


def test_changed_bucket_count_never_warm_starts_from_rows_of_other_ids(spark, lake_root, real_data_path):
    """Hashed ids: bucket = hash mod count. After features.item_buckets changes,
    auto trains from scratch (the parent's rows belong to other ids now) and an
    explicit incremental run is refused with what to do."""
    cfg = make_config(lake_root, "demo.history_days=3", "demo.nights=1")
    run_demo(spark, cfg, out=lambda *_: None)
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[4][1], items)
    bigger = cfg.features.item_buckets * 2
    explicit = make_config(lake_root, "demo.history_days=3", "demo.nights=1", f"features.item_buckets={bigger}",
                           "train.strategy=incremental")
    with pytest.raises(ValueError, match=rf"item_buckets {cfg.features.item_buckets} -> {bigger}.*train.strategy=full"):
        run_nightly(spark, explicit, lake=lake)
    auto = make_config(lake_root, "demo.history_days=3", "demo.nights=1", f"features.item_buckets={bigger}")
    res = run_nightly(spark, auto, lake=lake)
    assert res.status == "committed" and res.strategy == "full" and res.registry_status == "champion"
    assert "bucket counts changed" in res.gate["decision"]["reason"] and res.prequential == {}
    assert Ledger(lake).runs()[-1].metrics["train"]["warm_start"] is None


def test_demo_names_the_data_it_runs_on(tmp_path, real_data_path, caplog):
    """No silent fallback: the real file when it is there; otherwise a warning
    naming the missing file, and a description that says synthetic."""
    _, _, what = demo_days(make_config(tmp_path / "lake", "demo.max_days=2"))
    assert what.startswith(f"data file {real_data_path} (")
    absent = tmp_path / "absent.parquet"
    with caplog.at_level("WARNING", logger="deltarec.demo"):
        days, _, what = demo_days(make_config(tmp_path / "lake", f"demo.data_path={absent}", "demo.max_days=2"))
    assert what.startswith("synthetic data (") and len(days) == 2
    assert any(str(absent) in r.getMessage() and "synthetic" in r.getMessage() for r in caplog.records)

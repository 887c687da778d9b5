"""train.backend=auto: one in-process worker below train.auto_min_examples
examples, the distributed backend from it on; the choice and the count it was
made on recorded in the run's metrics (#20)."""
from __future__ import annotations

from conftest import make_config

from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.pipeline.nightly import run_nightly


def examples_of(lake, cfg, run_id) -> int:
    return lake.read_arrow(cfg.lake.examples_table, filters=[("run_id", "=", run_id)]).num_rows


def test_auto_trains_small_nights_in_process_and_large_ones_distributed(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "demo.enabled=false", "train.backend=auto", "train.auto_min_examples=1000000000",
                      "train.collective_timeout_s=123")
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    for _, ev in days[:2]:
        append_day(lake, cfg, ev, items)
    first = run_nightly(spark, cfg, lake=lake)
    train = first.metrics["train"]
    assert train["backend"] == "local" and train["world_size"] == 1
    assert Ledger(lake).runs()[0].metrics["train_spec"]["collective_timeout_s"] == 123  # the config key reaches it
    choice = train["backend_choice"]
    assert choice["chose"] == "local" and choice["threshold"] == 1_000_000_000
    # the count is the rows of the files the workers read: the first (full) night's examples
    assert choice["examples"] == examples_of(lake, cfg, first.run_id) > 0

    append_day(lake, cfg, days[2][1], items)
    big = make_config(lake_root, "demo.enabled=false", "train.backend=auto", "train.auto_min_examples=0",
                      "train.distributed=torch", "train.launcher=processes", "train.num_proc=2")
    second = run_nightly(spark, big, lake=lake)
    train = Ledger(lake).runs()[-1].metrics["train"]
    assert second.strategy == "incremental"
    assert train["backend"] == "torch" and train["world_size"] == 2
    assert train["backend_choice"]["chose"] == "torch"
    # incremental: tonight's examples only (no replay configured)
    assert train["backend_choice"]["examples"] == examples_of(lake, cfg, second.run_id) > 0

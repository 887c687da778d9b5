"""torch.distributed as plain local processes (train.launcher=processes): no Spark."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.train.backends import LocalBackend, TorchBackend, TrainingFailed, make_backend
from deltarec.train.checkpoint import load_checkpoint
from test_training import B, STEPS, WORLD, examples, interleave_for_one_worker, spec


def test_two_local_processes_on_global_batch_equal_one_worker(tmp_path):
    t = examples(B * STEPS, seed=5)
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(interleave_for_one_worker(t), tmp_path / "one.parquet")
    one = LocalBackend().run(spec([tmp_path / "one.parquet"], tmp_path / "ck1"))
    backend = make_backend("torch", None, WORLD, launcher="processes")
    assert isinstance(backend, TorchBackend) and backend.spark is None
    two = backend.run(spec([tmp_path / "two.parquet"], tmp_path / "ck2"))
    assert two["world_size"] == WORLD and two["steps"] == one["steps"] == STEPS
    p1 = load_checkpoint(one["checkpoint"]["path"]).model_state
    p2 = load_checkpoint(two["checkpoint"]["path"]).model_state
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")


def test_local_process_error_names_the_failing_rank(tmp_path):
    t = examples(B * 2)
    bad = t.column("item_idx").to_numpy().copy()
    bad[B:] = 999  # out of range only in rank 1's half
    pq.write_table(t.set_column(1, "item_idx", pa.array(bad)), tmp_path / "x.parquet")
    with pytest.raises(TrainingFailed, match=r"worker rank 1/2 \(torch\) failed: IndexError") as e:
        TorchBackend(None, WORLD, timeout_s=300).run(spec([tmp_path / "x.parquet"], tmp_path / "ck"))
    assert "rank 0/2" not in str(e.value).split("\n")[0]


def test_nightly_with_torch_local_processes(spark, tmp_path, real_data_path):
    from conftest import make_config
    from deltarec.lake import open_lake
    from deltarec.lake.ledger import Ledger
    from deltarec.pipeline.demo import run_demo

    cfg = make_config(tmp_path / "lake", "train.backend=torch", "train.launcher=processes", "train.num_proc=2",
                      "demo.max_days=3", "demo.nights=0")
    results = run_demo(spark, cfg, out=lambda *_: None)
    assert [r.status for r in results] == ["committed"]
    train = Ledger(open_lake(cfg.lake, spark)).runs()[-1].metrics["train"]
    assert train["backend"] == "torch" and train["world_size"] == 2
    assert sorted(r["rank"] for r in train["ranks"]) == [0, 1] and all(r["examples"] > 0 for r in train["ranks"])

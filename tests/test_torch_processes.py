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


def _mixed_rank(rank: int, port: int, out) -> None:
    """One gloo rank: table ``a`` gets a dense gradient on rank 0 only (a
    penalty over the whole table), table ``b`` sparse rows on both ranks."""
    import os

    import torch.distributed as dist

    from deltarec.train.collective import TorchCollective

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _mixed_model()
        opt = TorchCollective().distributed_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model)
        _mixed_loss(model, rank).backward()
        opt.synchronize()
        # numpy, not tensors: torch would share their memory with a process about to exit
        out.put((rank, {n: (p.grad.is_sparse, p.grad.numpy()) for n, p in model.named_parameters()}))
    finally:
        dist.destroy_process_group()


def _mixed_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"a": torch.nn.Embedding(6, 3), "b": torch.nn.Embedding(5, 2),
                                "lin": torch.nn.Linear(3, 1)})


def _mixed_loss(model, rank):
    ids = torch.tensor([[0, 3, 3], [1, 2, 4]][rank])
    a = model["a"](ids)
    loss = model["lin"](a).sum() + (model["b"](ids[:2]) ** 2).sum() * (rank + 1)
    if rank == 0:
        loss = loss + 0.1 * (model["a"].weight ** 2).sum()
    return loss


def test_sparse_and_dense_gradients_average_like_dense_allreduce():
    """The fused exchange (header + one gather) gives every rank the plain
    average of both ranks' dense gradients, whichever rank sent rows."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_mixed_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    expected = {}
    for rank in range(2):
        model = _mixed_model()
        _mixed_loss(model, rank).backward()
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / 2
    for rank in range(2):
        for n, g in expected.items():
            is_sparse, grad = got[rank][n]
            assert not is_sparse
            torch.testing.assert_close(torch.from_numpy(grad), g, msg=f"rank {rank}: {n}")
    assert float(expected["b.weight"][4].abs().sum()) == 0.0  # row 4 of b: nobody's batch, stays zero

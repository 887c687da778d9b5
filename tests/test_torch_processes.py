"""Local worker processes (train.launcher=processes), torch and Horovod: no
Spark. The pool starts once and serves run after run; the gradient exchange
is the same on both."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.train.backends import LocalBackend, TorchBackend, TrainingFailed, make_backend
from deltarec.train.checkpoint import load_checkpoint
from test_training import B, STEPS, WORLD, examples, interleave_for_one_worker, spec


def _assert_same(a, b, what):
    p1 = load_checkpoint(a["checkpoint"]["path"]).model_state
    p2 = load_checkpoint(b["checkpoint"]["path"]).model_state
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k} differs")


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_warm_pool_serves_the_next_run_with_the_same_processes(tmp_path, backend):
    t = examples(B * STEPS, seed=5)
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(interleave_for_one_worker(t), tmp_path / "one.parquet")
    one = LocalBackend().run(spec([tmp_path / "one.parquet"], tmp_path / "ck1"))
    first = make_backend(backend, None, WORLD, launcher="processes")
    assert first.spark is None and first.keep_warm
    a = first.run(spec([tmp_path / "two.parquet"], tmp_path / "ck2"))
    # another backend object, as the next night makes: the same warm processes
    b = make_backend(backend, None, WORLD, launcher="processes").run(spec([tmp_path / "two.parquet"],
                                                                          tmp_path / "ck3"))
    assert a["world_size"] == b["world_size"] == WORLD and a["steps"] == one["steps"] == STEPS
    assert [r["pid"] for r in b["ranks"]] == [r["pid"] for r in a["ranks"]]
    assert all(r["phases"]["group"] == 0.0 and "process_started_at" not in r["phases"] for r in b["ranks"])
    _assert_same(one, a, "first run")
    _assert_same(one, b, "warm run")  # nothing of the first run leaks into the second


def test_an_idle_horovod_pool_closes_and_the_next_run_starts_it_again(tmp_path):
    """Idle Horovod ranks keep negotiating (a core busy on 2 cores): the pool
    closes after its idle seconds; a run before them keeps the same ranks."""
    import time

    from deltarec.train.pool import WorkerPool

    pq.write_table(examples(B * STEPS, seed=5), tmp_path / "two.parquet")
    pool = WorkerPool("horovod", WORLD, idle_close_s=4.0)
    try:
        a = pool.run(spec([tmp_path / "two.parquet"], tmp_path / "ck1"))
        b = pool.run(spec([tmp_path / "two.parquet"], tmp_path / "ck2"))  # within the idle time: warm
        assert not any("error" in r for r in a + b), a + b
        pids = [p.pid for p in pool.procs]
        assert [r["pid"] for r in a[0]["ranks"]] == [r["pid"] for r in b[0]["ranks"]] == pids
        procs = list(pool.procs)
        assert procs and all(p.is_alive() for p in procs)
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(p.is_alive() for p in procs) and pool.procs == []  # closed after 4 idle seconds
        c = pool.run(spec([tmp_path / "two.parquet"], tmp_path / "ck3"))
        assert c[0]["steps"] == STEPS and pool.alive  # started again
    finally:
        pool.close()
    assert not pool.alive and WorkerPool("torch", WORLD).idle_close_s is None  # torch ranks wait for free


def test_local_process_error_names_the_failing_rank_and_the_next_run_starts_fresh(tmp_path):
    t = examples(B * 2)
    bad = t.column("item_idx").to_numpy().copy()
    bad[B:] = 999  # out of range only in rank 1's half
    pq.write_table(t.set_column(1, "item_idx", pa.array(bad)), tmp_path / "x.parquet")
    pq.write_table(t, tmp_path / "ok.parquet")
    before = TorchBackend(None, WORLD, timeout_s=300).run(spec([tmp_path / "ok.parquet"], tmp_path / "ck0"))
    with pytest.raises(TrainingFailed, match=r"worker rank 1/2 \(torch\) failed: IndexError") as e:
        TorchBackend(None, WORLD, timeout_s=300).run(spec([tmp_path / "x.parquet"], tmp_path / "ck"))
    assert "rank 0/2" not in str(e.value).split("\n")[0]
    after = TorchBackend(None, WORLD, timeout_s=300).run(spec([tmp_path / "ok.parquet"], tmp_path / "ck1"))
    assert not {r["pid"] for r in after["ranks"]} & {r["pid"] for r in before["ranks"]}  # a fresh pool
    _assert_same(before, after, "after an error")


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


class _Counting:
    """A real collective that counts the calls the exchange makes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*a, **kw)
        return counted


def _mixed_rank(kind: str, rank: int, env: dict, out) -> None:
    """One rank: table ``a`` gets a dense gradient on rank 0 only (a penalty
    over the whole table), table ``b`` sparse rows on both ranks."""
    import os

    from deltarec.train.exchange import GradientExchange
    from deltarec.train.workers import join_horovod, join_torch, leave_horovod, leave_torch

    os.environ.update(env)
    collective = _Counting(join_horovod(False) if kind == "horovod" else join_torch(False))
    try:
        model = _mixed_model()
        exchange = GradientExchange(model, torch.optim.SGD(model.parameters(), lr=1.0), collective)
        _mixed_loss(model, rank).backward()
        exchange.average()
        # numpy, not tensors: torch would share their memory with a process about to exit
        out.put((rank, collective.calls, {n: (p.grad.is_sparse, p.grad.numpy()) for n, p in model.named_parameters()}))
    finally:
        leave_horovod() if kind == "horovod" else leave_torch()


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


@pytest.mark.parametrize("kind", ["torch", "horovod"])
def test_sparse_and_dense_gradients_average_like_dense_allreduce_in_one_gather(kind):
    """The fused exchange gives every rank the plain average of both ranks'
    dense gradients, whichever rank sent rows and whichever sent a dense
    table, with one gather per step on either backend."""
    import multiprocessing as mp

    from deltarec.train.pool import group_env

    envs, release = group_env(kind, 2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_mixed_rank, args=(kind, r, envs[r], out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = {rank: (calls, grads) for rank, calls, grads in (out.get(timeout=120) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)
        release()
    expected = {}
    for rank in range(2):
        model = _mixed_model()
        _mixed_loss(model, rank).backward()
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / 2
    for rank in range(2):
        calls, grads = got[rank]
        assert calls == {"allgather": 1}, calls  # header, rows, dense table and the Linear: one collective
        for n, g in expected.items():
            is_sparse, grad = grads[n]
            assert not is_sparse
            torch.testing.assert_close(torch.from_numpy(grad), g, msg=f"{kind} rank {rank}: {n}")
    assert float(expected["b.weight"][4].abs().sum()) == 0.0  # row 4 of b: nobody's batch, stays zero

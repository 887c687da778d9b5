"""Row-wise optimizers: sparse embedding gradients through the step."""
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.train.backends import LocalBackend, make_backend
from deltarec.train.checkpoint import load_checkpoint
from deltarec.train.optim import LazyAdam, clip_grad_norm, keeps_sparse
from test_training import B, STEPS, WORLD, examples, interleave_for_one_worker, spec


def _table(sparse: bool):
    torch.manual_seed(0)
    return torch.nn.Embedding(6, 3, sparse=sparse)


def _steps(emb, opt, batches):
    for ids in batches:
        opt.zero_grad()
        (emb(torch.tensor(ids)) ** 2).sum().backward()
        opt.step()
    return emb.weight.detach().clone()


def test_lazy_adam_on_dense_gradients_is_adam():
    lin_a, lin_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    lin_b.load_state_dict(lin_a.state_dict())
    a = torch.optim.Adam(lin_a.parameters(), lr=0.05, weight_decay=0.01)
    b = LazyAdam(lin_b.parameters(), lr=0.05, weight_decay=0.01)
    x = torch.randn(8, 4)
    for _ in range(5):
        for m, o in ((lin_a, a), (lin_b, b)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for pa, pb in zip(lin_a.parameters(), lin_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_lazy_adam_moves_only_the_rows_a_batch_touched():
    batches = [[1, 3, 3], [1]]
    dense, lazy = _table(False), _table(True)
    w0 = lazy.weight.detach().clone()
    wd = _steps(dense, torch.optim.Adam(dense.parameters(), lr=0.1), batches)
    opt = LazyAdam(lazy.parameters(), lr=0.1)
    wl = _steps(lazy, opt, batches[:1])
    after_first = wl.clone()
    wl = _steps(lazy, opt, batches[1:])
    # step 1 is Adam's for the touched rows; rows never seen never move
    assert torch.equal(wl[[0, 2, 4, 5]], w0[[0, 2, 4, 5]])
    # step 2 touched only row 1: row 3 waits (dense Adam moves it on momentum)
    assert torch.equal(wl[3], after_first[3]) and not torch.equal(wd[3], after_first[3])
    assert not torch.equal(wl[1], after_first[1])
    m = opt.state[lazy.weight]["exp_avg"]
    assert float(m[[0, 2, 4, 5]].abs().sum()) == 0.0 and float(m[[1, 3]].abs().min()) > 0


def test_adagrad_on_sparse_gradients_equals_dense():
    batches = [[1, 3, 3], [1, 2], [5, 5, 0]]
    dense, sparse = _table(False), _table(True)
    wd = _steps(dense, torch.optim.Adagrad(dense.parameters(), lr=0.1), batches)
    opt = torch.optim.Adagrad(sparse.parameters(), lr=0.1)
    assert keeps_sparse(opt) and not keeps_sparse(torch.optim.Adagrad(sparse.parameters(), weight_decay=0.1))
    assert not keeps_sparse(torch.optim.Adam(sparse.parameters()))
    torch.testing.assert_close(_steps(sparse, opt, batches), wd)


def test_clip_takes_sparse_gradients_like_dense():
    dense, sparse = _table(False), _table(True)
    for emb in (dense, sparse):
        (emb(torch.tensor([1, 3, 3])) * 5).sum().backward()
    nd = float(torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5))
    ns = clip_grad_norm(sparse.parameters(), 0.5)
    assert ns == pytest.approx(nd, rel=1e-6)
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)


@pytest.mark.parametrize("backend", ["torch", "horovod"])
@pytest.mark.parametrize("optimizer", ["lazy_adam", "adagrad"])
def test_two_local_processes_with_row_wise_optimizer_and_clipping_equal_one_worker(tmp_path, optimizer, backend):
    t = examples(B * STEPS, seed=7)
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(interleave_for_one_worker(t), tmp_path / "one.parquet")
    kw = dict(optimizer=optimizer, lr=0.05, grad_clip=1.0)
    one = LocalBackend().run(spec([tmp_path / "one.parquet"], tmp_path / "ck1", **kw))
    two = make_backend(backend, None, WORLD, launcher="processes").run(spec([tmp_path / "two.parquet"],
                                                                            tmp_path / "ck2", **kw))
    p1 = load_checkpoint(one["checkpoint"]["path"]).model_state
    p2 = load_checkpoint(two["checkpoint"]["path"]).model_state
    p0 = load_checkpoint(LocalBackend().run(spec([], tmp_path / "ck0", **kw))["checkpoint"]["path"]).model_state
    assert max(float((p1[k] - p0[k]).abs().max()) for k in p1) > 1e-2
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6, msg=f"{backend}/{optimizer}: {k}")

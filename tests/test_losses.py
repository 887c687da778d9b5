"""train.loss: each objective against values derived by hand on a tiny batch,
and averaged gradients over 2 real processes equal to 1 process for the
ranking losses."""
from __future__ import annotations

import math

import pytest
import torch

from deltarec.train.losses import LOSSES, FULL_SOFTMAX_LIMIT, LossSpec, Objective, per_row_loss


class TableModel(torch.nn.Module):
    """s(u, i) = S[u, i]: every score known in advance; ``space`` the items
    the model knows (uniform negatives are drawn from it)."""

    def __init__(self, S, space=None):
        super().__init__()
        self.S = torch.nn.Parameter(torch.tensor(S, dtype=torch.float32))
        self.space = space

    def forward(self, b):
        return self.S[b["user_idx"], b["item_idx"]]

    def item_space(self):
        ids = torch.arange(self.S.shape[1]) if self.space is None else torch.tensor(self.space)
        return {"item_idx": ids}


S = [[0.5, 2.0, -1.0, 0.3, 1.5],
     [1.0, -0.5, 0.8, 0.0, -2.0],
     [0.2, 0.4, 1.2, -0.7, 0.9]]


def batch(rows):
    """rows: (user, item, label, history)"""
    return {"user_idx": torch.tensor([r[0] for r in rows]), "item_idx": torch.tensor([r[1] for r in rows]),
            "label": torch.tensor([float(r[2]) for r in rows]), "weight": torch.ones(len(rows)),
            "history_idx": torch.tensor([r[3] for r in rows])}


ROWS = [(0, 1, 1, [-1, 2, 3]),   # u0 bought 1; had bought 2 and 3
        (1, 2, 1, [-1, -1, 2]),  # u1 re-bought 2
        (0, 3, 0, [-1, 2, 3]),   # a negative of u0 (from the delta job)
        (2, 2, 1, [4, 4, 0])]    # u2 bought 2 (so 2 is twice among the step's positives)


def sp(x):
    return math.log1p(math.exp(x))


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_bce_is_the_pointwise_log_loss():
    got = per_row_loss("bce", TableModel(S), batch(ROWS))
    close(got, [sp(-S[0][1]), sp(-S[1][2]), sp(S[0][3]), sp(-S[2][2])])


def test_bpr_with_in_batch_negatives():
    # candidates: the step's positives' items 1 (u0), 2 (u1), 2 (u2); a row never gets its own item,
    # nor a positive of its own customer
    got = per_row_loss("bpr", TableModel(S), batch(ROWS), history_negatives=0, uniform_negatives=0)
    r0 = (sp(S[0][2] - S[0][1]) + sp(S[0][2] - S[0][1])) / 2  # u0/1 vs 2 (u1) and 2 (u2)
    r1 = sp(S[1][1] - S[1][2])  # u1/2 vs 1 (u0); both 2s are its own item
    r3 = sp(S[2][1] - S[2][2])  # u2/2 vs 1 (u0)
    close(got, [r0, r1, sp(S[0][3]), r3])  # the label-0 row keeps its pointwise term


def test_sampled_softmax_in_batch_with_log_q():
    got = per_row_loss("sampled_softmax", TableModel(S), batch(ROWS), history_negatives=0, uniform_negatives=0)
    # item 2 is in the step's positives twice: each copy's logit is corrected by log 2, so together they
    # count as the item once, as in the full softmax
    r0 = lse(S[0][1], S[0][2] - math.log(2), S[0][2] - math.log(2)) - S[0][1]
    r1 = lse(S[1][2], S[1][1]) - S[1][2]
    r3 = lse(S[2][2], S[2][1]) - S[2][2]
    close(got, [r0, r1, sp(S[0][3]), r3])
    assert abs(r0 - (lse(S[0][1], S[0][2]) - S[0][1])) < 1e-12
    # without the correction the duplicate counts twice
    raw = per_row_loss("sampled_softmax", TableModel(S), batch(ROWS), history_negatives=0, uniform_negatives=0,
                       logq=False)
    close(raw[0], lse(S[0][1], S[0][2], S[0][2]) - S[0][1])


def test_sampled_softmax_own_history_negatives():
    # u0's history holds 2 and 3 (not its item 1): both are drawn (2 distinct <= 8), each with probability 1
    got = per_row_loss("sampled_softmax", TableModel(S), batch(ROWS), in_batch=False, uniform_negatives=0)
    r0 = lse(S[0][1], S[0][2], S[0][3]) - S[0][1]
    r1 = 0.0  # u1's only history item is its own item: no negative, the loss of a sure thing
    r3 = lse(S[2][2], S[2][4], S[2][0]) - S[2][2]  # 4 twice in the history is one candidate
    close(got, [r0, r1, sp(S[0][3]), r3])
    # only one of u0's two history items drawn: each had probability 1/2, so log Q = log(1/2)
    one = per_row_loss("sampled_softmax", TableModel(S), batch(ROWS[:1]), in_batch=False, uniform_negatives=0,
                       history_negatives=1)
    drawn = [lse(S[0][1], S[0][j] + math.log(2)) - S[0][1] for j in (2, 3)]
    assert min(abs(float(one[0].detach()) - d) for d in drawn) < 1e-5


def test_sampled_softmax_uniform_negatives_share_one_draw():
    # the model knows one item (4): three uniform draws are all 4, each corrected by log(3 / 1)
    got = per_row_loss("sampled_softmax", TableModel(S, space=[4]), batch(ROWS), in_batch=False,
                       history_negatives=0, uniform_negatives=3)
    close(got, [lse(S[0][1], S[0][4]) - S[0][1], lse(S[1][2], S[1][4]) - S[1][2], sp(S[0][3]),
                lse(S[2][2], S[2][4]) - S[2][2]])
    # the draw depends on the step (seeded), the same on every rank
    obj = Objective(LossSpec("sampled_softmax", in_batch=False, history_negatives=0, uniform_negatives=5, seed=3))
    model = TableModel(S)
    obj.begin_step(model, batch(ROWS), 7)
    a = obj.uniform["item_idx"].clone()
    obj.begin_step(model, batch(ROWS), 7)
    assert torch.equal(a, obj.uniform["item_idx"])


def test_full_softmax_over_every_item_row():
    got = per_row_loss("full_softmax", TableModel(S), batch(ROWS))
    full = [lse(*S[u]) - S[u][i] for u, i in ((0, 1), (1, 2), (2, 2))]
    close(got, [full[0], full[1], sp(S[0][3]), full[2]])


def test_losses_give_gradients_and_refuse_what_they_cannot_do():
    for name in LOSSES:
        m = TableModel(S)
        per_row_loss(name, m, batch(ROWS)).sum().backward()
        assert m.S.grad is not None and m.S.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="train.loss='hinge'"):
        LossSpec("hinge")
    with pytest.raises(ValueError, match="needs negatives"):
        LossSpec("bpr", in_batch=False, history_negatives=0, uniform_negatives=0)

    class Huge(TableModel):
        def item_space(self):
            return {"item_idx": torch.arange(FULL_SOFTMAX_LIMIT + 1)}

    with pytest.raises(ValueError, match="full_softmax scores all"):
        per_row_loss("full_softmax", Huge(S), batch(ROWS))


# ------------------------------------------------------------ 2 real processes == 1 process
@pytest.mark.parametrize("loss", ["bpr", "sampled_softmax"])
def test_two_processes_on_a_global_batch_equal_one_process(tmp_path, loss):
    """In-batch negatives come from the *global* batch (gathered every step)
    and the uniform draw is seeded by the step, so 2 workers on B rows update
    the model exactly like 1 worker on the same B rows, for each ranking loss."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deltarec.train.backends import LocalBackend, make_backend
    from deltarec.train.checkpoint import load_checkpoint
    from test_training import B, STEPS, WORLD, examples, interleave_for_one_worker, spec

    rng = np.random.default_rng(4)
    t = examples(B * STEPS, seed=9)
    n = t.num_rows
    hist = [rng.integers(-1, 40, 3).tolist() for _ in range(n)]  # own-history negatives come from these
    t = t.append_column("history_idx", pa.array(hist, pa.list_(pa.int64())))
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(interleave_for_one_worker(t), tmp_path / "one.parquet")
    kw = dict(model_name="repeat_explore", history_length=3, optimizer="sgd", lr=0.5,
              model_params={"user_buckets": 50, "item_buckets": 40, "embedding_dim": 4, "hidden": [8],
                            "history_length": 3},
              loss={"name": loss, "history_negatives": 2, "uniform_negatives": 5})
    one = LocalBackend().run(spec([tmp_path / "one.parquet"], tmp_path / "ck1", **kw))
    two = make_backend("torch", None, WORLD, launcher="processes").run(spec([tmp_path / "two.parquet"],
                                                                            tmp_path / "ck2", **kw))
    assert two["world_size"] == WORLD and one["steps"] == two["steps"] == STEPS
    p1 = load_checkpoint(one["checkpoint"]["path"]).model_state
    p2 = load_checkpoint(two["checkpoint"]["path"]).model_state
    init = build_init(kw)
    assert max(float((p1[k].float() - init[k].float()).abs().max()) for k in init) > 1e-2  # it trained
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6, msg=f"{loss}: {k} differs")


def build_init(kw):
    from deltarec.models import build_model

    torch.manual_seed(3)  # test_training.spec's seed
    return build_model(kw["model_name"], **kw["model_params"]).state_dict()

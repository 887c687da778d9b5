"""The ranking model's repeat term: the customer's own history combined with
what the model learns; every scorer passes histories. Real torch, CPU, small."""
from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch

from deltarec.models import build_model
from deltarec.models.common import load_grown
from deltarec.models.ranking import REPEAT_STATE, RECENCY_DECAY

U, I, L = 30, 25, 6


def ranking(embedding="hashed", history_length=L, seed=0, **kw):
    torch.manual_seed(seed)
    p = {"user_buckets": U, "item_buckets": I, "embedding_dim": 8, "hidden": [16], "embedding": embedding,
         "history_length": history_length, **kw}
    if embedding == "dynamic":
        p.update(user_rows=12, item_rows=10)
    return build_model("ranking", **p).eval()


def randomize_repeat(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in REPEAT_STATE:
            t = dict(m.named_parameters())[name]
            t.copy_(torch.randn(t.shape, generator=g))
    return m


def histories(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, I, (n, L), generator=g)
    h[: n // 4] = -1  # no history
    h[n // 4: n // 2, :4] = -1  # a short one
    return h


def test_repeat_term_adds_what_the_history_says():
    m = ranking()
    with torch.no_grad():
        m.repeat.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # log1p(count) only
    users = torch.tensor([3, 3, 3])
    item = torch.tensor([7, 7, 7])
    hist = torch.tensor([[-1, -1, -1, -1, 1, 2],  # 7 absent
                         [-1, -1, 7, 4, 1, 2],  # once
                         [7, 5, 7, 4, 7, 2]])  # three times
    s = m({"user_idx": users, "item_idx": item, "history_idx": hist})
    counts = [(row == 7).sum().item() for row in hist]
    torch.testing.assert_close(s - s[0], torch.log1p(torch.tensor(counts, dtype=torch.float32)))
    assert s[1] > s[0] and s[2] > s[1]
    # recency: the same count, a more recent last purchase scores higher under a recency weight
    with torch.no_grad():
        m.repeat.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    old_new = torch.tensor([[7, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 7]])
    s = m({"user_idx": users[:2], "item_idx": item[:2], "history_idx": old_new})
    torch.testing.assert_close(s[1] - s[0], torch.tensor(1.0 - RECENCY_DECAY ** 5))
    # a fresh model's repeat term is zero: the history changes nothing until it is learned
    fresh = ranking()
    a = fresh({"user_idx": users, "item_idx": item, "history_idx": hist})
    torch.testing.assert_close(a, fresh({"user_idx": users, "item_idx": item}))


@pytest.mark.parametrize("hidden, dropout", [([], 0.0), ([16], 0.0), ([16, 8, 4], 0.3)])
def test_score_all_splits_the_mlp_exactly_for_any_depth(hidden, dropout):
    # score_all computes the MLP's first layer per user (not on [u, i, u*i] rows): any depth, dropout off in eval
    m = ranking(history_length=0, hidden=hidden, dropout=dropout)
    users, items = torch.arange(U), torch.arange(I)
    s = m.score_all(users, items)
    pairs = m({"user_idx": users.repeat_interleave(I), "item_idx": items.repeat(U)}).view(U, I)
    torch.testing.assert_close(s, pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embedding", ["hashed", "dynamic"])
def test_score_all_equals_forward_row_by_row_with_history(embedding):
    m = randomize_repeat(ranking(embedding))
    if embedding == "dynamic":
        m.item_lookup_keys, m.item_lookup_rows = torch.arange(I), torch.arange(I) % 10
        m.user_lookup_keys, m.user_lookup_rows = torch.arange(U), torch.arange(U) % 12
    n = 12
    users, hist = torch.arange(n) * 2 % U, histories(n)
    items = torch.arange(I)
    s = m.score_all(users, items, history_idx=hist)
    assert s.shape == (n, I)
    for it in range(I):
        f = m({"user_idx": users, "item_idx": torch.full((n,), it), "history_idx": hist})
        torch.testing.assert_close(s[:, it], f, rtol=1e-5, atol=1e-5)
    # the history moves the scores of exactly the items in it
    plain = m.score_all(users, items)
    in_hist = torch.zeros(n, I, dtype=torch.bool)
    for r in range(n):
        in_hist[r, hist[r][hist[r] >= 0]] = True
    if embedding == "dynamic":  # the vocabulary's rows say which indices are one id (here: equal mod 10)
        in_hist = (in_hist.float() @ (torch.arange(I)[:, None] % 10 == torch.arange(I)[None, :] % 10).float()) > 0
    moved = ~torch.isclose(s, plain, atol=1e-6)
    assert torch.equal(moved & ~in_hist, torch.zeros_like(moved)) and moved[in_hist].float().mean() > 0.9
    with pytest.raises(ValueError, match="one row per user"):
        m.score_all(users, items, history_idx=hist[:3])


def test_trained_model_ranks_a_rebought_item_above_an_unseen_one():
    """Customers re-buy from their own history; item popularity is uniform, so
    only the history can tell a re-buy from an unseen item. Scored on fresh
    random histories, which no user embedding can have memorised."""
    rng = np.random.default_rng(0)
    n_users, per = 200, 4
    hist = np.full((n_users, L), -1, dtype=np.int64)
    for u in range(n_users):
        k = rng.integers(2, L + 1)
        hist[u, L - k:] = rng.choice(I, size=k, replace=False)
    rows_u, rows_i, rows_h, labels = [], [], [], []
    for u in range(n_users):
        own = hist[u][hist[u] >= 0]
        for _ in range(per):
            rows_u.append(u), rows_i.append(int(rng.choice(own))), rows_h.append(hist[u]), labels.append(1.0)
            unseen = np.setdiff1d(np.arange(I), own)
            for j in rng.choice(unseen, size=2, replace=False):  # negatives share the event's history
                rows_u.append(u), rows_i.append(int(j)), rows_h.append(hist[u]), labels.append(0.0)
    b = {"user_idx": torch.tensor(rows_u) % U, "item_idx": torch.tensor(rows_i),
         "history_idx": torch.from_numpy(np.stack(rows_h)), "label": torch.tensor(labels)}
    m = ranking().train()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(m(b), b["label"]).backward()
        opt.step()
    m.eval()
    assert m.repeat.weight.abs().sum() > 0  # it learned a repeat weight
    # new customers: 3 items each in their history
    test_hist = torch.full((20, L), -1, dtype=torch.long)
    for r in range(20):
        test_hist[r, -3:] = torch.from_numpy(rng.choice(I, size=3, replace=False))
    s = m.score_all(torch.arange(20) % U, torch.arange(I), history_idx=test_hist)
    for r in range(20):
        own = test_hist[r][test_hist[r] >= 0]
        others = torch.tensor([i for i in range(I) if i not in own.tolist()])
        assert s[r, own].min() > s[r, others].max()  # every re-buy above every unseen item


def test_checkpoint_without_the_repeat_term_scores_as_before_and_warm_starts():
    m = ranking()
    old_state = {k: v for k, v in m.state_dict().items() if k not in REPEAT_STATE}  # a pre-repeat checkpoint
    with torch.no_grad():  # what the old model scored: the same weights without any repeat term
        b = {"user_idx": torch.arange(8), "item_idx": torch.arange(8) % I, "history_idx": histories(8)}
        before = m({k: v for k, v in b.items() if k != "history_idx"})
    loaded = randomize_repeat(ranking(seed=5))
    loaded.load_state_dict(old_state)  # strict load of an old checkpoint: the term comes back at zero
    for name in REPEAT_STATE:
        assert not dict(loaded.named_parameters())[name].any()
    torch.testing.assert_close(loaded(b), before)
    # warm start (train.loop → load_grown) from such a parent: the term starts at zero, said in the log
    child = ranking(seed=6)  # as train.loop builds it, then loads the parent
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("deltarec.models").addHandler(handler)
    try:
        load_grown(child, old_state)
    finally:
        logging.getLogger("deltarec.models").removeHandler(handler)
    assert any("predates" in r.getMessage() and "repeat.weight" in r.getMessage() for r in records)
    torch.testing.assert_close(child(b), before)
    # any other missing parameter is still another model's checkpoint
    with pytest.raises(KeyError, match="item_bias.weight"):
        load_grown(ranking(), {k: v for k, v in old_state.items() if k != "item_bias.weight"})


def test_history_length_zero_turns_the_term_off():
    m = randomize_repeat(ranking(history_length=0))
    assert m.inputs == ("event_day",) and m.history_length == 0  # the item clock's day stays
    assert ranking(history_length=0, item_time=False).inputs == ()
    b = {"user_idx": torch.arange(6), "item_idx": torch.arange(6), "history_idx": histories(6)}
    torch.testing.assert_close(m(b), m({"user_idx": b["user_idx"], "item_idx": b["item_idx"]}))
    with pytest.raises(ValueError, match="history_length=-1"):
        ranking(history_length=-1)


# ------------------------------------------------------------ scorers pass histories
def _rows(users, items, hist, times, ids):
    t0 = dt.datetime(2011, 12, 1, tzinfo=dt.timezone.utc)
    return pa.table({"user_idx": pa.array(users, pa.int64()), "item_idx": pa.array(items, pa.int64()),
                     "history_idx": pa.array(hist, pa.list_(pa.int64())),
                     "event_time": pa.array([t0 + dt.timedelta(minutes=m) for m in times], pa.timestamp("us", "UTC")),
                     "event_id": pa.array(ids, pa.string()), "label": pa.array([1.0] * len(users), pa.float32())})


def test_user_histories_take_the_history_before_the_first_row_in_job_order():
    from deltarec.evaluation.prequential import align_histories, user_histories

    # user 4 bought 8 and 9 at the same minute (one invoice); the job's window orders them by event id, so
    # e1's history is the pre-night one ([5, 6]) and e2's also holds 8 — which must not leak into scoring
    rows = _rows([4, 4, 2, 4], [9, 8, 3, 1], [[5, 6, 8], [5, 6], [], [5, 6, 8, 9]], [0, 0, 5, 10],
                 ["e2", "e1", "x", "e3"])
    rows = rows.take(pa.array([0, 3, 2, 1]))  # arrival order must not matter
    users, hist = user_histories(rows, 3)
    assert users.tolist() == [2, 4]
    assert hist.tolist() == [[-1, -1, -1], [-1, 5, 6]]
    got = align_histories(np.array([1, 4]), (users, hist))
    assert got.tolist() == [[-1, -1, -1], [-1, 5, 6]]  # an unknown user has none


def test_prequential_and_gate_rank_with_histories():
    from deltarec.evaluation.gate import evaluate_models
    from deltarec.evaluation.metrics import ranking_metrics
    from deltarec.evaluation.prequential import evaluate, model_topk, relevant_sets, user_histories

    m = ranking()
    with torch.no_grad():
        m.repeat.weight.copy_(torch.tensor([[0.0, 5.0, 0.0, 0.0]]))  # an own item outranks anything else
    rng = np.random.default_rng(3)
    n_users = 10
    hist = [rng.choice(I, size=3, replace=False).tolist() for _ in range(n_users)]
    users = list(range(n_users))
    items = [h[0] for h in hist]  # each re-buys an own item
    rows = _rows(users, items, hist, [0] * n_users, [f"e{u}" for u in users])
    catalog = np.arange(I)
    hs = user_histories(rows, L)
    res = evaluate({"model": m}, None, np.array(users), np.array(items), catalog, 3, histories=hs)
    uniq, relevant = relevant_sets(np.array(users), np.array(items))
    want = ranking_metrics(model_topk(m, uniq, catalog, 3, histories=hs[1]), relevant, 3)
    assert res["model"]["hr"] == pytest.approx(want["hr"], abs=1e-5) == 1.0  # the history puts it in the top 3
    without = evaluate({"model": m}, None, np.array(users), np.array(items), catalog, 3)
    assert without["model"]["hr"] < 1.0  # and without histories it does not
    gate = evaluate_models({"candidate": m}, rows, catalog, ["hr@3", "auc"])
    assert gate["candidate"]["hr@3"] == pytest.approx(1.0)
    gate_plain = evaluate_models({"candidate": m}, rows.drop_columns(["history_idx"]), catalog, ["hr@3"])
    assert gate_plain["candidate"]["hr@3"] < 1.0


def test_nightly_gives_the_ranking_model_its_history(tmp_path):
    from conftest import make_config
    from deltarec.pipeline.training import history_length, model_params

    cfg = make_config(tmp_path, "features.history_length=7")
    params = model_params(cfg)
    assert params["history_length"] == 7 and history_length(cfg) == 7  # batches carry 7 items
    assert build_model("ranking", **params).inputs == ("history_idx", "event_day")
    off = make_config(tmp_path, "features.history_length=0", "model.item_time=false")
    assert history_length(off) == 0 and build_model("ranking", **model_params(off)).inputs == ()

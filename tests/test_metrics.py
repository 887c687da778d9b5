"""Tests for deltarec.evaluation.metrics: hand-computed values and sklearn parity."""
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from deltarec.evaluation.metrics import auc, gauc, logloss, ranking_metrics, slice_masks, topk_from_scores

approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-12)  # noqa: E731


# ------------------------------------------------------------- hand-computed
def test_auc_hand():
    # pos scores {0.8, 0.4}, neg {0.4, 0.1}. Pairs: (0.8>0.4)=1, (0.8>0.1)=1,
    # (0.4=0.4)=0.5, (0.4>0.1)=1 -> 3.5 / 4 = 0.875
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == approx(0.875)
    # perfectly inverted -> 0; all tied -> 0.5
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    assert auc([1, 0, 1, 0], [3, 3, 3, 3]) == 0.5
    # weight 3 on the tied positive: pairs weighted (1*1 + 1*1 + 3*0.5 + 3*1) / (4*2) = 6.5/8
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1], weights=[1, 3, 1, 1]) == approx(0.8125)


def test_auc_errors():
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"0 or 1, got 2.*index 1"):
        auc([1, 2, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [0.1, float("nan")])
    with pytest.raises(ValueError, match="length 3, expected 2"):
        auc([1, 0], [0.1, 0.2, 0.3])


def test_logloss_hand():
    # y=1,p=0.8 -> -ln 0.8 = 0.22314; y=0,p=0.4 -> -ln 0.6 = 0.51083; mean = 0.36698
    assert logloss([1, 0], [0.8, 0.4]) == approx((-math.log(0.8) - math.log(0.6)) / 2)
    # weighted: (1*0.22314 + 3*0.51083) / 4
    assert logloss([1, 0], [0.8, 0.4], weights=[1, 3]) == approx((-math.log(0.8) - 3 * math.log(0.6)) / 4)
    # clipping: p=0 for a positive costs -ln(eps) instead of inf
    assert logloss([1], [0.0], eps=1e-7) == approx(-math.log(1e-7))
    with pytest.raises(ValueError, match=r"\[0, 1\], got 1.5"):
        logloss([1], [1.5])


def test_gauc_hand():
    # user a: pos {0.9}, neg {0.5, 0.95} -> AUC 1/2, n=3
    # user b: pos {0.3, 0.2}, neg {0.2} -> (1 + 0.5)/2 = 0.75, n=3
    # user c: only positives -> skipped
    # GAUC = (3*0.5 + 3*0.75) / 6 = 0.625
    users = ["a", "a", "a", "b", "b", "b", "c"]
    labels = [1, 0, 0, 1, 1, 0, 1]
    scores = [0.9, 0.5, 0.95, 0.3, 0.2, 0.2, 0.1]
    assert gauc(users, labels, scores) == approx(0.625)
    assert math.isnan(gauc([1, 2], [1, 0], [0.5, 0.5]))  # nobody has both classes


def test_ranking_metrics_hand():
    top = np.array([[10, 20, 30],    # relevant {20}: hit at rank 2
                    [40, 50, 60],    # relevant {40, 60, 70, 80}: hits at ranks 1 and 3
                    [1, 2, 3],       # relevant {}: excluded
                    [7, 8, 9]])      # relevant {99}: no hit
    rel = [{20}, {40, 60, 70, 80}, set(), {99}]
    # user0: hr 1, dcg 1/log2(3), idcg 1 -> ndcg 1/log2(3)=0.63093, recall 1, mrr 1/2
    # user1: hr 1, dcg 1 + 1/log2(4) = 1.5, idcg (min(4,3)=3 items) 1 + 1/log2(3) + 1/2,
    #        recall 2/4, mrr 1
    # user3: all 0
    idcg1 = 1 + 1 / math.log2(3) + 0.5
    want = {"hr": 2 / 3, "ndcg": (1 / math.log2(3) + 1.5 / idcg1) / 3, "recall": 1.5 / 3, "mrr": 1.5 / 3}
    assert ranking_metrics(top, rel, 3) == approx(want)
    # same via CSR (indptr, indices)
    indptr, indices = np.array([0, 1, 5, 5, 6]), np.array([20, 40, 60, 70, 80, 99])
    assert ranking_metrics(top, (indptr, indices), 3) == approx(want)
    # k=1 cuts each list: user0 misses (20 is at rank 2); user1 hits at 1 with idcg 1
    assert ranking_metrics(top, rel, 1) == approx({"hr": 1 / 3, "ndcg": 1 / 3, "recall": 0.25 / 3, "mrr": 1 / 3})
    # a repeated item counts once: [20, 20, 30] with {20, 30} -> hits at ranks 1 and 3
    # dcg 1 + 0.5, idcg 1 + 1/log2(3), recall 1, mrr 1
    r = ranking_metrics(np.array([[20, 20, 30]]), [{20, 30}], 3)
    assert r == approx({"hr": 1.0, "ndcg": 1.5 / (1 + 1 / math.log2(3)), "recall": 1.0, "mrr": 1.0})
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\].*got 4"):
        ranking_metrics(top, rel, 4)
    with pytest.raises(ValueError, match="4 users"):
        ranking_metrics(top, rel[:3], 3)
    assert all(math.isnan(v) for v in ranking_metrics(top, [set()] * 4, 3).values())


def test_topk_from_scores():
    s = np.array([[0.1, 0.9, 0.5, 0.9, 0.3],
                  [2.0, 2.0, 2.0, 2.0, 2.0],
                  [0.0, 1.0, -np.inf, 3.0, 1.0]])
    # row0: 0.9@1, 0.9@3 (tie -> lower index first), 0.5@2
    # row1: all tied -> indices 0, 1, 2
    # row2: 3.0@3, then 1.0@1 and 1.0@4 tied at the boundary -> 1 wins
    assert topk_from_scores(s, 3).tolist() == [[1, 3, 2], [0, 1, 2], [3, 1, 4]]
    assert topk_from_scores(s, 2).tolist() == [[1, 3], [0, 1], [3, 1]]
    ids = np.array([100, 101, 102, 103, 104])
    assert topk_from_scores(s, 1, item_ids=ids).tolist() == [[101], [100], [103]]
    with pytest.raises(ValueError, match="got 6"):
        topk_from_scores(s, 6)


def test_topk_from_scores_random_matches_stable_sort():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=(200, 40)).astype(np.float32)  # many ties
    for k in (1, 7, 40):
        want = np.argsort(-s, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(topk_from_scores(s, k), want)


# ------------------------------------------------------------ sklearn parity
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    n = 3000
    users = rng.integers(0, 60, n)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.round(rng.random(n) + 0.3 * labels, 2)  # coarse -> many ties, AUC well above 0.5
    probs = np.clip(np.round(rng.random(n), 2), 0.01, 0.99)
    weights = rng.random(n) * 2
    return users, labels, scores, probs, weights


def test_auc_vs_sklearn(data):
    _, y, s, _, w = data
    assert auc(y, s) == approx(roc_auc_score(y, s))
    assert auc(y, s, weights=w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), rel=1e-10)


def test_logloss_vs_sklearn(data):
    _, y, _, p, w = data
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-10)
    assert logloss(y, p, weights=w) == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-10)


def test_gauc_vs_sklearn_per_user(data):
    u, y, s, _, _ = data
    num = den = 0.0
    for user in np.unique(u):
        m = u == user
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    assert gauc(u, y, s) == pytest.approx(num / den, rel=1e-10)


# -------------------------------------------------------------------- slices
def test_slices_by_hand():
    new_u = np.array([True, True, False, False, False, False])
    col = np.array(["a", "a", "b", "b", "b", "b"])
    masks = slice_masks(new_users=new_u, by=col, by_name="kind")
    assert set(masks) == {"all", "new_users", "kind=a", "kind=b"}
    assert masks["new_users"].tolist() == new_u.tolist() and masks["all"].all()
    assert masks["kind=a"].tolist() == (col == "a").tolist() and masks["kind=b"].tolist() == (col == "b").tolist()
    with pytest.raises(ValueError, match="differ in length"):
        slice_masks(new_users=new_u, new_items=new_u[:3])

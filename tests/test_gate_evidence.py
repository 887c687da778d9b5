"""A gate that knows its sample (#18 item 7): gate.min_users, a seeded
paired bootstrap over users, the decision's confidence stored; on hand-built
per-user metrics whose bootstrap answer is computable by hand."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import make_config
from deltarec.evaluation.bootstrap import per_user_bootstrap, rows_bootstrap
from deltarec.evaluation.gate import decide, evaluate_models
from deltarec.evaluation.metrics import auc, gauc, logloss


def gate_cfg(*overrides):
    return make_config("/tmp/unused", "gate.metrics=[ndcg@10]", "gate.min_users=0", *overrides).gate


def test_bootstrap_of_two_users_is_the_share_of_worse_resamples():
    """User a: candidate +1.0 over the champion, user b: -1.2 (mean -0.1: the
    point values fail). Resampling two users gives aa (+1.0), ab, ba (-0.1),
    bb (-1.2): the candidate is worse in 3 of 4 equally likely resamples."""
    champ, cand = np.array([0.0, 1.2]), np.array([1.0, 0.0])
    g = gate_cfg("gate.bootstrap_samples=4000", "gate.bootstrap_seed=7")
    b = per_user_bootstrap(cand, champ, "ndcg@10", g)
    assert b["samples"] == 4000 and b["p_worse"] == pytest.approx(0.75, abs=0.03)
    assert per_user_bootstrap(cand, champ, "ndcg@10", g) == b  # seeded: the same holdout, the same answer
    point = {"ndcg@10": float(cand.mean())}, {"ndcg@10": float(champ.mean())}
    assert not decide(*point, g).passed  # without the bootstrap the third decimal decides
    noisy = decide(*point, g, users=2, bootstrap={"ndcg@10": b})  # 0.75 < confidence 0.95: within noise
    assert noisy.passed and "within noise" in noisy.reason and noisy.checks[0]["p_worse"] == b["p_worse"]
    assert noisy.to_dict()["confidence"]["p_worse"] == {"ndcg@10": b["p_worse"]}
    strict = gate_cfg("gate.bootstrap_samples=4000", "gate.bootstrap_seed=7", "gate.confidence=0.7")
    sure = decide(*point, strict, users=2, bootstrap={"ndcg@10": per_user_bootstrap(cand, champ, "ndcg@10", strict)})
    assert not sure.passed and sure.to_dict()["verdict"] == "rejected" and "resamples" in sure.reason


def test_worse_for_every_user_is_rejected_with_certainty():
    champ = np.linspace(0.2, 0.8, 30)
    g = gate_cfg("gate.bootstrap_samples=200")
    b = per_user_bootstrap(champ - 0.05, champ, "ndcg@10", g)
    assert b["p_worse"] == 1.0 and b["diff_ci"] == [pytest.approx(-0.05), pytest.approx(-0.05)]
    d = decide({"ndcg@10": float(champ.mean() - 0.05)}, {"ndcg@10": float(champ.mean())}, g, users=30,
               bootstrap={"ndcg@10": b})
    assert not d.passed and "worse in 100% of 200 resamples" in d.reason


def test_row_metrics_of_a_resample_are_the_metrics_of_its_rows():
    """One resample, redone by hand: each drawn user's rows repeated as often
    as the user was drawn; auc / gauc / logloss of those rows (metrics.py)
    give the difference the bootstrap records."""
    rng = np.random.default_rng(3)
    n = 240
    users = rng.integers(100, 130, n)
    y = (rng.random(n) < 0.4).astype(np.float64)
    a, b = np.round(rng.random(n), 1), np.round(rng.random(n), 1)  # ties on purpose
    g = gate_cfg("gate.bootstrap_samples=1", "gate.bootstrap_seed=11")
    uniq = np.unique(users)
    drawn = np.random.default_rng(11).integers(0, len(uniq), (1, len(uniq)))[0]  # the bootstrap's first draw
    rows = np.concatenate([np.where(users == uniq[u])[0] for u in drawn])
    sig = lambda s: 1 / (1 + np.exp(-s))  # noqa: E731
    want = {"auc": auc(y[rows], a[rows]) - auc(y[rows], b[rows]),
            "gauc": gauc(users[rows], y[rows], a[rows]) - gauc(users[rows], y[rows], b[rows]),
            "logloss": logloss(y[rows], sig(a[rows])) - logloss(y[rows], sig(b[rows]))}
    for metric, diff in want.items():
        c, ch = (sig(a), sig(b)) if metric == "logloss" else (a, b)
        got = rows_bootstrap(users, y, c, ch, metric, g)
        assert got["samples"] == 1 and got["diff_ci"][0] == pytest.approx(diff, abs=1e-6), metric


def test_fewer_users_than_min_users_is_insufficient_evidence():
    g = gate_cfg("gate.min_users=5")
    d = decide({"ndcg@10": 0.9}, {"ndcg@10": 0.1}, g, users=4).to_dict()
    assert not d["passed"] and d["verdict"] == "insufficient_evidence"
    assert "4 users" in d["reason"] and "gate.min_users=5" in d["reason"] and "champion stays" in d["reason"]
    assert decide({"ndcg@10": 0.9}, {"ndcg@10": 0.1}, g, users=5).passed


def test_bootstrap_never_counts_nan_resamples():
    b = per_user_bootstrap(np.array([np.nan, np.nan]), np.array([0.1, 0.2]), "ndcg@10", gate_cfg())
    assert b == {"p_worse": None, "samples": 0, "diff_ci": None}


def test_evaluate_models_bootstraps_each_gated_metric_of_real_models():
    from deltarec.models import build_model

    def ranking(seed):
        torch.manual_seed(seed)
        return build_model("ranking", user_buckets=20, item_buckets=30, embedding_dim=4, hidden=[8],
                           history_length=0).eval()

    rng = np.random.default_rng(0)
    n = 300
    rows = pa.table({"user_idx": rng.integers(0, 20, n), "item_idx": rng.integers(0, 30, n),
                     "label": (rng.random(n) < 0.3).astype(np.float32)})
    g = make_config("/tmp/unused", "gate.metrics=[auc,logloss,hr@5]", "gate.bootstrap_samples=50").gate
    res = evaluate_models({"candidate": ranking(1), "champion": ranking(1)}, rows, np.arange(30), list(g.metrics),
                          gate=g)
    assert res["holdout_users"] == len(np.unique(rows["user_idx"].to_numpy()))
    # the same model twice: never worse in any resample, for every metric
    assert {m: b["p_worse"] for m, b in res["bootstrap"].items()} == {"auc": 0.0, "logloss": 0.0, "hr@5": 0.0}
    other = evaluate_models({"candidate": ranking(2), "champion": ranking(1)}, rows, np.arange(30),
                            list(g.metrics), gate=g)["bootstrap"]
    assert all(0.0 <= b["p_worse"] <= 1.0 and b["samples"] == 50 for b in other.values())


def test_eval_k_beyond_the_catalogue_ranks_the_whole_catalogue():
    """eval.k = 10 on a catalogue of 3 films (noticed in #18): the top 10 is
    every film, so each user with a held-out film is a hit, instead of
    `k must be in [1, N]`."""
    from deltarec.evaluation.prequential import evaluate
    from deltarec.models import build_model

    torch.manual_seed(0)
    model = build_model("ranking", user_buckets=20, item_buckets=30, embedding_dim=4, hidden=[8],
                        history_length=0).eval()
    users, items, catalog = np.array([1, 2, 2, 5]), np.array([3, 4, 7, 7]), np.array([3, 4, 7])
    out = evaluate({"champion": model}, np.array([3]), users, items, catalog, 10)
    assert out["users"] == 3 and out["champion"]["hr"] == 1.0 and out["champion"]["recall"] == 1.0
    assert out["popularity"]["hr"] == pytest.approx(1 / 3, abs=1e-5)  # rounded; a popularity list of one film: only user 1's

"""The gate's decision rule and its scoring of real torch models."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import make_config
from deltarec.config import ConfigError
from deltarec.evaluation.gate import decide, evaluate_models, score_pairs
from deltarec.evaluation.metrics import auc, logloss, ranking_metrics


def gate_cfg(*overrides):
    return make_config("/tmp/unused", *overrides).gate


def test_absolute_tolerance_bounds_each_metric():
    g = gate_cfg("gate.metrics=[auc,ndcg@10]", "gate.tolerance=0.01")
    champ = {"auc": 0.70, "ndcg@10": 0.20}
    ok = decide({"auc": 0.691, "ndcg@10": 0.25}, champ, g)
    assert ok.passed and [c["passed"] for c in ok.checks] == [True, True]
    bad = decide({"auc": 0.689, "ndcg@10": 0.25}, champ, g)
    assert not bad.passed and "auc 0.68900 not >= 0.69000" in bad.reason and "ndcg@10" not in bad.reason


def test_relative_tolerance_scales_with_the_champion():
    g = gate_cfg("gate.metrics=[hr@5]", "gate.tolerance=0.1", "gate.tolerance_kind=relative")
    assert decide({"hr@5": 0.45}, {"hr@5": 0.5}, g).passed  # bound 0.5 - 0.05
    res = decide({"hr@5": 0.449}, {"hr@5": 0.5}, g)
    assert not res.passed and res.checks[0]["bound"] == pytest.approx(0.45)


def test_logloss_must_not_rise_and_missing_values_fail():
    g = gate_cfg("gate.metrics=[logloss]", "gate.tolerance=0.0")
    assert decide({"logloss": 0.40}, {"logloss": 0.41}, g).passed
    assert not decide({"logloss": 0.42}, {"logloss": 0.41}, g).passed
    nan = decide({"logloss": float("nan")}, {"logloss": 0.41}, g)
    assert not nan.passed and nan.checks[0]["passed"] is False  # no evidence, no promotion


def test_gate_config_rejects_unknown_metrics():
    for bad in ("gate.metrics=[ndcg]", "gate.metrics=[auc@3]", "gate.metrics=[precision]", "gate.metrics=[]"):
        with pytest.raises(ConfigError, match="gate.metrics"):
            gate_cfg(bad)
    with pytest.raises(ConfigError, match="gate.tolerance"):
        gate_cfg("gate.tolerance=1.5", "gate.tolerance_kind=relative")


def ranking(seed: int):
    """A real ranking model (no history), randomly initialised from ``seed``."""
    from deltarec.models import build_model

    torch.manual_seed(seed)
    return build_model("ranking", user_buckets=20, item_buckets=30, embedding_dim=4, hidden=[8],
                       history_length=0).eval()


def test_evaluate_models_matches_the_metrics_module():
    rng = np.random.default_rng(0)
    n = 400
    rows = pa.table({"user_idx": rng.integers(0, 20, n), "item_idx": rng.integers(0, 30, n),
                     "label": (rng.random(n) < 0.3).astype(np.float32)})
    models = {"candidate": ranking(1), "champion": ranking(2)}
    catalog = np.arange(30)
    res = evaluate_models(models, rows, catalog, ["auc", "logloss", "ndcg@5", "hr@5"])
    assert res["n"] == n
    y = rows["label"].to_numpy()
    for role, model in models.items():
        s = score_pairs(model, rows)
        with torch.no_grad():
            want_s = model({"user_idx": torch.from_numpy(rows["user_idx"].to_numpy()),
                            "item_idx": torch.from_numpy(rows["item_idx"].to_numpy())}).numpy()
        np.testing.assert_allclose(s, want_s, rtol=1e-6)  # the pairs' scores are the model's forward
        assert res[role]["auc"] == pytest.approx(auc(y, s), abs=1e-6)
        assert res[role]["logloss"] == pytest.approx(logloss(y, 1 / (1 + np.exp(-s.astype(np.float64)))), abs=1e-6)
        pos = y == 1
        users = np.unique(rows["user_idx"].to_numpy()[pos])
        rel = [set(rows["item_idx"].to_numpy()[pos & (rows["user_idx"].to_numpy() == u)].tolist()) for u in users]
        with torch.no_grad():
            top = np.argsort(-model.score_all(torch.from_numpy(users), torch.from_numpy(catalog)).numpy(),
                             axis=1, kind="stable")[:, :5]
        r = ranking_metrics(top, rel, 5)
        assert res[role]["ndcg@5"] == pytest.approx(r["ndcg"], abs=1e-6)
        assert res[role]["hr@5"] == pytest.approx(r["hr"], abs=1e-6)
    assert res["candidate"] != res["champion"]  # two models, two sets of figures
    assert res["users"] == len(np.unique(rows["user_idx"].to_numpy()[y == 1]))


def test_evaluate_models_slices_and_one_class_slices():
    rows = pa.table({"user_idx": np.array([0, 0, 1, 1, 2, 2]), "item_idx": np.array([1, 2, 3, 4, 5, 6]),
                     "label": np.array([1, 0, 1, 0, 1, 1], dtype=np.float32)})
    res = evaluate_models({"candidate": ranking(3)}, rows, np.arange(30), ["auc"],
                          slices={"new_users": np.array([False, False, False, False, True, True])})
    assert res["slices"]["new_users"]["n"] == 2
    assert math.isnan(res["slices"]["new_users"]["candidate"]["auc"])  # one class: undefined, not a crash
    assert not math.isnan(res["candidate"]["auc"])

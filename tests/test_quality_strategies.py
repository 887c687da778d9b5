"""nightly_quality.py --strategies: an ablation run skips the costly
strategies, never the count baselines, and checks only the goals it can."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_default_runs_every_strategy_and_a_choice_keeps_incremental():
    import nightly_quality as nq

    assert nq.parse_args([]).strategies == list(nq.CHOOSABLE)
    assert nq.parse_args(["--strategies", "stale"]).strategies == ["incremental", "stale"]
    with pytest.raises(SystemExit):
        nq.parse_args(["--strategies", "incremental,bogus"])


def test_an_ablation_is_checked_against_the_baselines_it_scored():
    import nightly_quality as nq

    def strat(ndcg):
        return {"mean_ndcg10": ndcg, "mean_seconds": 1.0, "mean_hr10": 0.5, "mean_auc": 0.8, "mean_gauc": 0.8,
                "mean_examples": 1, "max_driver_peak_mb": None, "max_jvm_peak_mb": None,
                "max_workers_peak_mb": None, "nights": [{"night": 1, "trained_on": "d", "scored_on": "e",
                                                         "users": 3, "ndcg10": ndcg, "seconds": 1.0}]}

    s = {"incremental": strat(0.35), "stale": strat(0.30), "popularity": strat(0.10), "personal": strat(0.31),
         "personal_recency": strat(0.32), "tifu_knn": strat(0.30)}
    g = nq.goal_check(s)  # no full_retrain, no ALS: their goals are not checked, nor claimed
    assert set(g["checks"]) == {"ndcg_1.10x_best_baseline_personal_recency", "ndcg_above_stale",
                                *[f"ndcg_above_{b}" for b in ("popularity", "personal", "personal_recency",
                                                              "tifu_knn")]}
    assert g["checks"]["ndcg_1.10x_best_baseline_personal_recency"] is False  # 0.35 < 1.10 x 0.32
    md = nq.markdown({"strategies": s, "k": 10, "data": "x", "partial": False, "total_seconds": 60,
                      "auc_negatives_per_purchase": 100})
    assert "| full_retrain |" not in md and "| incremental | 0.3500 |" in md

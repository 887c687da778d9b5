"""Serving a model that reads the whole-history repeat lists (#17): on a small
real lake built by two real nights with ``model.name=repeat_explore`` and
``features.repeat_items``, the recommendations table, live ``POST /score``, the
MLflow pyfunc model and the night's prequential metrics score each customer
with their ``user_state`` lists as of the time they score (the refresh: the day
after the data; the prequential metrics: the scored day), so a served model
ranks as it was trained and benchmarked, not from the history window alone."""
import datetime as dt
import io

import numpy as np
import pyarrow.compute as pc
import pytest

from conftest import make_config
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from test_recommend import independent_topk, same_ranking, table_rows

K = 30  # lists longer than the window below: the two repeat sources differ for most customers
# sampled_softmax (as the #17 benchmark trains it): scores are log-probabilities, so the repeat term moves the
# customer's own items; 40 deep (the table, the prequential metrics) they are in the ranking, so scoring with
# the lists or with the window changes the items and the metrics, not only the scores (the gate's too: ndcg@40).
BASE = ("demo.history_days=2", "demo.nights=1", "train.epochs=1", "recommend.enabled=true",
        "model.name=repeat_explore", f"features.repeat_items={K}", "features.history_length=5",
        "recommend.k=40", "eval.k=40", "train.loss=sampled_softmax", "gate.metrics=[ndcg@40, auc]")
US_PER_DAY = 86_400_000_000
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory, demo_lake):
    root = tmp_path_factory.mktemp("serve-repeats") / "lake"
    cfg = make_config(root, *BASE)
    results, _ = demo_lake(root, *BASE)
    assert [r.status for r in results] == ["committed", "committed"]
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    return dict(cfg=cfg, lake=lake, ledger=ledger, champ=ledger.champion(cfg.model.name),
                runs=ledger.runs(cfg.model.name))


def micros(t: dt.datetime) -> int:
    return round((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1_000_000)


def lists_as_of(state_rows: list[dict], ref: int, half_life: float) -> dict[str, np.ndarray]:
    """score_all's repeat lists of these user_state rows as of ``ref`` (µs),
    computed here from the stored columns: the top K (stored ranked), decayed
    counts rescaled from repeat_as_of to ref, days since the last purchase."""
    n_rows = len(state_rows)
    out = {"repeat_idx": np.full((n_rows, K), -1, np.int64),
           **{c: np.zeros((n_rows, K), np.float32) for c in ("repeat_weights", "repeat_counts", "repeat_ages")}}
    for r, row in enumerate(state_rows):
        if not row or not row["repeat_ids"]:
            continue
        n = min(K, len(row["repeat_ids"]))
        scale = 0.5 ** ((ref - micros(row["repeat_as_of"])) / US_PER_DAY / half_life)
        out["repeat_idx"][r, :n] = row["repeat_idx"][:n]
        out["repeat_weights"][r, :n] = np.array(row["repeat_decayed"][:n]) * scale
        out["repeat_counts"][r, :n] = row["repeat_counts"][:n]
        out["repeat_ages"][r, :n] = [(ref - micros(t)) / US_PER_DAY for t in row["repeat_last"][:n]]
    return out


@pytest.fixture(scope="module")
def table(spark, lake):
    """The table's rows, and for a sample of its model-scored customers the
    champion's top-k computed here with their lists (as of the day after the
    data's newest event) and without (the history window only)."""
    cfg, L = lake["cfg"], lake["lake"]
    rows = table_rows(L, cfg.recommend.table)
    state = {r["user_id"]: r for r in L.read_arrow(cfg.lake.user_state_table).to_pylist()}
    newest = pc.max(L.read_arrow(cfg.lake.item_stats_table)["last_seen"]).as_py()
    as_of = micros(dt.datetime.combine(newest.date() + dt.timedelta(days=1), dt.time(), UTC))
    model_users = sorted(u for u, (_, _, src, _) in rows.items() if u is not None and src[0] == "model")
    sample = sorted(np.random.default_rng(0).choice(model_users, size=12, replace=False).tolist())
    lists = lists_as_of([state[u] for u in sample], as_of, cfg.features.repeat_half_life_days)
    args = (spark, cfg, L, lake["champ"], sample, cfg.recommend.k, cfg.recommend.catalog_days)
    return dict(rows=rows, sample=sample, state=state, as_of=as_of,
                with_lists=independent_topk(*args, repeat=lists), window=independent_topk(*args))


def differing(t) -> str:
    """A sampled customer whose top-k with the lists holds other items than the window's."""
    users = [u for u in t["sample"] if set(t["with_lists"][u][0]) != set(t["window"][u][0])]
    assert users, "every sampled customer ranks alike with and without the lists: the test would not see them"
    return users[0]


def test_the_table_scores_each_customer_with_their_lists_as_of_the_refresh(lake, table):
    t = table
    assert lake["champ"].config["features"]["repeat_items"] == K and t["rows"][None][2][0] == "popularity"
    for u in t["sample"]:
        items, scores, _, _ = t["rows"][u]
        same_ranking(items, scores, *t["with_lists"][u])
    # what the table served before: the window's scores (alike only for a customer whose window holds
    # every item of their lists, once each)
    apart = [u for u in t["sample"] if not np.allclose(t["rows"][u][1], t["window"][u][1], atol=1e-3)]
    assert len(apart) >= len(t["sample"]) // 2
    u = differing(t)
    assert set(t["rows"][u][0]) != set(t["window"][u][0])


def test_live_score_and_deeper_lookups_rank_as_the_table(lake, table):
    from fastapi.testclient import TestClient

    from deltarec.serving.app import create_app
    from deltarec.serving.holder import ModelHolder

    cfg, t = lake["cfg"], table
    holder = ModelHolder(cfg)
    assert holder.poll_once() and holder.current.repeat_as_of == t["as_of"]
    with TestClient(create_app(cfg, holder, poll=False)) as c:
        for u in [differing(t), *t["sample"][:3]]:
            want_items, want_scores = t["rows"][u][0], t["rows"][u][1]
            live = c.post("/score", json={"user_id": u, "items": [], "k": cfg.recommend.k}).json()
            deep = c.get(f"/recommendations/{u}", params={"k": cfg.recommend.k + 5}).json()  # past the table
            assert live["from"] == deep["from"] == "model"
            for got in (live["items"], deep["items"][:cfg.recommend.k]):
                for want in ((want_items, want_scores), t["with_lists"][u]):  # the table, and with the lists
                    same_ranking([e["item_id"] for e in got], [e["score"] for e in got], *want)


def test_a_live_basket_joins_the_lists_as_bought_at_the_refresh_time(spark, lake, table):
    """POST /score's items are purchases since the table: each enters the
    customer's lists with count 1, weight 1 and age 0 at the refresh's time."""
    from deltarec.serving.holder import ModelHolder

    cfg, t = lake["cfg"], table
    u = next(x for x in t["sample"] if len(t["state"][x]["repeat_ids"]) < K)  # room for one more: nothing pruned
    item = next(i for i in t["rows"][None][0] if i not in t["state"][u]["repeat_ids"])  # popular, new to u
    lists = lists_as_of([t["state"][u]], t["as_of"], cfg.features.repeat_half_life_days)
    n = len(t["state"][u]["repeat_ids"])
    holder = ModelHolder(cfg)
    holder.poll_once()
    snap = holder.current
    lists["repeat_idx"][0, n] = snap.item_bucket[item]
    lists["repeat_weights"][0, n], lists["repeat_counts"][0, n] = 1.0, 1.0
    want = independent_topk(spark, cfg, lake["lake"], lake["champ"], [u], cfg.recommend.k, cfg.recommend.catalog_days,
                            repeat=lists, bought={u: [item]})[u]  # the window holds the basket too
    got = snap.score(u, [item], cfg.recommend.k)["items"]
    same_ranking([i for i, _ in got], [s for _, s in got], *want)


def test_the_mlflow_bundle_ranks_as_the_table(lake, table):
    import pandas as pd
    import torch

    from deltarec.serving.pyfunc import DeltarecRecommender, build_bundle

    cfg, t = lake["cfg"], table
    buf = io.BytesIO()
    torch.save(build_bundle(lake["lake"], cfg, lake["champ"]), buf)  # plain values: what MLflow's artifact holds
    buf.seek(0)
    m = DeltarecRecommender()
    m.load_bundle(torch.load(buf, weights_only=True))
    users = [differing(t), *t["sample"][:3]]
    out = m.predict(None, pd.DataFrame({"user_id": users, "k": [cfg.recommend.k] * len(users)}))
    for u, items, scores in zip(out["user_id"], out["item_ids"], out["scores"]):
        same_ranking(list(items), list(scores), t["rows"][u][0], t["rows"][u][1])
        same_ranking(list(items), list(scores), *t["with_lists"][u])


def night_lists(cfg, L, night, pos):
    """(sorted user_idx of ``pos``, their lists): each scored customer's lists
    from the user_state the night read (the version before its own commit),
    as of the start of the day of ``pos``'s first event."""
    mine = [v for v, m in L.commit_metadata(cfg.lake.user_state_table) if m.get("run_id") == night.run_id]
    before = {r["user_id"]: r for r in L.read_arrow(cfg.lake.user_state_table, min(mine) - 1).to_pylist()}
    day = micros(dt.datetime.combine(pc.min(pos["event_time"]).as_py().date(), dt.time(), UTC))
    idx_of = {}
    for u, i in zip(pos["user_id"].to_pylist(), pos["user_idx"].to_pylist()):
        idx_of.setdefault(i, set()).add(u)
    assert all(len(v) == 1 for v in idx_of.values())  # no two scored customers share a bucket here
    uniq = np.array(sorted(idx_of))
    lists = lists_as_of([before.get(next(iter(idx_of[i]))) for i in uniq], day, cfg.features.repeat_half_life_days)
    assert (lists["repeat_idx"] >= 0).any(axis=1).sum() >= 3  # returning customers, with lists
    return uniq, lists


def test_the_nights_prequential_metrics_score_with_the_lists_as_of_the_scored_day(spark, lake):
    """Night 2's stored champion/stale metrics equal those recomputed here
    with the lists from user_state before night 2's commit, as of the start of
    the scored day, and differ from the window-only ones."""
    from deltarec.evaluation.prequential import catalog_indices, evaluate, user_histories
    from deltarec.pipeline.prequential import popular
    from deltarec.train.checkpoint import load_model

    cfg, L, runs = lake["cfg"], lake["lake"], lake["runs"]
    first, night = runs
    stored = night.metrics["prequential"]
    assert stored["runs"] == {"champion": first.run_id, "stale": first.run_id}
    ex = L.read_arrow(cfg.lake.examples_table).filter(
        (pc.field("run_id") == night.run_id) & (pc.field("label") == 1.0) & (pc.field("kind") == "event"))
    start = pc.min(ex["event_time"]).as_py()
    uniq, lists = night_lists(cfg, L, night, ex)
    model = load_model(first)
    catalog = catalog_indices(spark.createDataFrame(L.read_arrow(cfg.lake.item_stats_table).select(["item_id"])),
                              cfg.features)
    top = popular(L, cfg.lake.examples_table, [first.run_id], start - dt.timedelta(days=cfg.eval.popularity_days),
                  start, cfg.eval.k)
    args = ({"champion": model}, top, ex["user_idx"].to_numpy(), ex["item_idx"].to_numpy(), catalog, cfg.eval.k)
    hist = user_histories(ex, model.history_length)
    want = evaluate(*args, histories=hist, repeats=(uniq, lists))
    window = evaluate(*args, histories=hist)
    assert stored["users"] == want["users"]
    assert stored["champion"] == want["champion"] and stored["stale"] == want["champion"]
    assert window["champion"] != want["champion"]


def test_the_nights_gate_ranks_each_customer_with_their_lists_as_of_the_scored_day(spark, lake):
    """Night 2's stored gate metrics (candidate and champion) equal those
    recomputed here on its held-out rows with each customer's lists from
    user_state before night 2's commit, as of the start of the scored day,
    and differ from the window-only ones: the gate ranks as the prequential
    metrics and serving do."""
    from deltarec.evaluation.gate import evaluate_models
    from deltarec.evaluation.prequential import catalog_indices
    from deltarec.train.checkpoint import load_model

    cfg, L, runs = lake["cfg"], lake["lake"], lake["runs"]
    first, night = runs
    gate = night.metrics["gate"]
    assert gate["champion_run_id"] == first.run_id and gate["n"] > 0, gate
    rows = L.read_arrow(cfg.lake.examples_table).filter(
        (pc.field("run_id") == night.run_id) & pc.field("holdout")).select(
        ["user_idx", "item_idx", "label", "history_idx", "event_time", "event_id", "user_id"])
    uniq, lists = night_lists(cfg, L, night, rows.filter(pc.field("label") == 1.0))
    models = {"candidate": load_model(night), "champion": load_model(first)}
    catalog = catalog_indices(spark.createDataFrame(L.read_arrow(cfg.lake.item_stats_table).select(["item_id"])),
                              cfg.features)
    ranking = [m for m in cfg.gate.metrics if "@" in m]
    assert ranking, cfg.gate.metrics
    want = evaluate_models(models, rows, catalog, ranking, repeats=(uniq, lists))
    window = evaluate_models(models, rows, catalog, ranking)
    for role in models:
        assert {m: gate[role][m] for m in ranking} == want[role], (role, gate[role], want[role])
    assert any(window[role] != want[role] for role in models), (window, want)

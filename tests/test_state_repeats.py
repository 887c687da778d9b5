"""Whole-history repeat lists (features/repeats.py): the nightly user-state
update on a tiny hand-computed example, the examples built from it, and the
repeat_explore model reading them."""
from __future__ import annotations

import datetime as dt

import pytest

from conftest import make_config

UTC = dt.timezone.utc
H = 10.0  # half-life in days: decayed weights below are 0.5 ** (age_days / 10)


def t(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2024, 1, 1, hour, tzinfo=UTC) + dt.timedelta(days=day)


def naive(when: dt.datetime) -> dt.datetime:
    """As Spark (session time zone UTC) returns a timestamp."""
    return when.replace(tzinfo=None)


def _features(tmp_path, k=2):
    cfg = make_config(str(tmp_path), f"features.repeat_items={k}", f"features.repeat_half_life_days={H}",
                      "features.negatives=0")
    return cfg.features


def _events(spark, rows):
    return spark.createDataFrame(
        [(f"e{n}", u, i, when, "purchase", None, 1, 1.0, None, v) for n, (u, i, when, v) in enumerate(rows)],
        "event_id string, user_id string, item_id string, event_time timestamp, event_type string, "
        "order_id string, quantity bigint, price double, rating double, source_version bigint")


def _retractions(spark, rows):
    return spark.createDataFrame([(f"r{n}", u, i, when, v) for n, (u, i, when, v) in enumerate(rows)],
                                 "event_id string, user_id string, item_id string, event_time timestamp, "
                                 "source_version bigint")


def _state(spark, f, base, events, retractions):
    from deltarec.features.examples import spark_type
    from deltarec.features.state import next_user_state
    from deltarec.lake import schemas

    if base is None:  # an empty USER_STATE
        base = spark.createDataFrame([], ", ".join(f"{x.name} {spark_type(x.type)}" for x in schemas.USER_STATE))
    return next_user_state(base, events, retractions, f)


def _rows(df):
    return {r["user_id"]: r for r in df.collect()}


def test_two_nights_with_a_cancellation_match_hand_computed_decayed_counts(spark, tmp_path):
    f = _features(tmp_path, k=2)
    # night 1: a buys x on day 0 and day 10, y on day 10, z on day 10 (k=2 keeps two)
    #          b buys x on day 5
    n1 = _events(spark, [("a", "x", t(0), 1), ("a", "x", t(10), 1), ("a", "y", t(10), 1), ("a", "z", t(10, 11), 1),
                         ("b", "x", t(5), 1)])
    s1 = _state(spark, f, None, n1, _retractions(spark, []))
    r = _rows(s1)
    # a, as of day 10 12:00: x = 0.5 ** (10/10) + 1 = 1.5 (count 2); y = 1; z = 0.5 ** (1/24/10) < 1 -> dropped
    assert r["a"]["repeat_ids"] == ["x", "y"]
    assert r["a"]["repeat_counts"] == [2.0, 1.0]
    assert r["a"]["repeat_decayed"] == pytest.approx([1.5, 1.0])
    assert r["a"]["repeat_as_of"] == naive(t(10))
    assert r["a"]["repeat_last"] == [naive(t(10)), naive(t(10))]
    assert r["b"]["repeat_ids"] == ["x"] and r["b"]["repeat_decayed"] == pytest.approx([1.0])

    # night 2 (base = night 1's state): a buys y on day 20; b's day-5 purchase of x is cancelled; c is new
    n2 = _events(spark, [("a", "y", t(20), 2), ("c", "w", t(20), 2)])
    s2 = _state(spark, f, s1, n2, _retractions(spark, [("b", "x", t(5), 2)]))
    r = _rows(s2)
    # a as of day 20: y = 1 * 0.5 + 1 = 1.5 (count 2), x = 1.5 * 0.5 = 0.75 (count 2): y first
    assert r["a"]["repeat_ids"] == ["y", "x"]
    assert r["a"]["repeat_decayed"] == pytest.approx([1.5, 0.75])
    assert r["a"]["repeat_counts"] == [2.0, 2.0]
    assert r["b"]["repeat_ids"] == []  # its only purchase cancelled
    assert r["b"]["retractions"] == 1
    assert r["c"]["repeat_ids"] == ["w"] and r["c"]["repeat_decayed"] == pytest.approx([1.0])


def test_examples_carry_the_lists_as_of_their_day(spark, tmp_path):
    from deltarec.features.examples import build_examples

    f = _features(tmp_path, k=5)
    ev = _events(spark, [("a", "x", t(0), 1), ("a", "x", t(10), 1), ("a", "y", t(20), 1)])
    items = spark.createDataFrame([("x",), ("y",)], "item_id string")
    ex = build_examples(ev, _retractions(spark, []), items, f, "r1").where("kind = 'event'")
    got = {(r["item_id"], r["event_time"].replace(tzinfo=UTC)): r for r in ex.collect()}
    assert got[("x", t(0))]["repeat_ids"] == []  # nothing before its day
    assert got[("x", t(10))]["repeat_ids"] == ["x"]
    # as of day 10 00:00: the day-0 noon purchase is 9.5 days old
    assert got[("x", t(10))]["repeat_weights"] == pytest.approx([0.5 ** 0.95], rel=1e-6)
    assert got[("x", t(10))]["repeat_ages"] == pytest.approx([9.5])
    y = got[("y", t(20))]
    assert y["repeat_ids"] == ["x"] and y["repeat_counts"] == [2.0]
    assert y["repeat_weights"] == pytest.approx([0.5 ** 1.95 + 0.5 ** 0.95], rel=1e-6)


def test_repeat_gate_forced_to_repeat_ranks_by_decayed_counts():
    import torch

    from deltarec.models import build_model

    torch.manual_seed(0)
    m = build_model("repeat_explore", user_buckets=8, item_buckets=64, embedding_dim=4, hidden=[8],
                    history_length=5, repeat_items=4).eval()
    with torch.no_grad():  # the gate all the way to "repeat"
        m.gate.bias.fill_(50.0)
    rep = {"repeat_idx": torch.tensor([[7, 3, 9, -1], [5, 2, -1, -1]]),
           "repeat_weights": torch.tensor([[0.4, 2.5, 1.1, 0.0], [0.2, 0.9, 0.0, 0.0]]),
           "repeat_counts": torch.tensor([[3.0, 4.0, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0]]),
           "repeat_ages": torch.tensor([[1.0, 30.0, 2.0, 0.0], [5.0, 8.0, 0.0, 0.0]])}
    items = torch.tensor([2, 3, 5, 7, 9, 11])
    s = m.score_all(torch.tensor([1, 2]), items, torch.full((2, 5), -1), repeat=rep)
    for u in range(2):
        w = {int(i): float(x) for i, x in zip(rep["repeat_idx"][u], rep["repeat_weights"][u]) if i >= 0}
        own = [int(i) for i in items if int(i) in w]
        by_model = sorted(own, key=lambda i: -float(s[u, (items == i).nonzero()[0, 0]]))
        assert by_model == sorted(own, key=lambda i: -w[i])
        # every own item above every other, and the repeat share is the decayed count's share
        others = [float(s[u, j]) for j, i in enumerate(items) if int(i) not in w]
        assert min(float(s[u, (items == i).nonzero()[0, 0]]) for i in own) > max(others)
        total = sum(w.values())
        for i in own:
            assert float(s[u, (items == i).nonzero()[0, 0]]) == pytest.approx(torch.log(torch.tensor(w[i] / total)).item(),
                                                                             abs=1e-4)

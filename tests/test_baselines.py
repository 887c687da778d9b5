"""Baselines of the nightly benchmark: personal history topped up with the
popular items, and Spark MLlib ALS (implicit) on the real session."""
from __future__ import annotations

import numpy as np
import pytest

from deltarec.evaluation.baselines import ImplicitALS, item_counts, personal_scores, personal_topk

CATALOG = np.array(["a", "b", "c", "d", "e"], dtype=object)


def test_item_counts_counts_catalogue_items_only():
    counts = item_counts(["b", "b", "d", "zz", "a", "b"], CATALOG)
    assert counts.tolist() == [1.0, 3.0, 0.0, 1.0, 0.0]


def test_personal_ranks_own_most_bought_first_then_popular():
    # 7-day popularity: b 5, d 4, a 2, c and e never.
    pop = item_counts(["b"] * 5 + ["d"] * 4 + ["a"] * 2, CATALOG)
    hist_users = ["u1", "u1", "u1", "u1", "u3", "u3", "ghost", "u1"]
    hist_items = ["c", "c", "c", "a", "a", "d", "b", "not-in-catalogue"]
    top = personal_topk(hist_users, hist_items, ["u1", "u2", "u3"], CATALOG, pop, k=5)
    # u1: own c (3) then own a (1), then the popular b, d; e last (ties by catalogue order).
    assert top[0].tolist() == ["c", "a", "b", "d", "e"]
    # u2 has no history: the popular list alone, then the never-bought items.
    assert top[1].tolist() == ["b", "d", "a", "c", "e"]
    # u3 bought a and d once each: the tie between own items goes to the more popular d.
    assert top[2].tolist() == ["d", "a", "b", "c", "e"]
    # A user's own item outranks even the most popular item it never bought.
    s = personal_scores(hist_users, hist_items, ["u1"], CATALOG, pop)
    assert s[0, 0] > s[0, 1]  # a (own, once) > b (popular, never bought)


def test_personal_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one value per catalogue item"):
        personal_scores(["u"], ["a"], ["u"], CATALOG, [1.0, 2.0])
    with pytest.raises(ValueError, match="parallel"):
        personal_scores(["u", "v"], ["a"], ["u"], CATALOG, np.zeros(5))
    with pytest.raises(ValueError, match="must not repeat"):
        personal_scores(["u"], ["a"], ["u"], ["a", "a"], np.zeros(2))


def test_als_implicit_learns_two_groups_on_spark(spark):
    # Two groups of customers with disjoint tastes; each customer bought all
    # but one item of their group. ALS must put the missing item of their own
    # group above every item of the other group.
    groups = {"A": ["a1", "a2", "a3", "a4"], "B": ["b1", "b2", "b3", "b4"]}
    rows, held_out = [], {}
    for g, items in groups.items():
        for n in range(8):
            user = f"{g}{n}"
            held_out[user] = items[n % 4]
            rows += [(user, it) for it in items if it != held_out[user]] * 2
    df = spark.createDataFrame(rows, "user_id string, item_id string")
    als = ImplicitALS(spark, rank=4, max_iter=10, reg_param=0.01, alpha=10.0, seed=1).fit(df)
    assert als.interactions == 16 * 3
    catalog = np.array(sorted(groups["A"] + groups["B"]), dtype=object)
    users = np.array(sorted(held_out), dtype=object)
    top = als.topk(users, catalog, k=4)
    for user, row in zip(users, top):
        assert {x[0] for x in row} == {user[0].lower()}, f"{user}: top-4 {row.tolist()} mixes in the other group"
    scores = als.scores(users, catalog)
    for r, user in enumerate(users):
        other = [j for j, it in enumerate(catalog) if it[0] != user[0].lower()]
        assert scores[r, list(catalog).index(held_out[user])] > scores[r, other].max()
    # A customer ALS never saw gets the fallback (e.g. popularity) row.
    fb = np.arange(len(catalog), dtype=float)
    assert als.scores(["stranger"], catalog, fallback=fb)[0].tolist() == fb.tolist()

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


def test_personal_with_a_half_life_counts_recent_purchases_more():
    day = np.datetime64("2011-06-30T00:00", "us")
    t = lambda d: np.datetime64(f"2011-06-{d:02d}T10:00", "us")  # noqa: E731
    pop = item_counts(["e"] * 9, CATALOG)  # e is popular, never bought by u
    # u bought a three times a month ago, c once yesterday
    users, items = ["u", "u", "u", "u"], ["a", "a", "a", "c"]
    times = [t(1), t(1), t(1), t(29)]
    plain = personal_topk(users, items, ["u"], CATALOG, pop, k=3)[0].tolist()
    assert plain == ["a", "c", "e"]  # by count
    s = personal_scores(users, items, ["u"], CATALOG, pop, hist_times=times, now=day, half_life_days=7)
    # a: 3 * 0.5 ** (28.58 / 7) ≈ 0.18 < c: 0.5 ** (0.58 / 7) ≈ 0.94
    assert [CATALOG[j] for j in np.argsort(-s[0], kind="stable")[:3]] == ["c", "a", "e"]
    age = (day - np.array(times, dtype="datetime64[us]")) / np.timedelta64(1, "D")
    w = 0.5 ** (age / 7)
    own_a, own_c = w[:3].sum(), w[3]
    big = pop.max() + 1
    assert s[0, 0] == pytest.approx(own_a / min(own_a, own_c) * big + pop[0])
    assert s[0, 0] > s[0, 4]  # an own item, however old, above the popular one
    with pytest.raises(ValueError, match="after now"):
        personal_scores(users, items, ["u"], CATALOG, pop, hist_times=times, now=t(2), half_life_days=7)


def test_tifu_knn_on_a_hand_computed_three_customer_example():
    from deltarec.evaluation.tifu_knn import TifuParams, tifu_scores, tifu_vectors

    cat = np.array(["a", "b", "c", "d"], dtype=object)
    # X: baskets {a, b} then {a} then {c}; Y: one basket {a}; Z: {b} then {b, c} (b twice in the
    # first basket counts once; "zz" is outside the catalogue)
    lines = [("X", "a", 1), ("X", "b", 1), ("X", "a", 2), ("X", "c", 3), ("Y", "a", 5),
             ("Z", "b", 1), ("Z", "b", 1), ("Z", "zz", 1), ("Z", "b", 4), ("Z", "c", 4)]
    u, i, b = (np.array(x, dtype=object if k < 2 else np.int64) for k, x in enumerate(zip(*lines)))
    p = TifuParams(groups=2, within_decay=0.5, group_decay=0.5, neighbours=2, alpha=0.5)
    ids, V = tifu_vectors(u, i, b, cat, p)
    assert ids.tolist() == ["X", "Y", "Z"]
    # X, 3 baskets in 2 groups ({b1}, {b2, b3}); basket j weighs 0.5 ** (3 - j); group g 0.5 ** (1 - g):
    #   (0.5 * (a .25 + b .25) + 1 * (a .5 + c 1) / 2) / 2 = a .1875, b .0625, c .25
    # Y, 1 basket (fewer than the groups: its own group, g = 0): 0.5 * (a 1) / 1 = a .5
    # Z, 2 baskets, a group each: (0.5 * (b .5) + 1 * (b 1 + c 1)) / 2 = b .625, c .5
    want = np.array([[.1875, .0625, .25, 0], [.5, 0, 0, 0], [0, .625, .5, 0]])
    np.testing.assert_allclose(V, want)
    # X's nearest two (squared Euclidean): itself (0) and Y (.1641), not Z (.4141): blend X with their mean
    exact = tifu_scores((ids, V), ["X"], p)
    np.testing.assert_allclose(exact[0], 0.5 * want[0] + 0.5 * (want[0] + want[1]) / 2)
    np.testing.assert_allclose(exact[0], [.265625, .046875, .1875, 0])
    S = tifu_scores((ids, V), ["X", "W"], p, tie_break=[0, 0, 0, 5])
    np.testing.assert_allclose(S[0][:3], exact[0][:3])
    # the tie-break (d popular) orders only what TIFU-KNN leaves tied: d, never bought near X, comes last
    # but above nothing; W, without history, gets the tie-break alone
    assert np.argsort(-S[0]).tolist() == [0, 2, 1, 3] and S[0][3] > 0
    assert np.argmax(S[1]) == 3 and S[1][:3].tolist() == [0, 0, 0]

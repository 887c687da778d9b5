"""Synthetic behaviour data, to try the product on tables other than Online Retail.

- :func:`generate`: drifting preferences in the Online Retail layout, used
  when the real file is absent (the loader says so). Users belong to taste
  groups; each group's favourite item cluster shifts over the days, so a model
  that is never updated goes stale. A few dirty rows of each kind the
  validator knows are mixed in.
- :func:`generate_trends`: explicit ratings of items whose popularity rises
  and falls within days (releases, as on a film site), with a few evergreens
  and genre tastes: what people rate follows the week's releases, re-rating is
  rare, so the 7-day most popular list is strong and the customer's own
  history weak. ``TREND_COLUMNS`` maps its columns for ``demo.columns``.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa


def generate(n_users: int = 300, n_items: int = 200, n_days: int = 30, seed: int = 7,
             events_per_day: int = 400, start: dt.date = dt.date(2011, 1, 3)) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_groups = 5
    clusters = np.arange(n_items) % n_groups
    group = rng.integers(0, n_groups, n_users)
    popularity = rng.zipf(1.6, n_items).astype(float)
    rows: dict[str, list] = {k: [] for k in
                             ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate",
                              "UnitPrice", "CustomerID", "Country")}
    invoice = 500000
    for d in range(n_days):
        day = dt.datetime.combine(start + dt.timedelta(days=d), dt.time(8, 0))
        users = rng.integers(0, n_users, events_per_day)
        # preferred cluster drifts by one every 7 days
        pref = (group[users] + d // 7) % n_groups
        in_pref = rng.random(events_per_day) < 0.7
        items = np.empty(events_per_day, dtype=np.int64)
        for i, (u_pref, hit) in enumerate(zip(pref, in_pref)):
            pool = np.flatnonzero(clusters == u_pref) if hit else np.arange(n_items)
            p = popularity[pool] / popularity[pool].sum()
            items[i] = rng.choice(pool, p=p)
        minutes = np.sort(rng.integers(0, 600, events_per_day))
        for u, it, mnt in zip(users, items, minutes):
            invoice += 1
            rows["InvoiceNo"].append(str(invoice))
            rows["StockCode"].append(f"S{it:05d}")
            rows["Description"].append(f"ITEM {it} OF CLUSTER {clusters[it]}")
            rows["Quantity"].append(int(rng.integers(1, 6)))
            rows["InvoiceDate"].append(day + dt.timedelta(minutes=int(mnt)))
            rows["UnitPrice"].append(float(np.round(rng.uniform(0.5, 20), 2)))
            rows["CustomerID"].append(int(10000 + u))
            rows["Country"].append("Synthland")
        # dirty rows: unknown customer, a cancellation, a negative adjustment, a duplicate
        base = {k: v[-1] for k, v in rows.items()}
        for change in ({"CustomerID": None}, {"InvoiceNo": "C" + base["InvoiceNo"], "Quantity": -1},
                       {"Quantity": -3, "InvoiceNo": str(invoice + 1)}, {}):
            for k, v in {**base, **change}.items():
                rows[k].append(v)
    return pa.table({
        "InvoiceNo": pa.array(rows["InvoiceNo"], pa.string()),
        "StockCode": pa.array(rows["StockCode"], pa.string()),
        "Description": pa.array(rows["Description"], pa.string()),
        "Quantity": pa.array(rows["Quantity"], pa.int32()),
        "InvoiceDate": pa.array(rows["InvoiceDate"], pa.timestamp("us")),
        "UnitPrice": pa.array(rows["UnitPrice"], pa.float64()),
        "CustomerID": pa.array(rows["CustomerID"], pa.int64()),
        "Country": pa.array(rows["Country"], pa.string()),
    })


# demo.columns for a generate_trends table (rating events; a rating >= features.rating.threshold is positive)
TREND_COLUMNS = {"user_id": "user_id", "item_id": "item_id", "event_time": "event_time", "rating": "rating",
                 "event_type": "event_type", "item_text": "title", "order_id": None, "quantity": None,
                 "price": None, "cancel_prefix": None}


def generate_trends(n_users: int = 2000, n_items: int = 600, n_days: int = 60, seed: int = 11,
                    events_per_day: int = 1500, start: dt.date = dt.date(2012, 3, 5), genres: int = 8,
                    evergreen_share: float = 0.1, rewatch: float = 0.03) -> pa.Table:
    """Ratings (1-5) by day of items with short popularity cycles.

    Item i is released on a day r_i (spread over the whole period, a few
    before it starts) and is watched with intensity ``a_i * d**2 * exp(-d / tau_i)``
    d days after release (d >= 0): it peaks two to four days in and fades
    within about a week; a share ``evergreen_share`` of items is steady
    instead. A user of taste group g picks an item with probability
    proportional to that intensity times 3 for items of its favourite genre;
    with probability ``rewatch`` it re-rates one of its own past items
    instead. The rating is the item's quality plus 0.7 for the favourite genre
    plus noise, rounded into 1..5 (about half are >= 4). Users are active on
    random days. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    genre = rng.integers(0, genres, n_items)
    taste = rng.integers(0, genres, n_users)
    release = rng.integers(-10, n_days, n_items)
    level = rng.lognormal(0.0, 1.0, n_items)
    tau = rng.uniform(1.0, 2.0, n_items)
    evergreen = rng.random(n_items) < evergreen_share
    quality = rng.normal(3.3, 0.6, n_items)
    activity = rng.lognormal(0.0, 1.0, n_users)  # some users rate much more than others
    history: list[list[int]] = [[] for _ in range(n_users)]
    cols: dict[str, list] = {k: [] for k in ("user_id", "item_id", "event_time", "rating")}
    for d in range(n_days):
        age = (d - release).astype(float)
        intensity = np.where(age >= 0, level * age ** 2 * np.exp(-age / tau) + 1e-3, 0.0)
        intensity = np.where(evergreen, level * 0.3, intensity)
        users = rng.choice(n_users, size=events_per_day, p=activity / activity.sum())
        minutes = np.sort(rng.integers(0, 24 * 60, events_per_day))
        # per taste group, the day's choice distribution; one inverse-CDF draw per event
        w = intensity[None, :] * np.where(genre[None, :] == np.arange(genres)[:, None], 3.0, 1.0)
        cdf = np.cumsum(w / w.sum(1, keepdims=True), 1)
        draw = rng.random(events_per_day)
        picks = np.minimum((cdf[taste[users]] < draw[:, None]).sum(1), n_items - 1)
        again = rng.random(events_per_day) < rewatch
        noise = rng.normal(0, 0.8, events_per_day)
        day0 = dt.datetime.combine(start + dt.timedelta(days=d), dt.time(0, 0))
        for u, it, m, a, e in zip(users, picks, minutes, again, noise):
            if a and history[u]:
                it = history[u][int(rng.integers(len(history[u])))]
            history[u].append(int(it))
            r = quality[it] + (0.7 if genre[it] == taste[u] else 0.0) + e
            cols["user_id"].append(f"u{u:05d}")
            cols["item_id"].append(f"m{it:05d}")
            cols["event_time"].append(day0 + dt.timedelta(minutes=int(m)))
            cols["rating"].append(float(np.clip(np.round(r), 1, 5)))
    n = len(cols["user_id"])
    titles = {f"m{i:05d}": f"FILM {i} GENRE {genre[i]}" for i in range(n_items)}
    return pa.table({
        "user_id": pa.array(cols["user_id"], pa.string()),
        "item_id": pa.array(cols["item_id"], pa.string()),
        "event_time": pa.array(cols["event_time"], pa.timestamp("us")),
        "rating": pa.array(cols["rating"], pa.float64()),
        "event_type": pa.array(["rating"] * n, pa.string()),
        "title": pa.array([titles[i] for i in cols["item_id"]], pa.string()),
    })

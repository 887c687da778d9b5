"""Synthetic behaviour data with drifting preferences, in the Online Retail layout.

Used when the real file is absent (the loader says so). Users belong to taste
groups; each group's favourite item cluster shifts over the days, so a model
that is never updated goes stale. A few dirty rows of each kind the validator
knows are mixed in.
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

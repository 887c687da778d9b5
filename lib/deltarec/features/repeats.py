"""Whole-history repeat state: per customer, each distinct item bought, with its
purchase count, its time-decayed count (``count * 0.5 ** (age_days /
features.repeat_half_life_days)`` summed over the purchases, as TIFU-KNN and the
``personal_recency`` baseline weigh them) and its last purchase time, kept to
the top ``features.repeat_items`` items by decayed count.

Why: the history window (``features.history_length`` lines) holds about one
Online Retail invoice, a third of the repeats the whole history holds, so a
repeat term fed only by it cannot reproduce the customer's own most-bought
items (#17). These lists are the whole history, at a cost that follows the
customer's distinct items, not their lines.

The decayed counts are stored as of ``repeat_as_of`` (the customer's newest
folded purchase), which keeps them exact under any order of arrival: a purchase
after it rescales the list and adds 1, an earlier (late) one adds its own
decayed weight, a retraction subtracts it. An item pushed out of the top list
loses its counts (a later purchase starts it again from 1): the price of a
bounded row. Consumers rescale to their reference time (:func:`as_of`).

One fold (:func:`fold`) serves the nightly state update (``state.py``), each
training example's features (``examples.py``) and, through the state, serving
and the benchmark, so all of them see the same numbers.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

US_PER_DAY = 86_400_000_000
# USER_STATE columns of the repeat state, and the per-example columns (TRAINING_EXAMPLES) derived from it
STATE_COLUMNS = ("repeat_ids", "repeat_idx", "repeat_counts", "repeat_decayed", "repeat_last", "repeat_as_of")
EXAMPLE_COLUMNS = ("repeat_ids", "repeat_idx", "repeat_weights", "repeat_counts", "repeat_ages")
FLOAT_COLUMNS = ("repeat_weights", "repeat_counts", "repeat_ages")  # per-item numbers a model reads


@dataclass
class RepeatState:
    """One customer's repeat state: item id → [bucket, count, decayed count as of ``as_of``, last time]."""

    items: dict = field(default_factory=dict)
    as_of: int | None = None  # microseconds since the epoch, UTC

    def _decay(self, us: float, half_life_days: float) -> float:
        return 1.0 if half_life_days <= 0 else 0.5 ** (us / (half_life_days * US_PER_DAY))

    def _advance(self, t: int, half_life_days: float) -> None:
        if self.as_of is None:
            self.as_of = t
        elif t > self.as_of:
            f = self._decay(t - self.as_of, half_life_days)
            for v in self.items.values():
                v[2] *= f
            self.as_of = t

    def add(self, t: int, item_id: str, item_idx: int, half_life_days: float) -> None:
        self._advance(t, half_life_days)
        v = self.items.setdefault(item_id, [int(item_idx), 0.0, 0.0, t])
        v[1] += 1.0
        v[2] += self._decay(self.as_of - t, half_life_days)
        v[3] = max(v[3], t)

    def retract(self, t: int, item_id: str, half_life_days: float) -> None:
        """Undo one purchase of ``item_id`` at ``t`` (nothing when the item is not kept)."""
        v = self.items.get(item_id)
        if v is None:
            return
        self._advance(t, half_life_days)
        v[1] -= 1.0
        v[2] = max(v[2] - self._decay(self.as_of - t, half_life_days), 0.0)
        if v[1] <= 0:
            del self.items[item_id]

    def prune(self, k: int) -> None:
        if len(self.items) > k:
            self.items = dict(self._ranked()[:k])

    def _ranked(self) -> list:
        # decayed count first, then count, then id: a total order, so every engine keeps the same items
        return sorted(self.items.items(), key=lambda kv: (-kv[1][2], -kv[1][1], kv[0]))

    def rows(self) -> dict:
        """The USER_STATE columns (ranked by decayed count)."""
        r = self._ranked()
        return {"repeat_ids": [k for k, _ in r], "repeat_idx": [v[0] for _, v in r],
                "repeat_counts": [v[1] for _, v in r], "repeat_decayed": [v[2] for _, v in r],
                "repeat_last": [v[3] for _, v in r], "repeat_as_of": self.as_of}

    def features(self, ref: int, k: int, half_life_days: float) -> dict:
        """The per-example columns as of ``ref`` (µs): the top ``k`` items' decayed
        counts rescaled to ``ref``, counts and days since the last purchase."""
        r = self._ranked()[:k]
        f = 1.0 if self.as_of is None else self._decay(ref - self.as_of, half_life_days) if ref >= self.as_of \
            else 1.0 / self._decay(self.as_of - ref, half_life_days)
        return {"repeat_ids": [k_ for k_, _ in r], "repeat_idx": [v[0] for _, v in r],
                "repeat_weights": [v[2] * f for _, v in r], "repeat_counts": [v[1] for _, v in r],
                "repeat_ages": [max(ref - v[3], 0) / US_PER_DAY for _, v in r]}


def to_micros(t) -> int | None:
    """µs since the epoch of an int, a numpy/pandas or a Python timestamp (None: null)."""
    if t is None or (isinstance(t, float) and t != t):
        return None
    if isinstance(t, dt.datetime):
        return round((t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp() * 1_000_000)
    return int(t)


def from_row(ids, idx, counts, decayed, last, as_of) -> RepeatState:
    """A RepeatState from USER_STATE's columns (nulls: an empty state, e.g. a lake written before them)."""
    as_of = to_micros(as_of)
    if ids is None or len(ids) == 0 or as_of is None:
        return RepeatState()
    s = RepeatState(as_of=as_of)
    for i, x, n, d, t in zip(ids, idx, counts, decayed, last):
        s.items[str(i)] = [int(x), float(n), float(d), to_micros(t)]
    return s


def fold(state: RepeatState, adds: Iterable[tuple[int, str, int]], retractions: Iterable[tuple[int, str]],
         half_life_days: float, k: int) -> RepeatState:
    """Tonight's purchases (time µs, item id, bucket) then retractions (time µs,
    item id of the retracted purchase) into ``state``, pruned to ``k`` items."""
    for t, i, x in sorted(adds):
        state.add(int(t), i, int(x), half_life_days)
    for t, i in sorted(retractions):
        state.retract(int(t), i, half_life_days)
    state.prune(k)
    return state


def state_arrays(table: "pa.Table", ref_us: np.ndarray, k: int, half_life_days: float) -> dict[str, np.ndarray]:
    """Model inputs from USER_STATE rows ``table`` (the repeat columns), each row
    as of its ``ref_us`` (the day it is scored for): ``repeat_idx`` (U, k) -1
    padded and the float columns (U, k) 0 padded, ranked by decayed count — what
    a training example carries for the same customer and day."""
    U = table.num_rows
    cols = {c: table[c].to_pylist() if c in table.column_names else [None] * U for c in STATE_COLUMNS}
    return feature_arrays([from_row(*(cols[c][u] for c in STATE_COLUMNS)) for u in range(U)], ref_us, k,
                          half_life_days)


def feature_arrays(states: list[RepeatState], ref_us: np.ndarray, k: int,
                   half_life_days: float) -> dict[str, np.ndarray]:
    """:func:`state_arrays` of RepeatStates, each as of its ``ref_us``."""
    U = len(states)
    out = {"repeat_idx": np.full((U, k), -1, np.int64), **{c: np.zeros((U, k), np.float32) for c in FLOAT_COLUMNS}}
    for u, s in enumerate(states):
        f = s.features(int(ref_us[u]), k, half_life_days)
        n = len(f["repeat_idx"])
        out["repeat_idx"][u, :n] = f["repeat_idx"]
        for c in FLOAT_COLUMNS:
            out[c][u, :n] = f[c]
    return out


def user_arrays(state: "pa.Table", users: list[str], ref_us: int, k: int,
                half_life_days: float) -> dict[str, np.ndarray]:
    """:func:`state_arrays` of ``users`` (ids) from USER_STATE rows ``state``,
    all as of ``ref_us``, in the order given; a user ``state`` has no row for
    gets no lists."""
    import pyarrow as pa

    at = {u: j for j, u in enumerate(state["user_id"].to_pylist())}
    rows = state.take(pa.array([at.get(u) for u in users], pa.int64()))  # null rows: no lists
    return state_arrays(rows, np.full(len(users), ref_us, dtype=np.int64), k, half_life_days)


def plain_rows(state: "pa.Table") -> dict[str, tuple]:
    """user id → its repeat columns (``STATE_COLUMNS`` order) as plain values,
    times as µs (``torch.save(weights_only=True)`` takes them), for
    :func:`from_row`; {} when ``state`` has no repeat columns."""
    if "repeat_ids" not in state.column_names:
        return {}
    cols = [state[c].to_pylist() for c in STATE_COLUMNS]
    cols[4] = [None if ts is None else [to_micros(t) for t in ts] for ts in cols[4]]
    cols[5] = [to_micros(t) for t in cols[5]]
    return {u: tuple(row) for u, *row in zip(state["user_id"].to_pylist(), *cols) if u is not None and row[0]}


def live_state(row: tuple | None, bought: list[tuple[str, int]], ref_us: int, half_life_days: float,
               k: int) -> RepeatState:
    """A customer's state from its :func:`plain_rows` row (None: no lists) with
    ``bought`` (item id, bucket: purchases since the state, e.g. a live
    request's basket) folded in as bought at ``ref_us``."""
    s = from_row(*row) if row else RepeatState()
    return fold(s, [(ref_us, i, x) for i, x in bought], [], half_life_days, k) if bought else s


def day_start(us: int) -> int:
    """µs of the start (00:00 UTC) of the day holding ``us``."""
    return us - us % US_PER_DAY


# ------------------------------------------------------------ Spark: one Python fold per customer
_STATE_OUT = ("user_id string, repeat_ids array<string>, repeat_idx array<bigint>, repeat_counts array<double>, "
              "repeat_decayed array<double>, repeat_last array<bigint>, repeat_as_of bigint")
_EXAMPLE_OUT = ("user_id string, _basket_us bigint, repeat_ids array<string>, repeat_idx array<bigint>, "
                "repeat_weights array<float>, repeat_counts array<float>, repeat_ages array<float>")


def micros_columns(base: "DataFrame") -> list:
    """USER_STATE's repeat columns (``STATE_COLUMNS``) as Spark columns with
    times as µs (nulls when the table predates them)."""
    from pyspark.sql import functions as F

    c = F.col
    if "repeat_ids" not in base.columns:
        types = ("array<string>", "array<bigint>", "array<double>", "array<double>", "array<bigint>", "bigint")
        return [F.lit(None).cast(t).alias(n) for n, t in zip(STATE_COLUMNS, types)]
    return [*STATE_COLUMNS[:-2], F.transform(c("repeat_last"), lambda t: F.unix_micros(t)).alias("repeat_last"),
            F.unix_micros(c("repeat_as_of")).alias("repeat_as_of")]


def _base_micros(base: "DataFrame") -> "DataFrame":
    return base.select("user_id", *micros_columns(base))


def _base_state(b) -> RepeatState:
    if b is None or len(b) == 0:
        return RepeatState()
    r = b.iloc[0]
    return from_row(*(r[c] if r[c] is not None else None for c in STATE_COLUMNS))


def state_rows(base: "DataFrame", adds: "DataFrame", retractions: "DataFrame", half_life_days: float,
               k: int) -> "DataFrame":
    """Per customer with a purchase or a retraction tonight: the repeat columns
    after folding them into ``base`` (USER_STATE). ``adds``: user_id,
    event_time, item_id, item_idx of tonight's purchases; ``retractions``:
    user_id, event_time, item_id of the purchases retracted."""
    import pandas as pd
    from pyspark.sql import functions as F

    c = F.col
    ops = adds.select("user_id", F.unix_micros(c("event_time")).alias("_t"), F.lit(None).cast("bigint").alias(
        "_basket_us"), "item_id", c("item_idx").cast("bigint"), F.lit("add").alias("_op")).unionByName(
        retractions.select("user_id", F.unix_micros(c("event_time")).alias("_t"),
                           F.lit(None).cast("bigint").alias("_basket_us"), "item_id",
                           F.lit(None).cast("bigint").alias("item_idx"), F.lit("retract").alias("_op")))

    def one(o: "pd.DataFrame", b: "pd.DataFrame") -> "pd.DataFrame":
        if len(o) == 0:  # a base row of a customer with nothing tonight: unchanged, not emitted
            return pd.DataFrame(columns=[f.split()[0] for f in _STATE_OUT.split(", ")])
        s = _base_state(b)
        a = o[o["_op"] == "add"]
        r = o[o["_op"] == "retract"]
        fold(s, zip(a["_t"], a["item_id"], a["item_idx"]), zip(r["_t"], r["item_id"]), half_life_days, k)
        return pd.DataFrame([{"user_id": o["user_id"].iloc[0], **s.rows()}])

    return ops.groupBy("user_id").cogroup(_base_micros(base).groupBy("user_id")).applyInPandas(one, _STATE_OUT) \
        .select("user_id", *STATE_COLUMNS[:-2],
                F.transform(c("repeat_last"), lambda t: F.timestamp_micros(t)).alias("repeat_last"),
                F.timestamp_micros(c("repeat_as_of")).alias("repeat_as_of"))


def example_rows(base: "DataFrame", lines: "DataFrame", half_life_days: float, k: int) -> "DataFrame":
    """Per (customer, basket) of tonight's example lines (user_id, event_time,
    item_id, item_idx, ``_basket`` timestamp, ``_positive``): the repeat features
    as of the basket's start — ``base`` (USER_STATE before tonight) plus
    tonight's purchases of earlier baskets, pruned only as the night's state is
    (at its end) — keyed by user_id, ``_basket_us``."""
    import pandas as pd
    from pyspark.sql import functions as F

    c = F.col
    ops = lines.select("user_id", F.unix_micros(c("event_time")).alias("_t"),
                       F.unix_micros(c("_basket")).alias("_basket_us"), "item_id", c("item_idx").cast("bigint"),
                       F.when(F.coalesce(c("_positive"), F.lit(False)), F.lit("add")).otherwise(F.lit("see"))
                       .alias("_op"))

    def one(o: "pd.DataFrame", b: "pd.DataFrame") -> "pd.DataFrame":
        if len(o) == 0:
            return pd.DataFrame(columns=[f.split()[0] for f in _EXAMPLE_OUT.split(", ")])
        s, out = _base_state(b), []
        user = o["user_id"].iloc[0]
        for basket, g in o.sort_values(["_basket_us", "_t"]).groupby("_basket_us", sort=True):
            out.append({"user_id": user, "_basket_us": int(basket), **s.features(int(basket), k, half_life_days)})
            a = g[g["_op"] == "add"]
            for t, i, x in zip(a["_t"], a["item_id"], a["item_idx"]):
                s.add(int(t), i, int(x), half_life_days)
        return pd.DataFrame(out)

    return ops.groupBy("user_id").cogroup(_base_micros(base).groupBy("user_id")).applyInPandas(one, _EXAMPLE_OUT)

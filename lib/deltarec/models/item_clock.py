"""Time-aware item inputs: how much each item was bought lately and how long
it has been bought, as of a day.

Per item row the clock keeps when it was first bought and its purchases
decayed by each half-life (``0.5 ** (age_days / half_life)`` per purchase,
retractions counted negative), as of a day (``as_of``: days since 1970-01-01,
the day after the last events folded in). A model scores with these buffers,
so a checkpoint ranks tomorrow with today's trends; no caller passes them.

Training on a night (or a year: the first full run) folds its events in with
:meth:`ItemClock.advance`, which also keeps, for every training day, the
values *as of that day* (purchases strictly before it), so an example is
trained on what was known before its day, and each of its candidate items
gets its own values at that day: :meth:`ItemClock.features` with the rows'
days. The events come from the training files themselves (the examples that
are purchases; the holdout slice is left out, as the trainer leaves it out),
so the clock needs no table of its own: the parent checkpoint carries it from
night to night.

Features per (item, day): ``log1p(decayed purchases)`` per half-life,
``log1p(days since first bought)`` and whether it was bought before the day.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

NEVER = 1 << 40  # first_day of an item never bought
DAY_US = 86_400_000_000


def days_of(event_time_us: np.ndarray) -> np.ndarray:
    """Day numbers (days since 1970-01-01, UTC) of microsecond timestamps."""
    return np.floor_divide(np.asarray(event_time_us, dtype=np.int64), DAY_US)


class ItemClock(nn.Module):
    def __init__(self, rows: int, half_lives: tuple[float, ...] = (3.0, 21.0)):
        super().__init__()
        if not half_lives or min(half_lives) <= 0:
            raise ValueError(f"item clock half_lives={half_lives}: give one or more positive numbers of days")
        self.half_lives = tuple(float(h) for h in half_lives)
        self.register_buffer("first_day", torch.full((rows,), NEVER, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(rows, len(self.half_lives)))
        self.register_buffer("as_of", torch.tensor(-1, dtype=torch.long))  # -1: nothing folded in yet
        self._night: dict[str, torch.Tensor] | None = None  # per training day values (not saved)

    @property
    def n_features(self) -> int:
        return len(self.half_lives) + 2

    def _decay(self, days: torch.Tensor) -> torch.Tensor:
        """(..., K) factors 0.5 ** (days / half_life)."""
        h = torch.tensor(self.half_lives, device=days.device)
        return torch.pow(0.5, days.to(torch.float32).unsqueeze(-1) / h)

    # ------------------------------------------------------------ update
    def reset_rows(self, rows) -> None:
        """Rows given to new ids (a dynamic vocabulary reuses evicted ones): never bought."""
        if len(rows):
            idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.first_day.device)
            self.first_day[idx] = NEVER
            self.recent[idx] = 0.0

    @torch.no_grad()
    def advance(self, rows: np.ndarray, days: np.ndarray, signs: np.ndarray) -> None:
        """Fold in events: item ``rows``, their ``days`` (day numbers) and
        ``signs`` (+1 a purchase, -1 a retraction). Afterwards the buffers hold
        the values as of the day after the last event, and :meth:`features`
        with a day answers as of that day for every day of these events."""
        rows, days, signs = (np.asarray(rows, np.int64), np.asarray(days, np.int64),
                             np.asarray(signs, np.float64))
        prev = int(self.as_of)
        if not len(rows):
            self._night = None
            return
        day0 = int(days.min()) if prev < 0 else min(int(days.min()), prev)
        span = int(days.max()) + 1 - day0 + 1  # days day0 .. last + 1
        present, p = np.unique(rows, return_inverse=True)
        K = len(self.half_lives)
        daily = np.zeros((len(present), span))
        np.add.at(daily, (p, days - day0), signs)
        first = np.full(len(present), NEVER, dtype=np.int64)
        np.minimum.at(first, p, np.where(signs > 0, days, NEVER))
        # table[:, j, k]: this data's purchases strictly before day0 + j, decayed to it
        a = 0.5 ** (1.0 / np.array(self.half_lives))
        table = np.zeros((len(present), span, K))
        for j in range(1, span):
            table[:, j] = table[:, j - 1] * a + daily[:, j - 1, None] * a
        dev = self.recent.device
        self._night = {"rows": torch.from_numpy(present).to(dev), "day0": torch.tensor(day0, device=dev),
                       "table": torch.from_numpy(table).float().to(dev),
                       "first": torch.from_numpy(first).to(dev), "prev": torch.tensor(prev, device=dev),
                       "prev_recent": self.recent.clone(), "prev_first": self.first_day.clone()}
        new_as_of = int(days.max()) + 1
        all_rows = torch.arange(len(self.first_day), device=dev)
        recent, first_day = self._at(all_rows, torch.full_like(all_rows, new_as_of))
        self.recent.copy_(recent)
        self.first_day.copy_(first_day)
        self.as_of.fill_(new_as_of)

    def end_training(self) -> None:
        """Drop the per-day values (scoring uses the buffers only)."""
        self._night = None

    # ------------------------------------------------------------ lookups
    def _at(self, rows: torch.Tensor, day: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decayed purchases (..., K), first day (...)) of item ``rows`` as of
        ``day`` (broadcastable to rows), during training (per-day values).
        Row lookups are done on ``rows``' own shape and broadcast after."""
        n = self._night
        safe = rows.clamp(min=0, max=len(self.first_day) - 1)
        at = torch.searchsorted(n["rows"], rows.contiguous()).clamp(max=len(n["rows"]) - 1)
        hit = n["rows"][at] == rows
        j = (day - n["day0"]).clamp(min=0, max=n["table"].shape[1] - 1)
        from_night = torch.where(hit.unsqueeze(-1), n["table"][at, j], torch.zeros((), device=rows.device))
        if int(n["prev"]) >= 0:
            recent = n["prev_recent"][safe] * self._decay((day - n["prev"]).clamp(min=0)) + from_night
        else:
            recent = from_night
        first = torch.where(hit, torch.minimum(n["prev_first"][safe], n["first"][at]), n["prev_first"][safe])
        return recent, first

    def features(self, rows: torch.Tensor, day: torch.Tensor | None = None) -> torch.Tensor:
        """(..., n_features) of item ``rows`` as of ``day`` (broadcastable to
        ``rows``; None: as of the buffers' day, i.e. for scoring)."""
        if day is None or self._night is None:
            safe = rows.clamp(min=0, max=len(self.first_day) - 1)
            recent, first = self.recent[safe], self.first_day[safe]
            day = self.as_of.expand(rows.shape)
        else:
            recent, first = self._at(rows, day)
            shape = torch.broadcast_shapes(rows.shape, day.shape)
            first, day = first.expand(shape), day.expand(shape)
        seen = first < day
        age = torch.where(seen, (day - first).to(torch.float32), torch.zeros((), device=rows.device))
        return torch.cat([torch.log1p(recent.clamp(min=0)).expand(seen.shape + recent.shape[-1:]),
                          torch.log1p(age).unsqueeze(-1), seen.to(torch.float32).unsqueeze(-1)], -1)


def night_events(files: list[str], vocab=None) -> dict[str, np.ndarray]:
    """The item events a run's training files hold, for :meth:`ItemClock.advance`:
    purchases (label-1 ``event`` rows) count +1, retractions -1, the delta
    job's negatives nothing; holdout rows are left out (they never teach the
    model). ``vocab``: the item vocabulary (dynamic ids), else rows are the
    hashed indices. Files without event times (hand-made ones) give no events."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..data.shards import read_shard

    empty = {"rows": np.zeros(0, np.int64), "days": np.zeros(0, np.int64), "signs": np.zeros(0)}
    if not files:
        return empty
    cols = ["item_idx", "label", "event_time", "kind"] + (["item_id"] if vocab is not None else [])
    try:
        t = read_shard(files, 0, 1, cols)
    except KeyError:  # files without event times or kinds (made by hand): nothing to date
        return empty
    buy = pc.and_(pc.greater(t["label"], 0), pc.equal(t["kind"], "event"))
    back = pc.equal(t["kind"], "retraction")
    keep = pc.or_(buy, back)
    t, buy = t.filter(keep), buy.filter(keep)
    if vocab is not None:
        rows = vocab.rows_for(t["item_id"], t["item_idx"])
    else:
        rows = np.asarray(t["item_idx"].to_numpy(), dtype=np.int64)
    us = pc.cast(pc.cast(t["event_time"], pa.timestamp("us", "UTC")), pa.int64()).to_numpy(zero_copy_only=False)
    return {"rows": rows, "days": days_of(us),
            "signs": np.where(np.asarray(buy.to_numpy(zero_copy_only=False)), 1.0, -1.0)}

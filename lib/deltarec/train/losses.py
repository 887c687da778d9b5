"""Training objectives (``train.loss``): what a step minimises, per example row.

- ``bce``: pointwise log loss of every row against its label (the delta job's
  negatives are rows with label 0).
- ``bpr``: for each positive row, the mean over its candidate negatives j of
  ``softplus(s_j - s_pos)`` (Rendle et al. 2009): the positive must outscore
  each negative; the scale of the scores is free.
- ``sampled_softmax``: for each positive row, the cross-entropy of the
  positive among itself and the candidate negatives, each negative's logit
  corrected by ``-log Q(j)``, Q(j) the expected number of times j is in the
  row's candidates (Bengio & Senécal 2008; Yi et al. 2019 for in-batch
  negatives), so the loss estimates the full softmax over the catalogue.
- ``full_softmax``: the cross-entropy over every row of the item table
  (where it fits: a few thousand items does; refused above ``FULL_SOFTMAX_LIMIT``).

Candidate negatives of a positive row (``bpr`` and ``sampled_softmax``):
``in_batch``: the items of every positive of the step's *global* batch (all
ranks' rows, gathered once per step, so N workers see the same candidates one
worker would), except any that is the row's own item or a positive of the
same user (a basket's other lines are not negatives); ``history``: up to
``history_negatives`` distinct items of the row's own history other than its
item (the comparisons uniform negatives almost never make: which of a
customer's past items come back); ``uniform``: ``uniform_negatives`` items
drawn once per step for the whole batch, from a generator seeded by the step
(the same draw on every rank), uniformly over the items the model knows.

Label-0 rows (the delta job's negatives, retractions) keep a pointwise term
``softplus(s)`` under every loss, so a retraction still lowers its pair's
score. Every loss is a sum of per-row terms, which the training loop weights
and scales by the global example count: averaged gradients stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

LOSSES = ("bce", "bpr", "sampled_softmax", "full_softmax")
FULL_SOFTMAX_LIMIT = 200_000  # item rows scored per positive, beyond which full_softmax is refused
ITEM_KEYS = ("item_idx", "item_row")  # what identifies a candidate item in a batch
NEG_INF = float("-inf")


@dataclass(frozen=True)
class LossSpec:
    """Plain values (picklable, resolved on the driver) of ``train.loss*``."""

    name: str = "bce"
    in_batch: bool = True
    history_negatives: int = 8
    uniform_negatives: int = 64
    logq: bool = True  # sampled_softmax: correct each negative's logit by its sampling probability
    seed: int = 0

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"train.loss={self.name!r}; choose one of {', '.join(LOSSES)}")
        if self.history_negatives < 0 or self.uniform_negatives < 0:
            raise ValueError(f"train.loss negatives must be >= 0, got history_negatives={self.history_negatives}, "
                             f"uniform_negatives={self.uniform_negatives}")
        if self.name in ("bpr", "sampled_softmax") and not (
                self.in_batch or self.history_negatives or self.uniform_negatives):
            raise ValueError(f"train.loss={self.name} needs negatives: set in_batch, history_negatives or "
                             "uniform_negatives")


# ------------------------------------------------------------------ scoring candidates
def candidate_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], items):
    """(N, C) scores of each row's user (and history) with candidate items:
    ``items`` tensors are (C,) (the same candidates for every row) or (N, C);
    a list of such dicts gives a list of score matrices (a model with
    ``score_candidates`` then does the user side once). Any other model scores
    an expanded batch of N × C rows through ``forward``."""
    if hasattr(model, "score_candidates"):
        return model.score_candidates(batch, items)
    if isinstance(items, (list, tuple)):
        return [candidate_scores(model, batch, x) for x in items]
    n = len(batch["item_idx"])
    c = next(iter(items.values())).shape[-1]
    rows = {k: v.repeat_interleave(c, 0) for k, v in batch.items() if k not in ITEM_KEYS and v.dim() >= 1
            and v.shape[0] == n}
    for k, v in items.items():
        rows[k] = v.reshape(-1) if v.dim() == 2 else v.repeat(n)
    return model(rows).view(n, c)


def item_keys(batch: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in ITEM_KEYS if k in batch]


def identity(items: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor that tells candidate items apart: exact rows when the batch
    has them (dynamic vocabulary), else the hashed index."""
    return items["item_row"] if "item_row" in items else items["item_idx"]


# ------------------------------------------------------------------ per-step candidates
class Objective:
    """One training run's loss. Per optimizer step, every rank calls
    :meth:`begin_step` once with its whole local batch (it gathers the global
    batch's positives and draws the step's uniform negatives), then
    :meth:`per_row` for each micro-batch: one loss term per row, which the
    loop weights, sums and scales."""

    def __init__(self, spec: LossSpec, collective=None, device: torch.device | None = None):
        self.spec = spec
        self.collective = collective
        self.device = device or torch.device("cpu")
        self.pool: dict[str, torch.Tensor] | None = None
        self.uniform: dict[str, torch.Tensor] | None = None

    # -------------------------------------------------------------- step
    def begin_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> None:
        s = self.spec
        self.pool = self.uniform = None
        if s.name not in ("bpr", "sampled_softmax"):
            return
        if s.in_batch:
            pos = batch["label"] > 0
            mine = {k: batch[k][pos] for k in ("user_idx", *item_keys(batch)) if k in batch}
            self.pool = self._gather(mine)
        if s.uniform_negatives:
            space = model.item_space() if hasattr(model, "item_space") else _table_rows(model)
            g = torch.Generator().manual_seed((s.seed * 1_000_003 + step) % 2**63)
            pick = torch.randint(0, len(space["item_idx"]), (s.uniform_negatives,), generator=g)
            self.uniform = {k: v[pick].to(self.device) for k, v in space.items()}
            self.uniform["_count"] = torch.tensor(float(len(space["item_idx"])))

    def _gather(self, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's tensors, concatenated in rank order (identical on every rank)."""
        c = self.collective
        if c is None or getattr(c, "size", 1) == 1:
            return mine
        parts = c.allgather_object({k: v.cpu() for k, v in mine.items()})
        return {k: torch.cat([p[k] for p in parts]).to(self.device) for k in mine}

    # -------------------------------------------------------------- loss
    def per_row(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) loss terms of the rows of ``batch`` (float32)."""
        label = batch["label"]
        if self.spec.name == "bce":
            return F.binary_cross_entropy_with_logits(model(batch).float(), label, reduction="none")
        pos = label > 0
        out = torch.zeros(len(label), device=label.device)
        if (~pos).any():  # label-0 rows: pointwise, so retractions still count
            neg_rows = _rows(batch, ~pos)
            out[~pos] = F.softplus(model(neg_rows).float())
        if pos.any():
            out[pos] = self._ranking(model, _rows(batch, pos))
        return out

    def _ranking(self, model, b: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.spec
        own = {k: b[k].unsqueeze(1) for k in item_keys(b)}
        if s.name == "full_softmax":
            space = _table_rows(model)
            if len(space["item_idx"]) > FULL_SOFTMAX_LIMIT:
                raise ValueError(f"train.loss=full_softmax scores all {len(space['item_idx'])} item rows per "
                                 f"positive (limit {FULL_SOFTMAX_LIMIT}): use train.loss=sampled_softmax, or "
                                 "model.embedding=dynamic (a row per item, not per hash bucket)")
            s_pos, scores = (x.float() for x in candidate_scores(model, b, [own, space]))
            s_pos = s_pos.squeeze(1)
            scores = scores.masked_fill(identity(space)[None, :] == identity(b)[:, None], NEG_INF)
            return torch.logsumexp(torch.cat([s_pos[:, None], scores], 1), 1) - s_pos
        s_pos, logits, logq = self._negatives(model, b, own)
        if s.name == "bpr":
            valid = torch.isfinite(logits)
            terms = F.softplus(logits.masked_fill(~valid, 0.0) - s_pos[:, None]) * valid
            return terms.sum(1) / valid.sum(1).clamp(min=1)
        if s.logq:
            logits = logits - logq
        return torch.logsumexp(torch.cat([s_pos[:, None], logits], 1), 1) - s_pos

    def _negatives(self, model, b: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positives' logits (N,), each positive row's candidate negatives'
        logits (N, C) (-inf where masked) and their log Q (expected occurrences
        in the row's candidates, summed over the sources that can draw them).
        One model call scores the positives and every candidate set."""
        s = self.spec
        n = len(b["label"])
        me = identity(b)
        hist = _history_candidates(b, s.history_negatives, s.seed) if s.history_negatives else None
        has_pool = self.pool is not None and len(self.pool["item_idx"]) > 0
        shared = [x for x in (self.pool if has_pool else None, self.uniform) if x is not None]
        keys = [k for k in ITEM_KEYS if shared and all(k in x for x in shared)]
        sets = [own]
        if shared:
            sets.append({k: torch.cat([x[k] for x in shared]) for k in keys})
        if hist is not None and hist["_take"].shape[1]:
            sets.append({k: v for k, v in hist.items() if not k.startswith("_")})
        scores = [x.float() for x in candidate_scores(model, b, sets)]
        s_pos = scores[0].squeeze(1)

        pool_counts = torch.unique(identity(self.pool), return_counts=True) if has_pool else None
        share = None
        if hist is not None:  # each distinct history item's chance to be one of the row's history draws
            share = torch.clamp(hist["_distinct"], max=float(s.history_negatives)) / hist["_distinct"].clamp(min=1)

        def log_expected(ids: torch.Tensor, shared_ids: torch.Tensor | None = None) -> torch.Tensor:
            """ids (N, C); ``shared_ids`` (C,) when every row has the same candidates."""
            per_item = shared_ids if shared_ids is not None else ids
            e = torch.zeros(per_item.shape, device=ids.device)
            if pool_counts is not None:
                uniq, counts = pool_counts
                at = torch.searchsorted(uniq, per_item.contiguous()).clamp(max=len(uniq) - 1)
                e = e + torch.where(uniq[at] == per_item, counts[at].float(), torch.zeros((), device=ids.device))
            if self.uniform is not None:
                e = e + s.uniform_negatives / float(self.uniform["_count"])
            e = e.expand(ids.shape)
            if share is not None:
                inside = membership(hist["_id"], hist["_valid"], shared_ids) if shared_ids is not None else \
                    in_history(hist["_id"], hist["_valid"], ids)
                e = e + inside * share[:, None]
            return e.clamp(min=1e-12).log()

        parts, logqs = [], []
        if shared:
            ids = identity(sets[1])[None, :].expand(n, -1)
            mask = ids == me[:, None]
            if has_pool:  # a basket's other lines (the same customer's positives) are not negatives
                n_pool = len(self.pool["item_idx"])
                same_user = torch.zeros_like(mask)
                same_user[:, :n_pool] = self.pool["user_idx"][None, :] == b["user_idx"][:, None]
                mask = mask | same_user
            parts.append(scores[1].masked_fill(mask, NEG_INF))
            logqs.append(log_expected(ids, identity(sets[1])))
        if len(sets) > 1 + bool(shared):
            parts.append(scores[-1].masked_fill(~hist["_take_valid"], NEG_INF))
            logqs.append(log_expected(hist["_take"]))
        if not parts:
            return s_pos, torch.full((n, 1), NEG_INF, device=me.device), torch.zeros((n, 1), device=me.device)
        return s_pos, torch.cat(parts, 1), torch.cat(logqs, 1)


def membership(hist: torch.Tensor, valid: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(N, C) float: whether each shared candidate ``cand`` (C,) is among the
    valid items of each row's history ``hist`` (N, L): the history is mapped
    onto the distinct candidates (N × L searches), not the other way round."""
    uniq, inv = torch.unique(cand, return_inverse=True)
    at = torch.searchsorted(uniq, hist.contiguous()).clamp(max=len(uniq) - 1)
    hit = valid & (uniq[at] == hist)
    out = torch.zeros(hist.shape[0], len(uniq) + 1, device=hist.device)
    out.scatter_(1, torch.where(hit, at, torch.full_like(at, len(uniq))), 1.0)
    return out[:, :-1][:, inv]


def in_history(hist: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, C) float: whether each candidate ``ids`` (N, C) is among the valid
    items of its row's history ``hist`` (N, L); sorted search, not N × C × L."""
    sorted_h = torch.where(valid, hist, torch.full_like(hist, -2)).sort(1).values
    at = torch.searchsorted(sorted_h, ids.contiguous()).clamp(max=hist.shape[1] - 1)
    return (torch.gather(sorted_h, 1, at) == ids).to(torch.float32)


def _rows(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    n = len(mask)
    return {k: (v[mask] if v.dim() >= 1 and v.shape[0] == n else v) for k, v in batch.items()}


def _table_rows(model) -> dict[str, torch.Tensor]:
    """Every row of the model's item table, as candidates (hashed: every bucket)."""
    if hasattr(model, "item_space"):
        return model.item_space()
    rows = model.rows_of["item"]
    r = torch.arange(rows)
    return {"item_idx": r, "item_row": r} if getattr(model, "embedding", "hashed") == "dynamic" else {"item_idx": r}


def _history_candidates(b: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, torch.Tensor] | None:
    """Up to ``k`` distinct items of each row's history other than its own item,
    the first occurrence of each picked by a seeded hash of (row item, position),
    as per-row candidates (N, k) with a validity mask; ``_id`` / ``_valid`` /
    ``_distinct``: every distinct history item, for log Q."""
    if "history_idx" not in b:
        return None
    hidx = b["history_idx"]
    hid = b["history_row"] if "history_row" in b else hidx
    me = identity(b)
    n, L = hid.shape
    valid = (hidx >= 0) & (hid != me[:, None])
    # first occurrence of each item in the row (duplicates are one candidate)
    earlier = (hid[:, :, None] == hid[:, None, :]) & torch.ones(L, L, dtype=torch.bool, device=hid.device).tril(-1)
    distinct = valid & ~(earlier & valid[:, None, :]).any(-1)
    n_distinct = distinct.sum(1).float()
    # seeded, per-row order of the distinct positions; keep the first k
    key = (hid * 1_000_003 + torch.arange(L, device=hid.device) * 7919 + seed) % 2_147_483_647
    key = torch.where(distinct, key, torch.full_like(key, 2**62))
    order = key.argsort(1)[:, :min(k, L)]
    take_valid = torch.gather(distinct, 1, order)
    cand = {"item_idx": torch.gather(hidx, 1, order).clamp(min=0)}
    if "history_row" in b:
        cand["item_row"] = torch.gather(b["history_row"], 1, order).clamp(min=0)
    cand.update({"_id": hid, "_valid": distinct, "_distinct": n_distinct,
                 "_take": torch.gather(hid, 1, order), "_take_valid": take_valid})
    return cand


def per_row_loss(name: str, model, batch, **kw) -> torch.Tensor:
    """One-call form for a single process (tests, tools): :class:`Objective`
    with ``train.loss=name`` on ``batch`` as the whole step."""
    obj = Objective(LossSpec(name=name, **kw))
    obj.begin_step(model, batch, kw.get("seed", 0))
    return obj.per_row(model, batch)


__all__ = ["LOSSES", "LossSpec", "Objective", "candidate_scores", "per_row_loss", "FULL_SOFTMAX_LIMIT"]

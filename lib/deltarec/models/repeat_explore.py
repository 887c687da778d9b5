"""Repeat-explore model: a learned per-customer mix of "buy again from my own
history" and "something new", over exact or hashed ids.

    s(u, i) = log( g_u · π_u(i) + (1 - g_u) · exp(e(u, i)) )

- **Repeat distribution** π_u over the distinct items of the customer's history
  h (``history_idx``: the last L items before the event's day, newest last):
  ``softmax_j(w · f(u, j) + w' · t(j, day) + r_j)`` where f are the item's
  count, share of the history, its shares decayed by position (``DECAYS``: a
  purchase k lines back counts ``decay ** k``, the newest 1; as TIFU-KNN
  decays a customer's item frequencies) and the recency of its last
  occurrence; t its recent popularity and age (below: among a customer's past
  items, the ones in fashion now come back first); r_j a learned repeat
  propensity per item (a consumable is re-bought, a one-off is not).
  Zero outside the history.
- **Gate** g_u = σ(a + v · [log1p |h|, log1p distinct(h)] + c_u), c_u learned per
  customer: how much of the customer's next purchase is a repeat. A customer
  without history has g_u = 0.
- **Explore score** e(u, i) = b + b_i + <φ_u, ψ_i> + w_t · t(i, day): φ_u the
  customer's embedding plus a tower over it and the mean embedding of the
  history (what co-purchases teach), ψ_i the item's embedding (plus the text
  tower's), t the item's recent popularity and age as of the day
  (``item_clock.py``; as of the checkpoint's day when scoring).

With ``features.repeat_items`` > 0 (``repeat_items`` here) π_u ranges over
the customer's whole-history repeat lists instead (``repeat_idx`` with decayed
counts, counts and days since the last purchase: ``features/repeats.py``),
``softmax_j(w · (log decayed, log1p count, share, 0.5 ** (days / 7)) + w' · t
+ r_j)``, starting at w = (1, 0, 0, 0), w' = 0: π_u is then the decayed-count
share, the personal_recency baseline. A caller without the lists gets the
window's π. (Over 300 lines: the two repeat sources share every other part.)

The repeat term otherwise sees only the history the examples carry
(``features.history_length`` lines): 20 lines hold about one Online Retail
invoice, about 40 % of the repeats the whole history holds; 50 hold most of the
signal (benchmarks/README.md, #17 session 3).

With g → 1 and w on the count the model ranks like the customer's own most
bought items, and the explore score orders the rest (by popularity, through t,
at least), so it can reproduce the frequency baseline and add to it. Every
candidate costs a dot product (no per-pair network), so ranking losses that
score many candidates per row (``train/losses.py``) and a full catalogue stay cheap.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .common import INIT_STD, IdModel
from .item_clock import ItemClock

DECAYS = (0.97, 0.9, 0.7)  # per line back in the history
RECENCY_DECAY = 0.9
REPEAT_FEATURES = 3 + len(DECAYS)  # log1p(count), share, decayed shares, recency
GATE_FEATURES = 2
WHOLE_FEATURES = 4  # log decayed count, log1p(count), decayed share, 0.5 ** (days since last / 7)
WHOLE_INPUTS = ("repeat_idx", "repeat_weights", "repeat_counts", "repeat_ages")
NEG_INF = float("-inf")


def history_features(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each position of ``hist`` (N, L) (ids, -1 padding, newest last):
    the repeat features of the item there (N, L, REPEAT_FEATURES), whether the
    position is that item's newest occurrence (N, L: one position per distinct
    item) and the history's valid mask (N, L)."""
    N, L = hist.shape
    valid = hist >= 0
    same = (hist[:, :, None] == hist[:, None, :]) & valid[:, None, :] & valid[:, :, None]  # (N, p, q)
    back = torch.arange(L - 1, -1, -1, device=hist.device, dtype=torch.float32)  # lines back from the newest
    n = same.sum(2).to(torch.float32)
    size = valid.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    feats = [torch.log1p(n), n / size]
    s = same.to(torch.float32)
    for d in DECAYS:
        w = (d ** back) * valid
        feats.append((s @ w.unsqueeze(-1)).squeeze(-1) / w.sum(1, keepdim=True).clamp(min=1e-12))
    rec = torch.where(same, (RECENCY_DECAY ** back).expand(N, L)[:, None, :], torch.zeros((), device=hist.device))
    feats.append(rec.amax(2))
    later = same & torch.ones(L, L, dtype=torch.bool, device=hist.device).triu(1)  # q after p, same item
    newest = valid & ~later.any(2)
    return torch.stack(feats, -1) * valid.unsqueeze(-1), newest, valid


class RepeatExploreModel(IdModel):
    id_tables = {"user": ["user_emb.weight", "user_gate.weight"],
                 "item": ["item_emb.weight", "item_bias.weight", "item_repeat.weight"]}
    clock_tables = {"item": ["clock"]}  # per-row buffers a new id's row resets

    def __init__(self, user_buckets: int, item_buckets: int, embedding_dim: int = 32,
                 hidden: list[int] | tuple[int, ...] = (64,), dropout: float = 0.0, embedding: str = "hashed",
                 user_rows: int = 0, item_rows: int = 0, text: dict[str, Any] | None = None,
                 history_length: int = 50, item_half_lives: list[float] | tuple[float, ...] = (3.0, 21.0),
                 repeat_gate: bool = True, oov_buckets: int = 16, repeat_items: int = 0):
        super().__init__()
        if history_length < 1:
            raise ValueError(f"history_length={history_length}: the repeat-explore model reads at least 1 item")
        self._init_ids(embedding, user_buckets, item_buckets, user_rows, item_rows, oov_buckets)
        self.history_length = history_length
        self.repeat_gate = bool(repeat_gate)
        self.repeat_items = int(repeat_items)
        self.inputs = ("history_idx", "event_day") + (WHOLE_INPUTS if self.repeat_items else ())
        D = embedding_dim
        self.user_emb = nn.Embedding(self.rows_of["user"], D)
        self.item_emb = nn.Embedding(self.rows_of["item"], D)
        self.item_bias = nn.Embedding(self.rows_of["item"], 1)
        # the explore part starts as a uniform distribution over the item rows, so the gate's repeat share
        # is a probability from the first step (an offset of 0 would give it ~rows times the repeat mass)
        self.bias = nn.Parameter(torch.full((1,), -math.log(self.rows_of["item"])))
        layers: list[nn.Module] = []
        width = 2 * D
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, D))
        self.user_tower = nn.Sequential(*layers)
        nn.init.zeros_(self.user_tower[-1].weight)  # φ_u starts as the customer's embedding
        nn.init.zeros_(self.user_tower[-1].bias)
        self.clock = ItemClock(self.rows_of["item"], tuple(item_half_lives))
        self.item_time = nn.Linear(self.clock.n_features, 1, bias=False)
        self.repeat = nn.Linear(REPEAT_FEATURES, 1, bias=False)
        self.repeat_time = nn.Linear(self.clock.n_features, 1, bias=False)  # recent popularity of a past item
        self.item_repeat = nn.Embedding(self.rows_of["item"], 1)
        # the whole-history lists' features (features.repeat_items > 0); starts as log of the decayed count:
        # with the gate at "repeat" the model ranks past items exactly as the personal_recency baseline
        self.repeat_whole = nn.Linear(WHOLE_FEATURES, 1, bias=False)
        self.gate = nn.Linear(GATE_FEATURES, 1)
        self.user_gate = nn.Embedding(self.rows_of["user"], 1)
        nn.init.normal_(self.user_emb.weight, std=INIT_STD)
        nn.init.normal_(self.item_emb.weight, std=INIT_STD)
        for p in (self.item_bias.weight, self.item_time.weight, self.item_repeat.weight, self.user_gate.weight,
                  self.gate.weight, self.gate.bias, self.repeat_time.weight):
            nn.init.zeros_(p)
        with torch.no_grad():
            # Start where the simple rules are: past items by count, the rest by recent popularity (the
            # explore score ~ log of the decayed purchases, spread over the half-lives), both nudged by
            # it among past items. A small night has few steps to learn these from zero.
            self.repeat.weight.copy_(torch.tensor([[1.0] + [0.0] * (REPEAT_FEATURES - 1)]))
            K = len(self.clock.half_lives)
            self.item_time.weight[0, :K] = 1.0 / K
            self.repeat_time.weight[0, :K] = 0.5 / K if not self.repeat_items else 0.0
            self.repeat_whole.weight.copy_(torch.tensor([[1.0] + [0.0] * (WHOLE_FEATURES - 1)]))
        if text:
            from .text import TextTower

            self.text = TextTower(item_buckets=item_buckets, out_dim=D, **text)

    # ------------------------------------------------------------ parts
    def _hist(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids used to compare items: rows or hashed indices, rows for embeddings), (N, L)."""
        h = batch.get("history_idx")
        if h is None:
            h = torch.full((len(batch["user_idx"]), 1), -1, dtype=torch.long, device=batch["user_idx"].device)
        h = h[:, -self.history_length:]
        if self.embedding == "dynamic":
            rows = batch["history_row"][:, -self.history_length:] if "history_row" in batch else \
                self.lookup("item", h)
            return rows, rows
        return h, h

    def _repeat_source(self, batch: dict[str, torch.Tensor]):
        """(ids, rows, features (N, K, WHOLE_FEATURES), valid (N, K)) of the
        whole-history repeat lists, or None (off, or a caller without them: the
        history window stands in)."""
        if not self.repeat_items or "repeat_idx" not in batch:
            return None
        idx = batch["repeat_idx"][:, :self.repeat_items].long()
        if self.embedding == "dynamic":
            rows = batch["repeat_row"][:, :self.repeat_items] if "repeat_row" in batch else self.lookup("item", idx)
            rows = torch.where(idx >= 0, rows, torch.full_like(rows, -1))
        else:
            rows = idx
        valid = idx >= 0
        w = batch["repeat_weights"][:, :self.repeat_items].float().clamp(min=1e-6)
        n = batch["repeat_counts"][:, :self.repeat_items].float().clamp(min=0)
        age = batch["repeat_ages"][:, :self.repeat_items].float().clamp(min=0)
        share = (w * valid) / (w * valid).sum(1, keepdim=True).clamp(min=1e-12)
        f = torch.stack([torch.log(w), torch.log1p(n), share, 0.5 ** (age / 7.0)], -1) * valid.unsqueeze(-1)
        return rows, rows, f, valid

    def _items(self, items: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids to compare with the history, table rows) of candidate items."""
        rows = self.rows(items, "item")
        return rows, rows

    def _user(self, batch: dict[str, torch.Tensor], hist_rows: torch.Tensor, day: torch.Tensor | None,
              whole=None):
        """φ_u (N, D), gate log-probabilities (log g, log(1 - g)) (N,), and the
        repeat logits log π (N, L) over the history window's positions, or
        (N, K) over ``whole``'s lists (-inf off the distinct valid positions)."""
        ur = self.rows(batch, "user")
        u = self.user_emb(ur)
        valid = hist_rows >= 0
        h_emb = self.item_emb(hist_rows.clamp(min=0)) * valid.unsqueeze(-1)
        pooled = h_emb.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        phi = u + self.user_tower(torch.cat([u, pooled], -1))
        if whole is None:
            f, newest, _ = history_features(hist_rows)
            size = valid.sum(1).to(torch.float32)
            rep_rows, r = hist_rows, self.repeat(f)
        else:
            rep_rows, f, newest = whole[1], whole[2], whole[3]
            size = (batch["repeat_counts"][:, :self.repeat_items].float().clamp(min=0) * newest).sum(1)
            r = self.repeat_whole(f)
        t = self.clock.features(rep_rows, None if day is None else day[:, None])
        r = (r + self.repeat_time(t)).squeeze(-1) + self.item_repeat(rep_rows.clamp(min=0)).squeeze(-1)
        r = r.masked_fill(~newest, NEG_INF)
        has = newest.any(1)
        log_pi = r - torch.logsumexp(r.masked_fill(~has.unsqueeze(1), 0.0), 1, keepdim=True)
        z = self.gate(torch.stack([torch.log1p(size), torch.log1p(newest.sum(1).to(torch.float32))], -1)).squeeze(-1)
        z = z + self.user_gate(ur).squeeze(-1)
        if not self.repeat_gate:  # ablation: a fixed, even mix
            z = torch.zeros_like(z)
        log_g = torch.where(has, F.logsigmoid(z), torch.full_like(z, NEG_INF))
        log_1mg = torch.where(has, F.logsigmoid(-z), torch.zeros_like(z))
        return phi, log_g, log_1mg, log_pi

    def _explore(self, phi: torch.Tensor, item_rows: torch.Tensor, item_idx: torch.Tensor,
                 day: torch.Tensor | None) -> torch.Tensor:
        """e(u, i) for candidate rows (C,) shared by all N users, or (N, C) per user."""
        v = self.item_emb(item_rows.clamp(min=0))
        if hasattr(self, "text"):
            v = v + self.text(item_idx.clamp(min=0))
        dot = phi @ v.T if item_rows.dim() == 1 else (phi.unsqueeze(1) * v).sum(-1)
        if day is None:
            timed = self.item_time(self.clock.features(item_rows)).squeeze(-1)
        elif item_rows.dim() == 1:  # shared candidates: once per distinct day of the rows
            days, at = torch.unique(day, return_inverse=True)
            timed = self.item_time(self.clock.features(item_rows, days[:, None])).squeeze(-1)[at]
        else:
            timed = self.item_time(self.clock.features(item_rows, day[:, None])).squeeze(-1)
        return self.bias + dot + self.item_bias(item_rows.clamp(min=0)).squeeze(-1) + timed

    @staticmethod
    def _repeat_at(hist_ids: torch.Tensor, log_pi: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """log π of each candidate (-inf when not in the history): (N, C) for
        candidates (C,) shared or (N, C) per row."""
        N = hist_ids.shape[0]
        if cand.dim() == 2:
            match = (cand[:, :, None] == hist_ids[:, None, :]) & (hist_ids[:, None, :] >= 0)
            vals = log_pi[:, None, :].expand(-1, cand.shape[1], -1)
            return torch.where(match, vals, torch.full_like(vals, NEG_INF)).amax(2)
        uniq, inv = torch.unique(cand, return_inverse=True)
        at = torch.searchsorted(uniq, hist_ids.contiguous()).clamp(max=len(uniq) - 1)
        hit = (uniq[at] == hist_ids) & (hist_ids >= 0) & torch.isfinite(log_pi)
        out = torch.full((N, len(uniq) + 1), NEG_INF, device=cand.device, dtype=log_pi.dtype)
        col = torch.where(hit, at, torch.full_like(at, len(uniq)))  # misses go to a spare column
        out = out.scatter_reduce(1, col, torch.where(hit, log_pi, torch.full_like(log_pi, NEG_INF)), "amax")
        return out[:, :-1][:, inv]

    # ------------------------------------------------------------ scoring
    def score_candidates(self, batch: dict[str, torch.Tensor], items):
        """(N, C) scores of each row's customer with candidate items ``items``
        (``item_idx`` and, with a dynamic vocabulary, ``item_row``: (C,) shared
        or (N, C) per row); a list of such dicts gives a list of score
        matrices, the customer side computed once. The rows' ``event_day``
        (when present) dates the items' popularity and age."""
        hist_ids, hist_rows = self._hist(batch)
        day = batch.get("event_day")
        whole = self._repeat_source(batch)
        phi, log_g, log_1mg, log_pi = self._user(batch, hist_rows, day, whole)
        rep_ids = hist_ids if whole is None else whole[0]
        out = []
        for it in (items if isinstance(items, (list, tuple)) else [items]):
            ids, rows = self._items(it)
            explore = log_1mg.unsqueeze(1) + self._explore(phi, rows, it["item_idx"], day)
            out.append(torch.logaddexp(explore, log_g.unsqueeze(1) + self._repeat_at(rep_ids, log_pi, ids)))
        return out if isinstance(items, (list, tuple)) else out[0]

    @torch.no_grad()
    def parts(self, batch: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The score's terms for candidates ``items`` (C,) shared by the rows
        (diagnosis: ``benchmarks/repeat_diagnosis.py``): the gate g (N,), the
        repeat log-probability log π (N, C; -inf outside the history) and the
        explore score e (N, C)."""
        hist_ids, hist_rows = self._hist(batch)
        day = batch.get("event_day")
        whole = self._repeat_source(batch)
        phi, log_g, _, log_pi = self._user(batch, hist_rows, day, whole)
        ids, rows = self._items(items)
        return {"gate": log_g.exp(), "repeat": self._repeat_at(hist_ids if whole is None else whole[0], log_pi, ids),
                "explore": self._explore(phi, rows, items["item_idx"], day)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        items = {k: batch[k].unsqueeze(1) for k in ("item_idx", "item_row") if k in batch}
        return self.score_candidates(batch, items).squeeze(1)

    @torch.no_grad()
    def score_all(self, user_idx: torch.Tensor, item_idx: torch.Tensor,
                  history_idx: torch.Tensor | None = None,
                  repeat: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(U, I) scores of users ``user_idx`` for items ``item_idx`` (hashed
        indices), ``history_idx`` (U, L) each user's items before the scored
        day (-1 padded, newest last; None: no history), as of the model's day;
        ``repeat``: the users' whole-history lists (``WHOLE_INPUTS``, (U, K) each,
        ``features.repeats.state_arrays``) as of the scored day."""
        if history_idx is not None and history_idx.shape[0] != len(user_idx):
            raise ValueError(f"history_idx has {history_idx.shape[0]} rows for {len(user_idx)} users: one row per user")
        batch = {"user_idx": user_idx}
        if history_idx is not None:
            batch["history_idx"] = history_idx.long()
        if repeat is not None:
            for k in WHOLE_INPUTS:
                if repeat[k].shape[0] != len(user_idx):
                    raise ValueError(f"repeat[{k!r}] has {repeat[k].shape[0]} rows for {len(user_idx)} users")
                batch[k] = torch.as_tensor(repeat[k])
        return self.score_candidates(batch, {"item_idx": item_idx.long()})

    def item_space(self) -> dict[str, torch.Tensor]:
        """Items the model knows (bought at least once as of its day): the
        uniform negatives' space. Hashed: their buckets; dynamic: their rows."""
        rows = torch.nonzero(self.clock.first_day < (1 << 40)).squeeze(1)
        if not len(rows):  # nothing folded in yet: every row
            rows = torch.arange(self.rows_of["item"], device=self.bias.device)
        if self.embedding == "dynamic":
            return {"item_idx": torch.full_like(rows, -1), "item_row": rows}
        return {"item_idx": rows}


@register("repeat_explore")
def _repeat_explore(user_buckets: int, item_buckets: int, embedding_dim: int = 32, hidden: list[int] = (64,),
                    dropout: float = 0.0, embedding: str = "hashed", user_rows: int = 0, item_rows: int = 0,
                    text: dict[str, Any] | None = None, history_length: int = 50,
                    item_half_lives: list[float] = (3.0, 21.0), repeat_gate: bool = True,
                    oov_buckets: int = 16, repeat_items: int = 0) -> RepeatExploreModel:
    return RepeatExploreModel(user_buckets, item_buckets, embedding_dim, list(hidden), dropout, embedding,
                              user_rows, item_rows, text, history_length, tuple(item_half_lives), repeat_gate,
                              oov_buckets, repeat_items)

"""SASRec-style sequential recommender: a causal transformer over the user's
last N items (``history_idx``, oldest first, left-padded with -1) followed by a
learned "next" token; the next token's output h scores a candidate item:

    score(history, i) = <h, e_i> + b_i

Trained on the examples' rows like the ranking model (the positive next item
and its sampled negatives, binary cross-entropy), so it shares the training
loop, averaged gradients and incremental updates.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register
from .common import INIT_STD, IdModel


class SequentialModel(IdModel):
    id_tables = {"item": ["item_emb.weight", "item_bias.weight"]}
    inputs = ("history_idx",)

    def __init__(self, user_buckets: int, item_buckets: int, embedding_dim: int = 32,
                 hidden: list[int] | tuple[int, ...] = (64,), dropout: float = 0.0,
                 embedding: str = "hashed", user_rows: int = 0, item_rows: int = 0,
                 history_length: int = 20, heads: int = 2, layers: int = 1,
                 text: dict[str, Any] | None = None):
        super().__init__()
        if embedding_dim % heads:
            raise ValueError(f"model.embedding_dim={embedding_dim} must divide by model.heads={heads}")
        if history_length < 1:
            raise ValueError(f"history_length={history_length}: the sequential model needs at least 1")
        self._init_ids(embedding, user_buckets, item_buckets, user_rows or 1, item_rows)
        self.history_length = history_length
        self.item_emb = nn.Embedding(self.rows_of["item"], embedding_dim)
        self.item_bias = nn.Embedding(self.rows_of["item"], 1)
        self.pos_emb = nn.Embedding(history_length + 1, embedding_dim)
        self.next_token = nn.Parameter(torch.zeros(embedding_dim))
        layer = nn.TransformerEncoderLayer(embedding_dim, heads, dim_feedforward=(list(hidden) or [2 * embedding_dim])[0],
                                           dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embedding_dim)
        nn.init.normal_(self.item_emb.weight, std=INIT_STD)
        nn.init.normal_(self.pos_emb.weight, std=INIT_STD)
        nn.init.normal_(self.next_token, std=INIT_STD)
        nn.init.zeros_(self.item_bias.weight)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(history_length + 1),
                             persistent=False)
        if text:
            from .text import TextTower

            self.text = TextTower(item_buckets=item_buckets, out_dim=embedding_dim, **text)

    def _items(self, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        v = self.item_emb(rows.clamp(min=0))
        if hasattr(self, "text"):
            v = v + self.text(idx.clamp(min=0))
        return v

    def user_state(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D): the transformer's output at the "next" position."""
        hist = batch["history_idx"][:, -self.history_length:]
        if hist.shape[1] < self.history_length:  # shorter input: left-pad
            pad = hist.new_full((hist.shape[0], self.history_length - hist.shape[1]), -1)
            hist = torch.cat([pad, hist], 1)
        rows = self.rows({"history_idx": hist, **({"history_row": batch["history_row"][:, -self.history_length:]}
                                                   if "history_row" in batch else {})}, "item", "history_idx")
        mask = (hist >= 0).unsqueeze(-1)
        x = self._items(hist, rows) * mask  # padding contributes nothing but its position
        x = torch.cat([x, self.next_token.expand(x.shape[0], 1, -1)], 1) + self.pos_emb.weight
        # no key-padding mask: an empty history would leave rows with nothing to attend to (NaN)
        h = self.encoder(x, mask=self.causal, is_causal=True)
        return self.norm(h[:, -1])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "history_idx" not in batch:  # a caller without histories scores as for a new user
            batch = {**batch, "history_idx": torch.full((len(batch["item_idx"]), self.history_length), -1,
                                                        dtype=torch.long, device=batch["item_idx"].device)}
        h = self.user_state(batch)
        ir = self.rows(batch, "item")
        return (h * self._items(batch["item_idx"], ir)).sum(-1) + self.item_bias(ir).squeeze(-1)

    @torch.no_grad()
    def score_all(self, user_idx: torch.Tensor, item_idx: torch.Tensor,
                  history_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(U, I) scores. ``history_idx`` (U, L): each user's items before the
        scored period (hashed indices, -1 padded); without it every user has an
        empty history (popularity through the item biases and the next token)."""
        U = len(user_idx)
        if history_idx is None:
            history_idx = torch.full((U, self.history_length), -1, dtype=torch.long)
        h = self.user_state({"history_idx": history_idx})
        ir = self.rows({"item_idx": item_idx}, "item")
        items = self._items(item_idx, ir)
        return h @ items.T + self.item_bias(ir).squeeze(-1)


@register("sequential")
def _sequential(user_buckets: int, item_buckets: int, embedding_dim: int = 32, hidden: list[int] = (64,),
                dropout: float = 0.0, embedding: str = "hashed", user_rows: int = 0, item_rows: int = 0,
                history_length: int = 20, heads: int = 2, layers: int = 1,
                text: dict[str, Any] | None = None) -> SequentialModel:
    return SequentialModel(user_buckets, item_buckets, embedding_dim, list(hidden), dropout, embedding,
                           user_rows, item_rows, history_length, heads, layers, text)

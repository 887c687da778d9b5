"""Ranking / CTR model over user and item ids (hashed buckets or a dynamic vocabulary).

score(u, i) = b + b_i + <e_u, e_i> + MLP([e_u, e_i, e_u * e_i])
The dot product lets the model rank a whole catalogue quickly; the MLP adds
interactions. With the text tower on, e_i = item embedding + text embedding.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register
from .common import INIT_STD, IdModel


class RankingModel(IdModel):
    id_tables = {"user": ["user_emb.weight"], "item": ["item_emb.weight", "item_bias.weight"]}

    def __init__(self, user_buckets: int, item_buckets: int, embedding_dim: int = 32,
                 hidden: list[int] | tuple[int, ...] = (64, 32), dropout: float = 0.0,
                 embedding: str = "hashed", user_rows: int = 0, item_rows: int = 0,
                 text: dict[str, Any] | None = None):
        super().__init__()
        self._init_ids(embedding, user_buckets, item_buckets, user_rows, item_rows)
        self.user_emb = nn.Embedding(self.rows_of["user"], embedding_dim)
        self.item_emb = nn.Embedding(self.rows_of["item"], embedding_dim)
        self.item_bias = nn.Embedding(self.rows_of["item"], 1)
        self.bias = nn.Parameter(torch.zeros(1))
        layers: list[nn.Module] = []
        width = 3 * embedding_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        nn.init.normal_(self.user_emb.weight, std=INIT_STD)
        nn.init.normal_(self.item_emb.weight, std=INIT_STD)
        nn.init.zeros_(self.item_bias.weight)
        if text:
            from .text import TextTower

            self.text = TextTower(item_buckets=item_buckets, out_dim=embedding_dim, **text)

    def item_vectors(self, batch: dict[str, torch.Tensor], rows: torch.Tensor, key: str = "item_idx"):
        v = self.item_emb(rows)
        if hasattr(self, "text"):
            v = v + self.text(batch[key])
        return v

    inputs: tuple[str, ...] = ()  # batch keys beyond user_idx / item_idx
    history_length = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ur, ir = self.rows(batch, "user"), self.rows(batch, "item")
        u = self.user_emb(ur)
        i = self.item_vectors(batch, ir)
        dot = (u * i).sum(-1)
        deep = self.mlp(torch.cat([u, i, u * i], dim=-1)).squeeze(-1)
        return self.bias + self.item_bias(ir).squeeze(-1) + dot + deep

    @torch.no_grad()
    def score_all(self, user_idx: torch.Tensor, item_idx: torch.Tensor,
                  history_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every user in ``user_idx`` for every item in ``item_idx``
        (hashed indices, as in training_examples): (U, I). ``history_idx`` is
        accepted for a uniform signature and not used."""
        U, I = len(user_idx), len(item_idx)
        users = user_idx.repeat_interleave(I)
        items = item_idx.repeat(U)
        return self.forward({"user_idx": users, "item_idx": items}).view(U, I)


@register("ranking")
def _ranking(user_buckets: int, item_buckets: int, embedding_dim: int = 32,
             hidden: list[int] = (64, 32), dropout: float = 0.0, embedding: str = "hashed",
             user_rows: int = 0, item_rows: int = 0, text: dict[str, Any] | None = None, **_ignored) -> RankingModel:
    return RankingModel(user_buckets, item_buckets, embedding_dim, list(hidden), dropout, embedding,
                        user_rows, item_rows, text)

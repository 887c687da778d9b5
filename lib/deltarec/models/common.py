"""What every model shares: id → embedding-row resolution for hashed and
dynamic-vocabulary tables, growing tables across nights, defined init of new rows."""
from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

log = logging.getLogger("deltarec.models")

EMBEDDINGS = ("hashed", "dynamic")
INIT_STD = 0.05  # every embedding row starts N(0, INIT_STD²); biases start at 0


class IdModel(nn.Module):
    """Base for models over user / item ids.

    ``id_tables`` maps a vocabulary name to the parameters indexed by its rows
    (``{"item": ["item_emb.weight", "item_bias.weight"]}``): those grow when
    the vocabulary grows. With ``embedding="dynamic"`` a batch carries
    ``user_row`` / ``item_row`` (exact, from the vocabulary); callers that only
    have hashed indices (``*_idx``) go through the ``*_lookup`` buffers."""

    id_tables: dict[str, list[str]] = {}

    def _init_ids(self, embedding: str, user_buckets: int, item_buckets: int, user_rows: int, item_rows: int):
        if embedding not in EMBEDDINGS:
            raise ValueError(f"model.embedding={embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
        self.embedding = embedding
        self.buckets = {"user": user_buckets, "item": item_buckets}
        dynamic = embedding == "dynamic"
        self.rows_of = {"user": user_rows if dynamic else user_buckets,
                        "item": item_rows if dynamic else item_buckets}
        for name in ("user", "item"):
            if self.rows_of[name] < 1:
                raise ValueError(f"{name} table has {self.rows_of[name]} rows: a dynamic vocabulary needs "
                                 f"{name}_rows >= 1 (the trainer sets it from the vocabulary)")
        if dynamic:  # hashed bucket → row (persisted: scoring from a checkpoint needs it)
            for name in ("user", "item"):
                self.register_buffer(f"{name}_lookup",
                                     torch.arange(self.buckets[name], dtype=torch.long) % self.rows_of[name])

    def rows(self, batch: dict[str, torch.Tensor], name: str, key: str | None = None) -> torch.Tensor:
        """Rows of ``batch[key or f"{name}_idx"]`` in the ``name`` tables."""
        key = key or f"{name}_idx"
        if self.embedding == "hashed":
            return batch[key]
        row_key = key.replace("_idx", "_row")
        if row_key in batch:
            return batch[row_key]
        idx = batch[key]
        lookup = getattr(self, f"{name}_lookup")
        return torch.where(idx >= 0, lookup[idx.clamp(min=0)], idx)  # keep padding (-1) as is


def init_rows(weight: torch.Tensor, rows: list[int], seed: int, tag: str, std: float = INIT_STD,
              zero: bool = False) -> None:
    """The defined initialisation of new rows: N(0, std²) from a generator
    seeded by (seed, table name, first row), drawn in row order; zeros for biases."""
    if not rows:
        return
    idx = torch.tensor(sorted(rows), dtype=torch.long)
    with torch.no_grad():
        if zero:
            weight[idx] = 0.0
            return
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(tag.encode()) + int(idx[0])) % 2**63)
        vals = torch.randn((len(idx),) + tuple(weight.shape[1:]), generator=g) * std
        weight[idx] = vals.to(weight.dtype).to(weight.device)


def load_grown(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model`` where tables may have grown: a tensor with
    fewer rows fills the model's first rows bit for bit; the rest keep the
    model's values. Returns the names that grew."""
    own = model.state_dict()
    grown, fixed = [], {}
    for k, v in state.items():
        if k not in own:
            raise KeyError(f"parent checkpoint has {k!r}, which model {type(model).__name__} does not: "
                           "a checkpoint of another model or config")
        mine = own[k]
        if k.endswith("_lookup"):
            continue  # set from tonight's vocabulary, not the parent's
        if v.shape == mine.shape:
            fixed[k] = v
        elif v.dim() == mine.dim() and v.shape[1:] == mine.shape[1:] and v.shape[0] < mine.shape[0]:
            t = mine.clone()
            t[:v.shape[0]] = v.to(t.dtype)
            fixed[k] = t
            grown.append(k)
        else:
            raise ValueError(f"parent checkpoint's {k} has shape {tuple(v.shape)}, the model's is "
                             f"{tuple(mine.shape)}: only a table's row count may change between nights")
    # parameters a newer model added (``optional_state``) start from the model's own init
    # when the parent predates them; any other gap is a checkpoint of another model
    optional = set(getattr(model, "optional_state", ()))
    added = [k for k in own if k not in fixed and k in optional]
    if added:
        log.warning("parent checkpoint predates %s: starting them from their initial values", ", ".join(added))
    missing = [k for k in own if k not in fixed and not k.endswith("_lookup") and k not in optional]
    if missing:
        raise KeyError(f"parent checkpoint lacks {', '.join(missing)}: a checkpoint of another model or config")
    model.load_state_dict({**own, **fixed})
    return grown

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
HASHED_ROWS_LIMIT = 1 << 24  # a hashed table with more rows than this is a config mistake, not a model


class IdModel(nn.Module):
    """Base for models over user / item ids.

    ``id_tables`` maps a vocabulary name to the parameters indexed by its rows
    (``{"item": ["item_emb.weight", "item_bias.weight"]}``): those grow when
    the vocabulary grows. With ``embedding="dynamic"`` a batch carries
    ``user_row`` / ``item_row`` (exact, from the vocabulary); callers that only
    have hashed indices (``*_idx``) go through the lookup: the admitted ids'
    hashed indices, sorted (``*_lookup_keys``), and their rows
    (``*_lookup_rows``), searched per call. Its size follows the vocabulary,
    not the hash space, so ids can be hashed into a space wide enough that two
    ids practically never share an index (``features.*_buckets``). An index
    the lookup does not hold is an id not admitted: the shared OOV row
    ``index % oov_buckets``. (Checkpoints written before had one dense
    ``*_lookup`` row per bucket; they load and score as they did.)

    ``optional_state``: parameters a newer model added, whose zero means
    "absent", and buffers that go with them; a checkpoint without them (saved
    before they existed) loads with the parameters at zero and the buffers as
    a new model has them, so it scores as it did, through
    :meth:`upgrade_state`, the one place that knows about old checkpoints."""

    id_tables: dict[str, list[str]] = {}
    optional_state: tuple[str, ...] = ()

    def _init_ids(self, embedding: str, user_buckets: int, item_buckets: int, user_rows: int, item_rows: int,
                  oov_buckets: int = 16):
        if embedding not in EMBEDDINGS:
            raise ValueError(f"model.embedding={embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
        self.embedding = embedding
        self.buckets = {"user": user_buckets, "item": item_buckets}
        dynamic = embedding == "dynamic"
        self.rows_of = {"user": user_rows if dynamic else user_buckets,
                        "item": item_rows if dynamic else item_buckets}
        for name in ("user", "item"):
            if not dynamic and self.rows_of[name] > HASHED_ROWS_LIMIT:
                raise ValueError(
                    f"model.embedding=hashed gives every hash bucket its own row: features.{name}_buckets="
                    f"{self.rows_of[name]} would allocate that many rows per {name} table. Set "
                    f"features.{name}_buckets to ~16x the number of {name}s (e.g. 65536), or use "
                    "model.embedding=dynamic (rows for the ids seen; the buckets only name them)")
            if self.rows_of[name] < 1:
                raise ValueError(f"{name} table has {self.rows_of[name]} rows: a dynamic vocabulary needs "
                                 f"{name}_rows >= 1 (the trainer sets it from the vocabulary)")
        if dynamic:  # admitted ids' hashed index → row (persisted: scoring from a checkpoint needs it)
            for name in ("user", "item"):
                self.register_buffer(f"{name}_lookup_keys", torch.zeros(0, dtype=torch.long))
                self.register_buffer(f"{name}_lookup_rows", torch.zeros(0, dtype=torch.long))
                self.register_buffer(f"{name}_lookup_oov", torch.tensor(min(oov_buckets, self.rows_of[name])))

    def rows(self, batch: dict[str, torch.Tensor], name: str, key: str | None = None) -> torch.Tensor:
        """Rows of ``batch[key or f"{name}_idx"]`` in the ``name`` tables."""
        key = key or f"{name}_idx"
        if self.embedding == "hashed":
            return batch[key]
        row_key = key.replace("_idx", "_row")
        if row_key in batch:
            return batch[row_key]
        return self.lookup(name, batch[key])

    def lookup(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows of hashed indices ``idx`` (dynamic vocabulary); padding (-1) stays -1."""
        dense = getattr(self, f"{name}_lookup", None)
        if dense is not None:  # a checkpoint from before the sparse lookup
            return torch.where(idx >= 0, dense[idx.clamp(min=0)], idx)
        keys, rows = getattr(self, f"{name}_lookup_keys"), getattr(self, f"{name}_lookup_rows")
        oov = idx.clamp(min=0) % getattr(self, f"{name}_lookup_oov")
        if len(keys):
            at = torch.searchsorted(keys, idx.contiguous()).clamp(max=len(keys) - 1)
            oov = torch.where(keys[at] == idx, rows[at], oov)
        return torch.where(idx >= 0, oov, idx)

    def adopt_vocabulary(self, name: str, vocab) -> None:
        """Take ``vocab``'s (models/vocab.py) admitted ids as this model's lookup for ``name``."""
        keys, rows = vocab.lookup_arrays()
        if hasattr(self, f"{name}_lookup"):  # an old dense lookup gives way to the vocabulary's
            delattr(self, f"{name}_lookup")
            self.register_buffer(f"{name}_lookup_oov", torch.tensor(0))
            for suffix in ("keys", "rows"):
                self.register_buffer(f"{name}_lookup_{suffix}", torch.zeros(0, dtype=torch.long))
        device = getattr(self, f"{name}_lookup_keys").device
        setattr(self, f"{name}_lookup_keys", torch.from_numpy(keys).to(device))
        setattr(self, f"{name}_lookup_rows", torch.from_numpy(rows).to(device))
        setattr(self, f"{name}_lookup_oov", torch.tensor(vocab.oov_buckets, device=device))

    # ---------------------------------------------------------------- loading
    def upgrade_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` as this model's code expects it: ``optional_state``
        parameters a checkpoint predates added at zero (logged), and lookup
        buffers shaped as the checkpoint's (the vocabulary sets their size)."""
        own = self.state_dict()
        added = [k for k in self.optional_state if k not in state and k in own]
        if added:
            log.warning("checkpoint predates %s: starting them at zero (buffers: empty), where they change no "
                        "score", ", ".join(added))
            buffers = dict(self.named_buffers())  # e.g. an item clock: empty, i.e. as this model was built
            state = {**state, **{k: buffers[k].clone() if k in buffers else torch.zeros_like(own[k])
                                 for k in added}}
        for name in ("user", "item"):
            if f"{name}_lookup" in state and not hasattr(self, f"{name}_lookup"):
                for suffix in LOOKUP_SUFFIXES[1:]:  # the old dense form replaces the sparse one
                    if hasattr(self, f"{name}{suffix}"):
                        delattr(self, f"{name}{suffix}")
                self.register_buffer(f"{name}_lookup", torch.empty_like(state[f"{name}_lookup"]))
        for k in [k for k in state if k.endswith(TEXT_INPUTS)]:  # a text tower's old dense per-bucket inputs
            keys = k.rsplit(".", 1)[0] + ".keys_lookup"
            if keys not in state and keys in own:
                state = {**state, keys: torch.arange(len(state[k]))}
        own = self.state_dict()
        for k, v in state.items():  # per-item inputs are sized by the data: take the checkpoint's size
            if is_lookup(k) and k in own and own[k].shape != v.shape:
                owner, _, attr = k.rpartition(".")
                setattr(self.get_submodule(owner) if owner else self, attr, torch.empty_like(v))
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self.upgrade_state(dict(state_dict)), strict=strict, assign=assign)


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


LOOKUP_SUFFIXES = ("_lookup", "_lookup_keys", "_lookup_rows", "_lookup_oov")
TEXT_INPUTS = ("frozen_lookup", "tokens_lookup")


def is_lookup(key: str) -> bool:
    """Buffers set from tonight's vocabulary or files (id lookups, the text
    tower's per-item inputs), never copied from a parent."""
    return key.endswith(LOOKUP_SUFFIXES)


def load_grown(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model`` where tables may have grown: a tensor with
    fewer rows fills the model's first rows bit for bit; the rest keep the
    model's values. Returns the names that grew."""
    if hasattr(model, "upgrade_state"):
        state = model.upgrade_state({k: v for k, v in state.items() if not is_lookup(k)})
    own = model.state_dict()
    grown, fixed = [], {}
    for k, v in state.items():
        if is_lookup(k):
            continue  # set from tonight's vocabulary, not the parent's
        if k not in own:
            raise KeyError(f"parent checkpoint has {k!r}, which model {type(model).__name__} does not: "
                           "a checkpoint of another model or config")
        mine = own[k]
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
    missing = [k for k in own if k not in fixed and not is_lookup(k)]
    if missing:
        raise KeyError(f"parent checkpoint lacks {', '.join(missing)}: a checkpoint of another model or config")
    model.load_state_dict({**own, **fixed})
    return grown

"""A user's rows leave one checkpoint.

- Dynamic vocabulary (exact ids): the user's id leaves the vocabulary and its
  own row is reset to the defined initialisation (``models.common.init_rows``)
  and freed for reuse; an id never admitted shares an out-of-vocabulary row,
  which is handled like a hashed bucket.
- Hashed ids: the user's bucket is reset when no other known user maps to it;
  otherwise it is reset and re-trained from the remaining users' examples
  only (every other parameter frozen, other rows restored bit for bit), so
  what the row holds afterwards comes from the others alone.

Wherever a row is reset, the optimizer's moments and the EWC Fisher of that
row are zeroed too: they are made of the user's gradients. Everything else in
the checkpoint is kept as it was; ``meta.json`` records the forget batches
applied (``forgotten_batches``). Row-level unlearning: the shared layers keep
what they learnt from the user, which is why ``privacy.unlearning=retrain``
exists.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..models.vocab import VOCAB_FILE
from ..train.regularizers import FISHER_FILE

log = logging.getLogger("deltarec.privacy")


@dataclass
class Rewritten:
    model: torch.nn.Module
    optimizer_state: dict[str, Any] | None
    train_state: dict[str, Any]
    meta: dict[str, Any]
    extras: dict[str, bytes]
    actions: dict[str, str] = field(default_factory=dict)  # stored key -> what happened to its row


class _SavedState:
    """What ``save_checkpoint`` asks of an optimizer: its ``state_dict()``."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def save(path: str, r: Rewritten):
    from ..train.checkpoint import save_checkpoint

    return save_checkpoint(path, r.model, _SavedState(r.optimizer_state) if r.optimizer_state is not None else None,
                           r.meta, train_state=r.train_state, extra_files=r.extras)


def forget_rows(ck, forgotten: list[str], lineage: Callable[..., pa.Table], *, batch: int, epochs: int,
                lr: float, batch_size: int) -> Rewritten:
    """``ck``: a LoadedCheckpoint. ``forgotten``: stored keys. ``lineage(columns,
    users=None)``: rows of the training examples this checkpoint's lineage
    trained on (holdout rows excluded), only ``columns``, only of ``users``
    when given. Returns the checkpoint's parts with the users' rows gone."""
    from ..models import build_model
    from ..models.vocab import vocabs_from_bytes, vocabs_to_bytes

    model = build_model(ck.meta["model"], **ck.meta["model_params"])
    model.load_state_dict(ck.model_state)
    params = list(getattr(model, "id_tables", {}).get("user", []))
    vocabs = vocabs_from_bytes(ck.extras[VOCAB_FILE]) if VOCAB_FILE in ck.extras else None
    known = lineage(["user_id", "user_idx"]).group_by(["user_id", "user_idx"]).aggregate([])
    gone = set(forgotten)
    actions: dict[str, str] = {}
    own: set[int] = set()  # admitted rows of forgotten ids: nobody else's
    shared: dict[int, list[str]] = {}  # row -> forgotten keys on it
    row_of = _rows(known, vocabs)
    for key in forgotten:
        mine = np.unique(row_of[pc.equal(known["user_id"], key).to_numpy(zero_copy_only=False)])
        admitted = _admitted_row(vocabs, key)
        if admitted is not None:
            own.add(admitted)
            mine = mine[mine != admitted]
        if admitted is None and not len(mine) and not _in_vocab(vocabs, key):
            actions[key] = "absent: the user is not in this checkpoint's training data"
            continue
        for r in mine.tolist():
            shared.setdefault(int(r), []).append(key)
        if admitted is not None:
            actions[key] = "own row reset and removed from the vocabulary"
    if vocabs is not None:
        vocabs["user"] = _without(vocabs["user"], gone, own)
        if hasattr(model, "adopt_vocabulary"):  # the scoring lookup follows the vocabulary (models/common.py)
            with torch.no_grad():
                model.adopt_vocabulary("user", vocabs["user"])
    others = ~pc.is_in(known["user_id"], pa.array(sorted(gone), pa.string())).to_numpy(zero_copy_only=False)
    retrain: dict[int, list[str]] = {}
    for r, keys in sorted(shared.items()):
        mates = pc.unique(known["user_id"].filter(pa.array(others & (row_of == r)))).to_pylist()
        if mates:
            retrain[r] = mates
        for key in keys:
            what = f"shared row re-trained from {len(mates)} other user(s)" if mates else \
                "row reset (no other known user maps to it)"
            actions[key] = (actions[key] + "; " + what) if key in actions else what
    reset = sorted(own | set(shared))
    _reset_rows(model, params, reset, seed=batch)
    if retrain and params and epochs > 0:
        users = sorted({u for m in retrain.values() for u in m})
        rows = _retrain(model, params, sorted(retrain), lineage(None, users), vocabs, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=batch)
        for r, mates in retrain.items():
            for key in shared[r]:
                actions[key] += f" ({rows} examples)"
    if not params:
        for key in actions:
            if not actions[key].startswith("absent"):
                actions[key] = f"model {ck.meta['model']!r} has no per-user rows; " + (
                    "removed from the vocabulary" if vocabs is not None else "nothing stored per user")
    opt, train_state = _zero_optimizer_rows(ck.optimizer_state, ck.train_state, model, params, reset)
    extras = dict(ck.extras)
    if vocabs is not None:
        extras[VOCAB_FILE] = vocabs_to_bytes(vocabs)
    if FISHER_FILE in extras and reset:
        extras[FISHER_FILE] = _zero_fisher(extras[FISHER_FILE], params, reset)
    meta = {**ck.meta, "forgotten_batches": sorted(set(ck.meta.get("forgotten_batches", [])) | {batch})}
    return Rewritten(model, opt, train_state, meta, extras, actions)


def _rows(known: pa.Table, vocabs) -> np.ndarray:
    """The user-table row of every (user_id, user_idx) of ``known``."""
    if vocabs is None:
        return np.asarray(known["user_idx"].to_numpy(zero_copy_only=False), dtype=np.int64)
    return vocabs["user"].rows_for(known["user_id"], known["user_idx"])


def _admitted_row(vocabs, key: str) -> int | None:
    if vocabs is None:
        return None
    v = vocabs["user"]
    pos = pc.index(v.ids, key).as_py()
    return int(v.rows[pos]) if pos >= 0 and v.rows[pos] >= 0 else None


def _in_vocab(vocabs, key: str) -> bool:
    return vocabs is not None and pc.index(vocabs["user"].ids, key).as_py() >= 0


def _without(v, gone: set[str], freed: set[int]):
    """The vocabulary ``v`` without the ids in ``gone``; their own rows join the free list."""
    from ..models.vocab import Vocabulary

    keep = ~pc.is_in(v.ids, pa.array(sorted(gone), pa.string())).to_numpy(zero_copy_only=False)
    k = pa.array(keep)
    return Vocabulary(v.name, v.min_count, v.ttl_nights, v.oov_buckets, v.ids.filter(k), v.rows[keep],
                      v.hashed[keep], v.counts[keep], v.last_seen[keep], v.night, v.num_rows,
                      sorted(set(v.free) | freed), [r for r in v.fresh if r not in freed])


def _reset_rows(model, params: list[str], rows: list[int], seed: int) -> None:
    from ..models.common import init_rows

    named = dict(model.named_parameters())
    for name in params:
        for r in rows:  # one row at a time: init_rows seeds by the first row, so each row's value is its own
            init_rows(named[name].data, [r], seed, f"forget/{name}", zero="bias" in name)


def _retrain(model, params: list[str], rows: list[int], table: pa.Table, vocabs, *, epochs: int, lr: float,
             batch_size: int, seed: int) -> int:
    """Train only ``rows`` of the ``params`` tables on ``table`` (the remaining
    users' examples); every other value of the model is restored afterwards."""
    from ..data.shards import to_shard

    if table.num_rows == 0:
        return 0
    length = int(getattr(model, "history_length", 0) or 0)
    data = to_shard(table, length, vocabs)
    named = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in params)
    train = [named[n] for n in params]
    opt = torch.optim.Adam(train, lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(data), generator=g)
            for s in range(0, len(data), batch_size):
                b = data.take(perm[s:s + batch_size])
                loss = (loss_fn(model(b).float(), b["label"]) * b["weight"]).sum() / b["weight"].sum().clamp(min=1e-12)
                opt.zero_grad()
                loss.backward()
                for p in train:
                    keep = torch.zeros(p.shape[0], dtype=torch.bool)
                    keep[rows] = True
                    p.grad[~keep] = 0
                opt.step()
    finally:
        model.eval()
        for n, p in named.items():
            p.requires_grad_(flags[n])
    with torch.no_grad():  # only the re-trained rows change; Adam's eps can nudge zero-gradient rows otherwise
        state = model.state_dict()
        for k, v in before.items():
            if k in params:
                t = v.clone()
                t[rows] = state[k][rows]
                state[k].copy_(t)
            else:
                state[k].copy_(v)
    return int(len(data))


def _zero_optimizer_rows(opt: dict[str, Any] | None, train_state: dict[str, Any], model, params: list[str],
                         rows: list[int]):
    if opt is None or not rows or not params:
        return opt, train_state
    names = train_state.get("optimizer_params") or [n for n, p in model.named_parameters() if p.requires_grad]
    state = {}
    for i, st in opt["state"].items():
        name = names[i] if i < len(names) else None
        new = {}
        for k, v in st.items():
            if name in params and torch.is_tensor(v) and v.dim() > 0:
                v = v.clone()
                v[[r for r in rows if r < v.shape[0]]] = 0
            new[k] = v
        state[i] = new
    return {**opt, "state": state}, train_state


def _zero_fisher(data: bytes, params: list[str], rows: list[int]) -> bytes:
    from safetensors.torch import load, save

    fisher = load(data)
    for name in params:
        if name in fisher and fisher[name].dim() > 0:
            fisher[name][[r for r in rows if r < fisher[name].shape[0]]] = 0
    return save({k: v.contiguous() for k, v in fisher.items()})

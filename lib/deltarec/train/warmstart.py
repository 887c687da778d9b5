"""Where a run starts: the model and optimizer, warm-started from the parent
checkpoint when there is one (weights, optimizer state, step counter and RNG),
with tables sized by tonight's vocabularies (dynamic embeddings) and frozen
modules (finetune).

Reads the parent checkpoint and, for a dynamic vocabulary, tonight's
training files (ids of the events); writes nothing.
"""
from __future__ import annotations

from typing import Any

import torch

from ..data.shards import read_shard
from ..models import build_model
from .checkpoint import load_checkpoint
from .regularizers import FISHER_FILE, Anchor, fisher_from_bytes
from .spec import TrainSpec, base_lr, is_dynamic, load_optimizer_state, lr_at, make_optimizer

VOCAB_FILE = "vocab.parquet"


def freeze(model: torch.nn.Module, prefixes: list[str]) -> list[str]:
    """Stop gradients for parameters under the named modules; returns their names."""
    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for prefix in prefixes:
        hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hit:
            top = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"train.freeze: {prefix!r} names no module of the model; modules: {', '.join(top)}")
        frozen += hit
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozen


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the optimizer holds, in its order (saved with
    each checkpoint so a run with another trainable set can map the state)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _load_optimizer(optimizer, saved: dict[str, Any], saved_names: list[str] | None, names: list[str]) -> None:
    """Load optimizer state saved for ``saved_names``; when the trainable set
    changed (e.g. a finetune freezes modules) keep the state of the parameters
    both share."""
    if saved_names is None or saved_names == names:
        load_optimizer_state(optimizer, saved)
        return
    by_name = {n: saved["state"][i] for i, n in enumerate(saved_names) if i in saved["state"]}
    group = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    load_optimizer_state(optimizer, {
        "state": {i: by_name[n] for i, n in enumerate(names) if n in by_name},
        "param_groups": [{**group, "params": list(range(len(names)))}],
    })


def _parent(spec: TrainSpec):
    return load_checkpoint(spec.parent_path, spec.parent_sha256) if spec.parent_path else None


def update_vocabs(spec: TrainSpec, parent=None) -> dict[str, Any]:
    """Tonight's vocabularies: the parent's (or empty ones) updated with the
    ids of tonight's training rows that are events (label > 0). Deterministic;
    computed once (rank 0) and sent to every rank."""
    import pyarrow.compute as pc

    from ..models.vocab import Vocabulary, vocabs_from_bytes

    parent = parent if parent is not None else _parent(spec)
    if parent is not None and VOCAB_FILE in parent.extras:
        old = {k: v.with_policy(spec.vocab_min_count, spec.vocab_ttl_nights)
               for k, v in vocabs_from_bytes(parent.extras[VOCAB_FILE]).items()}
    else:
        old = {k: Vocabulary(k, spec.vocab_min_count, spec.vocab_ttl_nights, spec.vocab_oov_buckets)
               for k in ("user", "item")}
    t = read_shard(spec.files, 0, 1, ["user_id", "item_id", "user_idx", "item_idx", "label"])
    t = t.filter(pc.greater(t["label"], 0))
    return {k: old[k].update(t[f"{k}_id"], t[f"{k}_idx"]) for k in ("user", "item")}


def model_params_for(spec: TrainSpec, vocabs: dict[str, Any] | None) -> dict[str, Any]:
    """The model's constructor arguments tonight: table sizes follow the vocabularies."""
    params = dict(spec.model_params)
    if vocabs:
        params.update(user_rows=vocabs["user"].num_rows, item_rows=vocabs["item"].num_rows)
    return params


def _grow_optimizer_state(saved: dict[str, Any], saved_names: list[str] | None, model: torch.nn.Module,
                          fresh: dict[str, list[int]]) -> dict[str, Any]:
    """Adam-style moments of grown tables padded with zeros, and zeroed at
    re-assigned rows: a new id starts with no optimizer history."""
    params = dict(model.named_parameters())
    names = saved_names or trainable_names(model)
    state = {}
    for i, st in saved["state"].items():
        n = names[i] if i < len(names) else None
        p = params.get(n)
        new = {}
        for k, v in st.items():
            if p is not None and torch.is_tensor(v) and v.dim() == p.dim() and v.dim() > 0 \
                    and v.shape[1:] == p.shape[1:] and v.shape[0] != p.shape[0]:
                g = torch.zeros((p.shape[0],) + tuple(v.shape[1:]), dtype=v.dtype)
                g[:v.shape[0]] = v
                v = g
            if p is not None and torch.is_tensor(v) and v.dim() > 0 and fresh.get(n):
                v = v.clone()
                v[torch.tensor([r for r in fresh[n] if r < v.shape[0]], dtype=torch.long)] = 0
            new[k] = v
        state[i] = new
    return {**saved, "state": state}


def build(spec: TrainSpec, device: torch.device | None = None, world: int = 1, vocabs: dict[str, Any] | None = None
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Model + optimizer (+ frozen modules), warm-started from the parent
    checkpoint when there is one: weights, optimizer state, step counter (and
    with it the learning-rate schedule) and RNG state.

    With a dynamic vocabulary the tables are sized from ``vocabs`` (computed
    from the parent and tonight's files when not given): the parent's rows are
    copied bit for bit, rows (re)assigned tonight get the defined init.
    ``state["warm"]`` carries what the forgetting controls need (popped before saving)."""
    from ..models.common import init_rows, load_grown

    parent = _parent(spec)
    if is_dynamic(spec) and vocabs is None:
        vocabs = update_vocabs(spec, parent)
    torch.manual_seed(spec.seed)
    params = model_params_for(spec, vocabs)
    model = build_model(spec.model_name, **params)
    fresh: dict[str, list[int]] = {}
    parent_rows: dict[str, int] = {}
    if parent is not None:
        before = {k: v.shape[0] for k, v in parent.model_state.items() if v.dim()}
        for k in load_grown(model, parent.model_state):
            parent_rows[k] = before[k]
    if vocabs:
        for name, v in vocabs.items():
            for pname in getattr(model, "id_tables", {}).get(name, []):
                weight = dict(model.named_parameters())[pname]
                init_rows(weight, v.fresh, spec.seed + v.night, pname, zero="bias" in pname)
                fresh[pname] = list(v.fresh)
            model.adopt_vocabulary(name, v)
    if hasattr(model, "clock"):  # items' purchases as of each training day (every rank reads the same)
        from ..models.item_clock import night_events

        if vocabs:
            model.clock.reset_rows(vocabs["item"].fresh)
        model.clock.advance(**night_events(spec.files, vocabs["item"] if vocabs else None))
    if device is not None:
        model.to(device)  # before the optimizer loads its state, so the state lands on the device too
    freeze(model, spec.freeze)
    optimizer = make_optimizer(spec, model, base_lr(spec, world))
    state: dict[str, Any] = {"global_step": 0}
    fisher = None
    if parent is not None:
        if parent.optimizer_state is not None:
            saved_names = parent.train_state.get("optimizer_params")
            _load_optimizer(optimizer, _grow_optimizer_state(parent.optimizer_state, saved_names, model, fresh),
                            saved_names, trainable_names(model))
        if FISHER_FILE in parent.extras:
            fisher = fisher_from_bytes(parent.extras[FISHER_FILE])
        state.update({k: v for k, v in parent.train_state.items()
                      if k in ("global_step", "rng_torch")})
        if "rng_torch" in state:
            torch.set_rng_state(state["rng_torch"])
    for group in optimizer.param_groups:
        group["lr"] = lr_at(spec, world, state["global_step"])
    state["warm"] = {"params": params, "vocabs": vocabs, "has_parent": parent is not None,
                     "anchor": Anchor.of(model, parent_rows, fresh, fisher) if parent is not None else None}
    return model, optimizer, state

"""The training loop every backend runs on every worker.

It gets a picklable :class:`TrainSpec` (plain values resolved on the driver)
and a collective; it knows nothing about horovod or torch.distributed.

Averaged gradients, exactly: each step's loss on a rank is
``sum(w * bce) * world / global_count`` where ``global_count`` is the number
of examples all ranks hold in that step (known from the shard sizes gathered
once, so no extra collective per step). Averaging gradients over ranks then
gives the gradient of the mean loss over the global batch: N workers on a
global batch B update exactly like one worker on B. A rank whose shard runs
out early keeps stepping on empty batches, so uneven shards never hang a
collective.

Batches are dicts of tensors (data/shards.py), so every registered model
shares this loop. Dynamic vocabularies are updated once, on rank 0, and sent
to every rank before the model is built. Forgetting controls against the
parent: distillation is a per-example term (so it averages like the loss);
the proximal and EWC penalties are added once per optimizer step on every
rank (the average of identical gradients is the penalty's own gradient).
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.shards import Batch, columns_for, read_shard, to_shard
from ..models import build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .placement import worker_placement
from .optim import LazyAdam, clip_grad_norm
from .regularizers import FISHER_FILE, Anchor, distillation, ewc_penalty, fisher_diagonal, fisher_from_bytes, \
    fisher_to_bytes, proximal_penalty

VOCAB_FILE = "vocab.parquet"

OPTIMIZERS = {
    "sgd": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd),
    "adagrad": lambda p, lr, wd: torch.optim.Adagrad(p, lr=lr, weight_decay=wd),
    "rmsprop": lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, weight_decay=wd),
    "adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd),
    "adamw": lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
    # Adam whose embedding rows update only when a batch touches them (train/optim.py)
    "lazy_adam": lambda p, lr, wd: LazyAdam(p, lr=lr, weight_decay=wd),
}


@dataclass
class TrainSpec:
    run_id: str
    files: list[str]  # parquet files of this run's training_examples
    model_name: str
    model_params: dict[str, Any]
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int  # global
    epochs: int
    seed: int
    checkpoint_dir: str  # where rank 0 writes this run's checkpoint
    meta: dict[str, Any] = field(default_factory=dict)  # saved in meta.json
    parent_path: str | None = None
    parent_sha256: str | None = None
    grad_clip: float = 0.0
    progress: bool = True
    use_gpu: bool = False
    shuffle: bool = True  # per-epoch seeded shuffle of each rank's shard
    # In-run checkpoints: every N optimizer steps rank 0 saves the full state
    # under resume_dir; a rerun of the same run id resumes from the newest one.
    resume_dir: str | None = None
    checkpoint_every_steps: int = 0
    freeze: list[str] = field(default_factory=list)  # module prefixes kept fixed (finetune)
    lr_schedule: str = "constant"  # or "exponential": lr * lr_decay ** global_step
    lr_decay: float = 1.0
    scale_lr_by_workers: bool = False  # lr * world size (Horovod's convention)
    accumulation_steps: int = 1  # micro-batches per optimizer step
    validation_fraction: float = 0.0  # > 0: hold out this share of each shard for early stopping
    patience: int = 1  # epochs without a better validation loss before stopping
    # Examples of earlier runs mixed in against forgetting (read with the files;
    # they never count towards the vocabulary's admission or last-seen).
    replay_files: list[str] = field(default_factory=list)
    history_length: int = 0  # > 0: batches carry history_idx (N, L) (sequence models)
    # Dynamic vocabulary (model_params["embedding"] == "dynamic"): admission / eviction.
    vocab_min_count: int = 1
    vocab_ttl_nights: int = 0
    vocab_oov_buckets: int = 16
    # Forgetting control against the parent (0: off): proximal λ, EWC λ, distillation weight.
    proximal: float = 0.0
    ewc: float = 0.0
    distill: float = 0.0
    fisher_batches: int = 0  # 0: no Fisher saved; else batches of the shard used for it (EWC's next night)


def make_optimizer(spec: TrainSpec, model: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    try:
        factory = OPTIMIZERS[spec.optimizer]
    except KeyError:
        raise ValueError(f"train.optimizer={spec.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return factory([p for p in model.parameters() if p.requires_grad], spec.lr if lr is None else lr,
                   spec.weight_decay)


def device_for(spec: TrainSpec, local_rank: int = 0) -> torch.device:
    """CUDA device of this worker when asked for and present, else the CPU."""
    if spec.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def base_lr(spec: TrainSpec, world: int) -> float:
    return spec.lr * (world if spec.scale_lr_by_workers else 1)


def lr_at(spec: TrainSpec, world: int, global_step: int) -> float:
    """The schedule is a function of the global step, which checkpoints carry:
    a warm start or a resume continues it exactly."""
    if spec.lr_schedule == "exponential":
        return base_lr(spec, world) * spec.lr_decay ** global_step
    if spec.lr_schedule != "constant":
        raise ValueError(f"train.lr_schedule={spec.lr_schedule!r}; choose constant or exponential")
    return base_lr(spec, world)


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


def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _load_optimizer(optimizer, saved: dict[str, Any], saved_names: list[str] | None, names: list[str]) -> None:
    """Load optimizer state saved for ``saved_names``; when the trainable set
    changed (e.g. a finetune freezes modules) keep the state of the parameters
    both share."""
    if saved_names is None or saved_names == names:
        optimizer.load_state_dict(saved)
        return
    by_name = {n: saved["state"][i] for i, n in enumerate(saved_names) if i in saved["state"]}
    group = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    optimizer.load_state_dict({
        "state": {i: by_name[n] for i, n in enumerate(names) if n in by_name},
        "param_groups": [{**group, "params": list(range(len(names)))}],
    })


def is_dynamic(spec: TrainSpec) -> bool:
    return spec.model_params.get("embedding", "hashed") == "dynamic"


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
    names = saved_names or _trainable_names(model)
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
            lookup = getattr(model, f"{name}_lookup", None)
            if lookup is not None:
                lookup.copy_(torch.from_numpy(v.hashed_lookup(len(lookup))))
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
                            saved_names, _trainable_names(model))
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


CRASH_ENV = "DELTAREC_CRASH_AT"  # tests: "after_inrun_checkpoint" kills the process right after one


def _latest_inrun(spec: TrainSpec) -> str | None:
    """Newest complete, checksum-valid in-run checkpoint of this run, if any."""
    import os

    from .checkpoint import CheckpointError, verify_checkpoint

    if not spec.resume_dir or not os.path.isdir(spec.resume_dir):
        return None
    for name in sorted(os.listdir(spec.resume_dir), reverse=True):
        path = os.path.join(spec.resume_dir, name)
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError:
            continue  # a crash while writing it: try the one before
    return None


def _resume(spec: TrainSpec, model, optimizer, state: dict[str, Any]) -> str | None:
    path = _latest_inrun(spec)
    if path is None:
        return None
    ck = load_checkpoint(path)
    if ck.meta.get("run_id") != spec.run_id or ck.meta.get("files") != sorted(spec.files):
        return None  # another run's or other data's state: never resume from it
    model.load_state_dict(ck.model_state)
    optimizer.load_state_dict(ck.optimizer_state)
    state.clear()
    state.update(ck.train_state)
    return path


def _save_inrun(spec: TrainSpec, model, optimizer, state: dict[str, Any]) -> None:
    import os
    import shutil

    path = os.path.join(spec.resume_dir, f"step-{state['global_step']:09d}")
    save_checkpoint(path, model, optimizer, {"run_id": spec.run_id, "files": sorted(spec.files)}, dict(state))
    for old in sorted(os.listdir(spec.resume_dir))[:-1]:  # keep the newest only
        shutil.rmtree(os.path.join(spec.resume_dir, old), ignore_errors=True)
    if os.environ.get(CRASH_ENV) == "after_inrun_checkpoint":
        os._exit(86)


@torch.no_grad()
def _stop_early(spec: TrainSpec, model, val, collective, state: dict[str, Any], device, cuda: bool) -> bool:
    """Weighted validation loss over all ranks' slices; True when it has not
    improved for ``spec.patience`` epochs. Every rank gets the same totals, so
    every rank takes the same decision."""
    model.eval()
    loss, count = 0.0, 0.0
    if len(val):
        val = val.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(val)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), val["label"],
                                                                   reduction="none")
        loss, count = float((bce * val["weight"]).sum()), float(val["weight"].sum())
    model.train()
    totals = collective.allgather_object((loss, count))
    value = sum(t[0] for t in totals) / max(sum(t[1] for t in totals), 1e-12)
    state["val_history"] = list(state["val_history"]) + [round(value, 6)]
    if state["best_val"] is None or value < state["best_val"] - 1e-6:
        state["best_val"], state["bad_epochs"] = value, 0
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= spec.patience


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed memory in this process's heap (glibc).

    Each step allocates and frees temporaries the size of the embedding
    tables (dense gradients, optimizer intermediates). glibc serves blocks
    over its mmap threshold with fresh mappings and returns heap tops to the
    OS, so a new worker process page-faults those megabytes every step until
    its adaptive threshold catches up: measured here, a fresh worker ran its
    steps 1.3-1.7x slower than a warmed one. Fixing the thresholds (what
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would do at start-up)
    removes that; the cost is memory kept for reuse. A no-op off glibc."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 256 << 20) == 1
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok


def train_worker(spec: TrainSpec, collective, shard=None) -> dict[str, Any]:
    """Train this rank. ``shard``: tensors already in memory instead of reading
    ``spec.files`` (the throughput benchmark's ceiling)."""
    tune_allocator()
    rank, world = collective.rank, collective.size
    t0 = time.perf_counter()
    device = device_for(spec, collective.local_rank)
    cuda = device.type == "cuda"
    vocabs = None
    if is_dynamic(spec):  # decided once, on rank 0, so every rank maps ids to the same rows
        vocabs = collective.allgather_object(update_vocabs(spec) if rank == 0 else None)[0]
    model, optimizer, state = build(spec, device, world, vocabs)
    warm = state.pop("warm")
    anchor = warm["anchor"]
    teacher = None
    if spec.distill > 0 and warm["has_parent"]:
        import copy

        teacher = copy.deepcopy(model).eval()  # the parent, grown to tonight's tables
        for p in teacher.parameters():
            p.requires_grad_(False)
    # Position inside this run: (epoch, step) of the next batch to train.
    state.update(run_epoch=0, run_step=0, best_val=None, bad_epochs=0, val_history=[])
    resumed_from = _resume(spec, model, optimizer, state) if rank == 0 else None
    # Every rank starts from rank 0's state and position.
    keys = ("run_epoch", "run_step", "global_step", "best_val", "bad_epochs", "val_history")
    state.update(zip(keys, collective.allgather_object(tuple(state[k] for k in keys))[0]))
    collective.broadcast_state(model, optimizer)
    k_acc = spec.accumulation_steps
    dopt = collective.distributed_optimizer(optimizer, model, backward_passes_per_step=k_acc)

    if shard is None:
        cols = columns_for(spec.history_length, vocabs is not None)
        shard = to_shard(read_shard(list(spec.files) + list(spec.replay_files), rank, world, cols),
                         spec.history_length, vocabs)
    elif not isinstance(shard, Batch):  # an older Shard-like object with attributes
        shard = Batch(user_idx=shard.user_idx, item_idx=shard.item_idx, label=shard.label, weight=shard.weight)
    # Early stopping: the head of each shard (stored in a seeded hash order, so a
    # uniform sample) is the validation slice.
    n_val = int(len(shard) * spec.validation_fraction)
    val = shard.slice(0, n_val)
    shard = shard.slice(n_val, len(shard))
    if cuda:  # the shard's columns fit on the GPU: one pinned, asynchronous copy, then index there
        shard = shard.pin_memory().to(device, non_blocking=True)
    data_seconds = time.perf_counter() - t0
    sizes = collective.allgather_object(len(shard))
    local_bs = spec.batch_size // world
    micro_bs = math.ceil(local_bs / k_acc)
    steps = math.ceil(max(sizes) / local_bs) if max(sizes) else 0
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")

    bar = None
    if spec.progress and rank == 0 and steps:
        from tqdm import tqdm

        bar = tqdm(total=steps * spec.epochs, desc=f"train {spec.run_id} ×{world}", unit="step",
                   mininterval=2.0, leave=False)
    model.train()
    seen, compute_seconds = 0, 0.0
    # Steady state: examples/second after the first few steps, which pay
    # one-off costs (lazy imports such as torch._dynamo on the first optimizer
    # step, allocator growth, CUDA kernels loading) that a long run amortises.
    warm_steps, warm_at, warm_seen, steps_run = min(10, max(steps // 10, 1)), None, 0, 0
    first_step_at = None
    # Summed on the device: reading it each step would make the CPU wait for the GPU.
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    start_epoch, start_step = state["run_epoch"], state["run_step"]
    if bar is not None and (start_epoch or start_step):
        bar.update(start_epoch * steps + start_step)
    for epoch in range(start_epoch, spec.epochs):
        # A fresh generator per (epoch, rank): a resumed run draws the same order.
        g = torch.Generator().manual_seed((spec.seed * 1_000_003 + epoch) * 1_009 + rank)
        perm = torch.randperm(len(shard), generator=g) if spec.shuffle else torch.arange(len(shard))
        for t in range(start_step if epoch == start_epoch else 0, steps):
            tw = time.perf_counter()
            if first_step_at is None:
                first_step_at = tw
            if steps_run == warm_steps:
                warm_at, warm_seen = tw, seen
            steps_run += 1
            idx = perm[t * local_bs:(t + 1) * local_bs]
            idx = idx.to(device)
            batch = shard.take(idx)
            global_count = sum(min(max(n - t * local_bs, 0), local_bs) for n in sizes)
            tc = time.perf_counter()
            data_seconds += tc - tw
            dopt.zero_grad()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(spec, world, state["global_step"])
            raw = torch.zeros((), device=device)
            for j in range(k_acc):  # gradients add up over the micro-batches; one averaged step
                mb = batch.slice(j * micro_bs, (j + 1) * micro_bs)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # bf16 matmuls on GPU
                    logits = model(mb).float()
                per = loss_fn(logits, mb["label"])
                if teacher is not None:  # per example, so it averages over the global batch like the loss
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                        t_logits = teacher(mb).float()
                    per = per + spec.distill * distillation(logits, t_logits)
                part = (per * mb["weight"]).sum()
                loss = part * world / global_count
                if j == 0 and anchor is not None and (spec.proximal > 0 or spec.ewc > 0):
                    # once per step on every rank: the averaged gradient is the penalty's own
                    loss = loss + proximal_penalty(model, anchor, spec.proximal) if spec.proximal > 0 else loss
                    loss = loss + ewc_penalty(model, anchor, spec.ewc) if spec.ewc > 0 else loss
                loss.backward()
                raw = raw + part.detach()
            if spec.grad_clip > 0:
                dopt.synchronize()
                clip_grad_norm(model.parameters(), spec.grad_clip)
                with dopt.skip_synchronize():
                    dopt.step()
            else:
                dopt.step()
            compute_seconds += time.perf_counter() - tc
            seen += len(idx)
            loss_acc += raw
            state["global_step"] = int(state.get("global_step", 0)) + 1
            state["run_epoch"], state["run_step"] = (epoch, t + 1) if t + 1 < steps else (epoch + 1, 0)
            if spec.checkpoint_every_steps and state["global_step"] % spec.checkpoint_every_steps == 0 \
                    and rank == 0 and spec.resume_dir:
                _save_inrun(spec, model, optimizer, state)
            if bar is not None:
                bar.update(1)
                if t % 50 == 0 or t + 1 == steps:
                    bar.set_postfix(loss=f"{float(loss_acc) / max(seen, 1):.4f}",
                                    ex_s=f"{seen * world / (time.perf_counter() - t0):.0f}", refresh=False)
        if spec.validation_fraction > 0:  # the same on every rank: they all join the gather
            if _stop_early(spec, model, val, collective, state, device, cuda):
                break
    if bar is not None:
        bar.close()
    if cuda:
        torch.cuda.synchronize(device)  # steps queued on the GPU count in the time
    steps_end = time.perf_counter()
    fisher = None
    if spec.fisher_batches > 0:  # for EWC next night; every rank joins the allreduce
        n_fb = min(spec.fisher_batches, math.ceil(len(shard) / max(local_bs, 1)))
        fisher = fisher_diagonal(
            model, (shard.slice(b * local_bs, (b + 1) * local_bs) for b in range(n_fb)),
            lambda b: (loss_fn(model(b).float(), b["label"]) * b["weight"]).sum() / max(float(b["weight"].sum()), 1e-12),
            collective.allreduce_mean if world > 1 else None)
    seconds = time.perf_counter() - t0
    mine = {"rank": rank, "examples": seen, "seconds": round(seconds, 3),
            "examples_per_second": round(seen / seconds, 1) if seconds else 0.0,
            "data_seconds": round(data_seconds, 3), "compute_seconds": round(compute_seconds, 3),
            "setup_seconds": round((first_step_at or steps_end) - t0, 3),
            "sync_seconds": round(getattr(dopt, "sync_seconds", 0.0), 3),
            "steady_examples_per_second": round((seen - warm_seen) / (steps_end - warm_at), 1)
            if warm_at is not None and steps_end > warm_at else None,
            "loss_sum": float(loss_acc), "device": str(device),
            "comm": getattr(collective, "backend", collective.name),
            # this worker process's peak resident memory (Linux reports KiB), for cost benchmarks
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **worker_placement()}  # host, pid, Spark executor: where this rank ran
    ranks = collective.allgather_object(mine)
    result: dict[str, Any] = {"ranks": ranks, "steps": steps * spec.epochs, "world_size": world,
                              "resumed_from": resumed_from, "val_history": state["val_history"],
                              "epochs_run": state["run_epoch"] if state["run_step"] == 0 else state["run_epoch"] + 1}
    if rank == 0:
        total = sum(r["examples"] for r in ranks)
        result["examples"] = total
        result["train_loss"] = sum(r["loss_sum"] for r in ranks) / total if total else None
        state["rng_torch"] = torch.get_rng_state()
        for k in ("run_epoch", "run_step", "best_val", "bad_epochs", "val_history"):  # this run's only
            state.pop(k, None)
        state["optimizer_params"] = _trainable_names(model)
        extra: dict[str, bytes] = {}
        if vocabs:
            from ..models.vocab import vocabs_to_bytes

            extra[VOCAB_FILE] = vocabs_to_bytes(vocabs)
            result["vocab"] = {k: {"ids": len(v), "rows": v.num_rows, "new_rows": len(v.fresh)}
                               for k, v in vocabs.items()}
        if fisher is not None:
            extra[FISHER_FILE] = fisher_to_bytes(fisher)
        saved = save_checkpoint(spec.checkpoint_dir, model, optimizer,
                                meta={**spec.meta, "model": spec.model_name, "model_params": warm["params"],
                                      "run_id": spec.run_id, "global_step": state["global_step"]},
                                train_state=state, extra_files=extra)
        result["checkpoint"] = {"path": saved.path, "sha256": saved.sha256, "files": saved.files}
    collective.barrier()
    return result

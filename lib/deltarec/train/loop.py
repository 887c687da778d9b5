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
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.shards import read_shard, to_shard
from ..models import build_model
from .checkpoint import load_checkpoint, save_checkpoint

OPTIMIZERS = {
    "sgd": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd),
    "adagrad": lambda p, lr, wd: torch.optim.Adagrad(p, lr=lr, weight_decay=wd),
    "rmsprop": lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, weight_decay=wd),
    "adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd),
    "adamw": lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
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


def build(spec: TrainSpec, device: torch.device | None = None, world: int = 1
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Model + optimizer (+ frozen modules), warm-started from the parent
    checkpoint when there is one: weights, optimizer state, step counter (and
    with it the learning-rate schedule) and RNG state."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model_name, **spec.model_params)
    if device is not None:
        model.to(device)  # before the optimizer loads its state, so the state lands on the device too
    freeze(model, spec.freeze)
    optimizer = make_optimizer(spec, model, base_lr(spec, world))
    state: dict[str, Any] = {"global_step": 0}
    if spec.parent_path:
        parent = load_checkpoint(spec.parent_path, spec.parent_sha256)
        model.load_state_dict(parent.model_state)
        if parent.optimizer_state is not None:
            _load_optimizer(optimizer, parent.optimizer_state, parent.train_state.get("optimizer_params"),
                            _trainable_names(model))
        state.update({k: v for k, v in parent.train_state.items()
                      if k in ("global_step", "rng_torch")})
        if "rng_torch" in state:
            torch.set_rng_state(state["rng_torch"])
    for group in optimizer.param_groups:
        group["lr"] = lr_at(spec, world, state["global_step"])
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


def _slice(shard, start: int, end: int):
    return type(shard)(shard.user_idx[start:end], shard.item_idx[start:end], shard.label[start:end],
                       shard.weight[start:end])


@torch.no_grad()
def _stop_early(spec: TrainSpec, model, val, collective, state: dict[str, Any], device, cuda: bool) -> bool:
    """Weighted validation loss over all ranks' slices; True when it has not
    improved for ``spec.patience`` epochs. Every rank gets the same totals, so
    every rank takes the same decision."""
    model.eval()
    loss, count = 0.0, 0.0
    if len(val):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(val.user_idx.to(device), val.item_idx.to(device))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), val.label.to(device),
                                                                   reduction="none")
        loss, count = float((bce * val.weight.to(device)).sum()), float(val.weight.sum())
    model.train()
    totals = collective.allgather_object((loss, count))
    value = sum(t[0] for t in totals) / max(sum(t[1] for t in totals), 1e-12)
    state["val_history"] = list(state["val_history"]) + [round(value, 6)]
    if state["best_val"] is None or value < state["best_val"] - 1e-6:
        state["best_val"], state["bad_epochs"] = value, 0
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= spec.patience


def train_worker(spec: TrainSpec, collective, shard=None) -> dict[str, Any]:
    """Train this rank. ``shard``: tensors already in memory instead of reading
    ``spec.files`` (the throughput benchmark's ceiling)."""
    rank, world = collective.rank, collective.size
    t0 = time.perf_counter()
    device = device_for(spec, collective.local_rank)
    cuda = device.type == "cuda"
    model, optimizer, state = build(spec, device, world)
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
        shard = to_shard(read_shard(spec.files, rank, world))
    # Early stopping: the head of each shard (stored in a seeded hash order, so a
    # uniform sample) is the validation slice.
    n_val = int(len(shard) * spec.validation_fraction)
    val = _slice(shard, 0, n_val)
    shard = _slice(shard, n_val, len(shard))
    if cuda:  # the shard's four columns fit on the GPU: one pinned, asynchronous copy, then index there
        shard = type(shard)(*(t.pin_memory().to(device, non_blocking=True)
                              for t in (shard.user_idx, shard.item_idx, shard.label, shard.weight)))
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
    seen, loss_sum, compute_seconds = 0, 0.0, 0.0
    start_epoch, start_step = state["run_epoch"], state["run_step"]
    if bar is not None and (start_epoch or start_step):
        bar.update(start_epoch * steps + start_step)
    for epoch in range(start_epoch, spec.epochs):
        # A fresh generator per (epoch, rank): a resumed run draws the same order.
        g = torch.Generator().manual_seed((spec.seed * 1_000_003 + epoch) * 1_009 + rank)
        perm = torch.randperm(len(shard), generator=g) if spec.shuffle else torch.arange(len(shard))
        for t in range(start_step if epoch == start_epoch else 0, steps):
            tw = time.perf_counter()
            idx = perm[t * local_bs:(t + 1) * local_bs]
            idx = idx.to(device)
            u, i, y, w = shard.user_idx[idx], shard.item_idx[idx], shard.label[idx], shard.weight[idx]
            global_count = sum(min(max(n - t * local_bs, 0), local_bs) for n in sizes)
            tc = time.perf_counter()
            data_seconds += tc - tw
            dopt.zero_grad()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(spec, world, state["global_step"])
            raw = torch.zeros((), device=device)
            for j in range(k_acc):  # gradients add up over the micro-batches; one averaged step
                sl = slice(j * micro_bs, (j + 1) * micro_bs)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # bf16 matmuls on GPU
                    logits = model(u[sl], i[sl])
                part = (loss_fn(logits.float(), y[sl]) * w[sl]).sum()
                (part * world / global_count).backward()
                raw = raw + part.detach()
            if spec.grad_clip > 0:
                dopt.synchronize()
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                with dopt.skip_synchronize():
                    dopt.step()
            else:
                dopt.step()
            compute_seconds += time.perf_counter() - tc
            seen += len(idx)
            loss_sum += float(raw)
            state["global_step"] = int(state.get("global_step", 0)) + 1
            state["run_epoch"], state["run_step"] = (epoch, t + 1) if t + 1 < steps else (epoch + 1, 0)
            if spec.checkpoint_every_steps and state["global_step"] % spec.checkpoint_every_steps == 0 \
                    and rank == 0 and spec.resume_dir:
                _save_inrun(spec, model, optimizer, state)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", ex_s=f"{seen * world / (time.perf_counter() - t0):.0f}",
                                refresh=False)
        if spec.validation_fraction > 0:  # the same on every rank: they all join the gather
            if _stop_early(spec, model, val, collective, state, device, cuda):
                break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    mine = {"rank": rank, "examples": seen, "seconds": round(seconds, 3),
            "examples_per_second": round(seen / seconds, 1) if seconds else 0.0,
            "data_seconds": round(data_seconds, 3), "compute_seconds": round(compute_seconds, 3),
            "loss_sum": loss_sum,
            # this worker process's peak resident memory (Linux reports KiB), for cost benchmarks
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
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
        saved = save_checkpoint(spec.checkpoint_dir, model, optimizer,
                                meta={**spec.meta, "model": spec.model_name, "model_params": spec.model_params,
                                      "run_id": spec.run_id, "global_step": state["global_step"]},
                                train_state=state)
        result["checkpoint"] = {"path": saved.path, "sha256": saved.sha256, "files": saved.files}
    collective.barrier()
    return result

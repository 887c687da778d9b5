"""The training loop every backend runs on every worker.

It gets a picklable :class:`TrainSpec` (plain values resolved on the driver)
and a collective; it knows nothing about horovod or torch.distributed: the
gradient exchange (exchange.py) takes the collective and is the same for all.

Averaged gradients, exactly: each step's loss on a rank is
``loss_sum * world / global_count`` (loss.py) where ``global_count`` is the
number of examples all ranks hold in that step (known from the shard sizes
gathered once, so no extra collective per step). Averaging gradients over
ranks then gives the gradient of the mean loss over the global batch: N
workers on a global batch B update exactly like one worker on B. A rank whose
shard runs out early keeps stepping on empty batches, so uneven shards never
hang a collective.

Batches are dicts of tensors (data/shards.py), so every registered model
shares this loop. Dynamic vocabularies are updated once, on rank 0, and sent
to every rank before the model is built. Forgetting controls against the
parent: distillation is a per-example term (so it averages like the loss);
the proximal and EWC penalties are the same on every rank (the weights are),
so their gradient is added after the exchange, once per optimizer step.

Each rank reports its own phases (``phases``: group, read, build, steps,
save seconds and the wall-clock time it entered) so the fixed cost of a
night can be told from its steps.
"""
from __future__ import annotations

import copy
import math
import os
import resource
import time
from typing import Any

import torch

from ..data.shards import Batch, columns_for, read_shard, to_shard
from ..faults import crash_point
from .checkpoint import save_checkpoint
from .exchange import GradientExchange
from .loss import loss_sum, mean_loss, step_loss_sum
from .losses import LossSpec, Objective
from .optim import clip_grad_norm
from .placement import worker_placement
from .regularizers import FISHER_FILE, ewc_penalty, fisher_diagonal, fisher_to_bytes, proximal_penalty
from .resume import resume, save_inrun, shard_key
from .spec import TrainSpec, device_for, is_dynamic, lr_at
from .warmstart import VOCAB_FILE, build, trainable_names, update_vocabs

__all__ = ["TrainSpec", "VOCAB_FILE", "build", "update_vocabs", "train_worker", "tune_allocator"]

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
        loss, count = float(loss_sum(logits, val["label"], val["weight"])), float(val["weight"].sum())
    model.train()
    totals = collective.allgather_object((loss, count))
    value = sum(t[0] for t in totals) / max(sum(t[1] for t in totals), 1e-12)
    state["val_history"] = list(state["val_history"]) + [round(value, 6)]
    if state["best_val"] is None or value < state["best_val"] - 1e-6:
        state["best_val"], state["bad_epochs"] = value, 0
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= spec.patience


def _teacher(spec: TrainSpec, model, has_parent: bool):
    """The parent, grown to tonight's tables, frozen: distillation's target."""
    if not (spec.distill > 0 and has_parent):
        return None
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _read(spec: TrainSpec, rank: int, world: int, vocabs, model) -> Batch:
    repeat = spec.repeat_items if "repeat_idx" in getattr(model, "inputs", ()) else 0
    cols = columns_for(spec.history_length, vocabs is not None, "event_day" in getattr(model, "inputs", ()), repeat)
    return to_shard(read_shard(list(spec.files) + list(spec.replay_files), rank, world, cols),
                    spec.history_length, vocabs, repeat)


def _penalties(spec: TrainSpec, model, anchor) -> torch.Tensor | None:
    if anchor is None or not (spec.proximal > 0 or spec.ewc > 0):
        return None
    loss = proximal_penalty(model, anchor, spec.proximal) if spec.proximal > 0 else 0.0
    return loss + ewc_penalty(model, anchor, spec.ewc) if spec.ewc > 0 else loss


def _collisions(spec: TrainSpec) -> dict[str, Any]:
    """Hashed ids: how many of tonight's distinct users and items share a row (models/vocab.py)."""
    from ..models.vocab import hash_collisions

    try:
        t = read_shard(spec.files, 0, 1, ["user_id", "item_id", "user_idx", "item_idx"], drop_holdout=False)
    except KeyError:  # files without ids (made by hand)
        return {}
    return {k: hash_collisions(t[f"{k}_id"], t[f"{k}_idx"]) for k in ("user", "item")}


def train_worker(spec: TrainSpec, collective, shard: Batch | None = None, phases: dict[str, float] | None = None) -> dict[str, Any]:
    """Train this rank. ``shard``: tensors already in memory instead of reading
    ``spec.files`` (the throughput benchmark's in-memory reference).
    ``phases``: what the backend measured before (``entered_at``: wall-clock
    time the worker's entry started; ``group``: seconds forming the process
    group); this rank's own phases are added and reported."""
    tune_allocator()
    phases = dict(phases or {})
    phases.setdefault("entered_at", time.time())
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
    teacher = _teacher(spec, model, warm["has_parent"])
    # Position inside this run: (epoch, step) of the next batch to train.
    state.update(run_epoch=0, run_step=0, best_val=None, bad_epochs=0, val_history=[])
    t_read = time.perf_counter()
    phases["build"] = t_read - t0
    shard = _read(spec, rank, world, vocabs, model) if shard is None else shard
    # In-run checkpoints match on the data read (not on file names, which a rerun changes).
    inrun = rank == 0 and spec.resume_dir and (spec.checkpoint_every_steps or os.path.isdir(spec.resume_dir))
    inrun_key = shard_key(spec, shard, world) if inrun else ""  # hashing the shard: only when it can matter
    resumed_from = resume(spec, model, optimizer, state, inrun_key) if rank == 0 else None
    # Every rank starts from rank 0's state and position.
    keys = ("run_epoch", "run_step", "global_step", "best_val", "bad_epochs", "val_history")
    state.update(zip(keys, collective.allgather_object(tuple(state[k] for k in keys))[0]))
    collective.broadcast_state(model, optimizer)
    exchange = GradientExchange(model, optimizer, collective)
    # Early stopping: the head of each shard (stored in a seeded hash order, so a
    # uniform sample) is the validation slice.
    n_val = int(len(shard) * spec.validation_fraction)
    val = shard.slice(0, n_val)
    shard = shard.slice(n_val, len(shard))
    if cuda:  # the shard's columns fit on the GPU: one pinned, asynchronous copy, then index there
        shard = shard.pin_memory().to(device, non_blocking=True)
    phases["read"] = time.perf_counter() - t_read
    data_seconds = time.perf_counter() - t0
    sizes = collective.allgather_object(len(shard))
    k_acc = spec.accumulation_steps
    local_bs = spec.batch_size // world
    micro_bs = math.ceil(local_bs / k_acc)
    steps = math.ceil(max(sizes) / local_bs) if max(sizes) else 0
    objective = Objective(LossSpec(**{**spec.loss, "seed": spec.seed}), collective, device)

    bar = None
    if spec.progress and rank == 0 and steps:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log, CI).
        bar = tqdm(total=steps * spec.epochs, desc=f"train {spec.run_id} ×{world}", unit="step",
                   mininterval=2.0, leave=False, disable=None)
    model.train()
    seen, compute_seconds = 0, 0.0
    # Steady state: examples/second after the first few steps, which pay
    # one-off costs (lazy imports on the first optimizer step, allocator
    # growth, CUDA kernels loading) that a long run amortises.
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
            idx = perm[t * local_bs:(t + 1) * local_bs].to(device)
            batch = shard.take(idx)
            global_count = sum(min(max(n - t * local_bs, 0), local_bs) for n in sizes)
            tc = time.perf_counter()
            data_seconds += tc - tw
            optimizer.zero_grad(set_to_none=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(spec, world, state["global_step"])
            raw = torch.zeros((), device=device)
            objective.begin_step(model, batch, state["global_step"])  # every rank, once per step
            for j in range(k_acc):  # gradients add up over the micro-batches; one averaged step
                mb = batch.slice(j * micro_bs, (j + 1) * micro_bs)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # bf16 matmuls on GPU
                    part = step_loss_sum(objective, model, mb, teacher, spec.distill)
                (part * world / global_count).backward()
                raw = raw + part.detach()
            exchange.average()
            penalty = _penalties(spec, model, anchor)
            if penalty is not None:  # identical on every rank: added after the exchange, not averaged
                penalty.backward()
            if spec.grad_clip > 0:
                clip_grad_norm(model.parameters(), spec.grad_clip)
            optimizer.step()
            compute_seconds += time.perf_counter() - tc
            seen += len(idx)
            loss_acc += raw
            state["global_step"] = int(state.get("global_step", 0)) + 1
            state["run_epoch"], state["run_step"] = (epoch, t + 1) if t + 1 < steps else (epoch + 1, 0)
            if spec.checkpoint_every_steps and state["global_step"] % spec.checkpoint_every_steps == 0 \
                    and rank == 0 and spec.resume_dir:
                save_inrun(spec, model, optimizer, state, inrun_key)
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
    phases["steps"] = steps_end - (first_step_at or steps_end)
    fisher = None
    if spec.fisher_batches > 0:  # for EWC next night; every rank joins the allreduce
        n_fb = min(spec.fisher_batches, math.ceil(len(shard) / max(local_bs, 1)))
        fisher = fisher_diagonal(
            model, (shard.slice(b * local_bs, (b + 1) * local_bs) for b in range(n_fb)),
            lambda b: mean_loss(model(b), b["label"], b["weight"]),
            collective.allreduce_mean if world > 1 else None)
    seconds = time.perf_counter() - t0
    mine = {"rank": rank, "pid": os.getpid(), "examples": seen, "seconds": round(seconds, 3),
            "examples_per_second": round(seen / seconds, 1) if seconds else 0.0,
            "data_seconds": round(data_seconds, 3), "compute_seconds": round(compute_seconds, 3),
            "setup_seconds": round((first_step_at or steps_end) - t0, 3),
            "sync_seconds": round(exchange.seconds, 3),
            "steady_examples_per_second": round((seen - warm_seen) / (steps_end - warm_at), 1)
            if warm_at is not None and steps_end > warm_at else None,
            "loss_sum": float(loss_acc), "device": str(device),
            "comm": getattr(collective, "backend", collective.name),
            # this worker process's peak resident memory (Linux reports KiB), for cost benchmarks
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **worker_placement()}  # host, pid, Spark executor: where this rank ran
    return _finish(spec, collective, model, optimizer, state, warm, vocabs, fisher, mine, phases, steps,
                   resumed_from)


def _finish(spec: TrainSpec, collective, model, optimizer, state, warm, vocabs, fisher, mine, phases, steps,
            resumed_from) -> dict[str, Any]:
    """Rank 0 saves the checkpoint; every rank returns the run's summary."""
    t_save = time.perf_counter()
    rank, world = collective.rank, collective.size
    result: dict[str, Any] = {"steps": steps * spec.epochs, "world_size": world, "resumed_from": resumed_from,
                              "val_history": state["val_history"], "loss_name": spec.loss.get("name", "bce"),
                              "epochs_run": state["run_epoch"] if state["run_step"] == 0 else state["run_epoch"] + 1}
    if rank == 0:
        state["rng_torch"] = torch.get_rng_state()
        for k in ("run_epoch", "run_step", "best_val", "bad_epochs", "val_history"):  # this run's only
            state.pop(k, None)
        state["optimizer_params"] = trainable_names(model)
        extra: dict[str, bytes] = {}
        if vocabs:
            from ..models.vocab import vocabs_to_bytes

            extra[VOCAB_FILE] = vocabs_to_bytes(vocabs)
            result["vocab"] = {k: v.stats() for k, v in vocabs.items()}
        result["ids"] = result.get("vocab") or _collisions(spec)
        if fisher is not None:
            extra[FISHER_FILE] = fisher_to_bytes(fisher)
        saved = save_checkpoint(spec.checkpoint_dir, model, optimizer,
                                meta={**spec.meta, "model": spec.model_name, "model_params": warm["params"],
                                      "run_id": spec.run_id, "global_step": state["global_step"]},
                                train_state=state, extra_files=extra)
        result["checkpoint"] = {"path": saved.path, "sha256": saved.sha256, "files": saved.files}
        crash_point("after_checkpoint_write")  # the candidate is complete; nothing has scored or committed it
    phases["save"] = time.perf_counter() - t_save
    mine["phases"] = {k: round(v, 3) for k, v in phases.items()}
    ranks = collective.allgather_object(mine)
    result["ranks"] = ranks
    if rank == 0:
        total = sum(r["examples"] for r in ranks)
        result["examples"] = total
        result["train_loss"] = sum(r["loss_sum"] for r in ranks) / total if total else None
    collective.barrier()
    return result

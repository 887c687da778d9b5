"""Worker side of every backend: join the process group, train, report.

The entry points here run inside the worker processes (``horovod.spark.run``'s,
TorchDistributor's, or the local pool's, pool.py). Each joins its group,
wraps ``train_worker`` so an error names the rank that raised it, and
records when the process started and how long the group took to form, so a
night's fixed cost can be split into launch, imports, group, shard read,
model build, steps and save (``ranks[i]["phases"]``).
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any

from .loop import train_worker
from .spec import TrainSpec


class TrainingFailed(RuntimeError):
    pass


def process_started_at() -> float | None:
    """Wall-clock time this process was created (Linux), else None: with the
    time its entry function starts, it tells process start from imports."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # start, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def warm_up() -> None:
    """Pay what a process pays on its first run before the run: creating the
    first optimizer imports torch._dynamo (torch wraps
    ``Optimizer.add_param_group`` to keep the compiler out), 1.5-4 s here."""
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def entry_phases(entered_at: float, group_seconds: float) -> dict[str, float]:
    phases = {"entered_at": entered_at, "group": group_seconds}
    started = process_started_at()
    if started is not None:
        phases["process_started_at"] = started
    return phases


def guarded(spec: TrainSpec, collective, phases: dict[str, float] | None = None) -> dict[str, Any]:
    if hasattr(collective, "timeout_s"):
        collective.timeout_s = spec.collective_timeout_s
    try:
        return train_worker(spec, collective, phases=phases)
    except Exception as e:
        raise TrainingFailed(
            f"worker rank {collective.rank}/{collective.size} ({collective.name}) failed: "
            f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        ) from e


def join_torch(use_gpu: bool):
    """Form the torch.distributed group from the environment (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, LOCAL_RANK, as torchrun and TorchDistributor set them)."""
    import torch
    import torch.distributed as dist

    from .collective import TorchCollective

    backend = "nccl" if use_gpu and torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # before the group forms: NCCL binds each rank's communicator to its GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend)
    torch.set_num_threads(1)
    return TorchCollective()


def leave_torch() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def join_horovod(use_gpu: bool):
    """``hvd.init()`` from the environment horovod's launchers (or pool.py) set."""
    import horovod.torch as hvd
    import torch

    from .collective import HorovodCollective

    # Horovod's background thread negotiates each step's collectives once per
    # cycle (1 ms by default); our CPU steps take a few ms, so a shorter cycle
    # cuts the wait. An explicit HOROVOD_CYCLE_TIME in the environment wins.
    os.environ.setdefault("HOROVOD_CYCLE_TIME", "0.1")
    hvd.init()
    torch.set_num_threads(1)
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
    return HorovodCollective(hvd)


def leave_horovod() -> None:
    import horovod.torch as hvd

    hvd.shutdown()


def horovod_entry(spec: TrainSpec) -> dict[str, Any]:
    """One rank under ``horovod.spark.run``."""
    entered = time.time()
    t = time.perf_counter()
    collective = join_horovod(spec.use_gpu)
    phases = entry_phases(entered, time.perf_counter() - t)
    try:
        return guarded(spec, collective, phases)
    except TrainingFailed as e:
        # Returned, not raised: horovod.spark.run would replace the message with
        # "one or more processes exited with non-zero status". Shutting down
        # here makes the other ranks' pending collectives fail instead of hang.
        return {"error": str(e), "rank": collective.rank}
    finally:
        leave_horovod()


def torch_entry(spec: TrainSpec) -> dict[str, Any]:
    """One rank under TorchDistributor."""
    entered = time.time()
    t = time.perf_counter()
    collective = join_torch(spec.use_gpu)
    phases = entry_phases(entered, time.perf_counter() - t)
    try:
        return guarded(spec, collective, phases)
    finally:
        leave_torch()

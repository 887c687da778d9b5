"""Training backends: how the same ``train_worker`` is run on N workers.

- ``horovod``: ``horovod.spark.run`` on the Spark executors (Gloo on CPU,
  NCCL on GPU), ``hvd.DistributedOptimizer``.
- ``torch``: torch.distributed via ``TorchDistributor`` on Spark.
- ``local``: one worker in this process (tests, laptops without horovod).

Each returns rank 0's result. A worker's exception fails the run with the
worker's rank and error in the message.
"""
from __future__ import annotations

import os
import traceback
from typing import TYPE_CHECKING, Any

from .loop import TrainSpec, train_worker

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


class TrainingFailed(RuntimeError):
    pass


def _guarded(spec: TrainSpec, collective) -> dict[str, Any]:
    try:
        return train_worker(spec, collective)
    except Exception as e:
        raise TrainingFailed(
            f"worker rank {collective.rank}/{collective.size} ({collective.name}) failed: "
            f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        ) from e


def _horovod_entry(spec: TrainSpec) -> dict[str, Any]:
    import horovod.torch as hvd
    import torch

    from .collective import HorovodCollective

    hvd.init()
    torch.set_num_threads(1)
    if spec.use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
    try:
        return _guarded(spec, HorovodCollective(hvd))
    except TrainingFailed as e:
        # Returned, not raised: horovod.spark.run would replace the message with
        # "one or more processes exited with non-zero status". Shutting down
        # here makes the other ranks' pending collectives fail instead of hang.
        return {"error": str(e), "rank": hvd.rank()}
    finally:
        hvd.shutdown()


def _torch_entry(spec: TrainSpec) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from .collective import TorchCollective

    backend = "nccl" if spec.use_gpu and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    torch.set_num_threads(1)
    try:
        return _guarded(spec, TorchCollective())
    finally:
        dist.destroy_process_group()


class LocalBackend:
    name = "local"
    num_processes = 1

    def run(self, spec: TrainSpec) -> dict[str, Any]:
        from .collective import LocalCollective

        return _guarded(spec, LocalCollective())


class HorovodBackend:
    name = "horovod"

    def __init__(self, spark: "SparkSession", num_processes: int):
        self.spark = spark
        self.num_processes = num_processes

    def run(self, spec: TrainSpec) -> dict[str, Any]:
        try:
            import horovod.spark
        except ImportError as e:
            raise TrainingFailed(
                f"train.backend=horovod but horovod is not importable ({e}); build it with "
                "lib/bootstrap_env.sh or set train.backend=torch"
            ) from None
        # env=None: workers inherit this environment (a partial env breaks their launch).
        try:
            results = horovod.spark.run(_horovod_entry, args=(spec,), num_proc=self.num_processes,
                                        use_gloo=True, use_mpi=False, verbose=int(os.environ.get("DELTAREC_HOROVOD_VERBOSE", "0")))
        except Exception as e:
            raise TrainingFailed(_worker_message(e)) from e
        _raise_worker_errors(results)
        return results[0]


class TorchBackend:
    name = "torch"

    def __init__(self, spark: "SparkSession", num_processes: int, use_gpu: bool = False):
        self.spark = spark
        self.num_processes = num_processes
        self.use_gpu = use_gpu

    def run(self, spec: TrainSpec) -> dict[str, Any]:
        from pyspark.ml.torch.distributor import TorchDistributor

        try:
            return TorchDistributor(num_processes=self.num_processes, local_mode=False,
                                    use_gpu=self.use_gpu).run(_torch_entry, spec)
        except Exception as e:
            raise TrainingFailed(_worker_message(e)) from e


def _raise_worker_errors(results: list[dict[str, Any]]) -> None:
    errors = [r for r in results if "error" in r]
    if not errors:
        return
    # The rank that failed first has its own error; the others only saw horovod shut down.
    own = [r for r in errors if "shut down" not in r["error"]] or errors
    first = min(own, key=lambda r: r["rank"])
    others = ", ".join(str(r["rank"]) for r in errors if r is not first)
    raise TrainingFailed(first["error"] + (f"\n(ranks {others} stopped because of it)" if others else ""))


def _worker_message(e: Exception) -> str:
    text = str(e)
    marker = "worker rank "
    if marker in text:  # surface the failing worker's own line first
        start = text.index(marker)
        return text[start:].split("\n")[0] + "\n(full error below)\n" + text
    return f"distributed training failed: {type(e).__name__}: {text}"


def make_backend(name: str, spark: "SparkSession | None", num_processes: int, use_gpu: bool = False):
    if name == "local":
        return LocalBackend()
    if spark is None:
        raise TrainingFailed(f"train.backend={name} runs on Spark executors and needs a SparkSession")
    if name == "horovod":
        return HorovodBackend(spark, num_processes)
    if name == "torch":
        return TorchBackend(spark, num_processes, use_gpu)
    raise ValueError(f"train.backend={name!r}: choose horovod, torch or local")

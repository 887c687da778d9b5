"""Training backends: how the same ``train_worker`` is run on N workers.

- ``horovod``: Horovod over Gloo on CPU (NCCL on GPU): ``horovod.spark.run``
  on the Spark executors, or local processes (``train.launcher=processes``:
  Horovod's rendezvous without horovodrun or Spark).
- ``torch``: torch.distributed, through ``TorchDistributor`` on Spark or as
  local processes (``train.launcher=processes``).
- ``local``: one worker in this process (tests, laptops without horovod).

Every backend runs the same loop and the same gradient exchange
(exchange.py); only the collective under it differs (collective.py). Local
processes start once and serve run after run (pool.py). Each backend returns
rank 0's result; a worker's exception fails the run with the worker's rank
and error in the message.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .spec import TrainSpec
from .workers import TrainingFailed, guarded, horovod_entry, torch_entry

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["TrainingFailed", "LocalBackend", "HorovodBackend", "TorchBackend", "make_backend"]


class LocalBackend:
    name = "local"
    num_processes = 1

    def run(self, spec: TrainSpec) -> dict[str, Any]:
        import time

        from .collective import LocalCollective

        return guarded(spec, LocalCollective(), {"entered_at": time.time(), "group": 0.0})


def _run_on_pool(kind: str, num_processes: int, spec: TrainSpec, use_gpu: bool, timeout_s: float,
                 keep_warm: bool) -> dict[str, Any]:
    from .pool import WorkerPool, shared_pool

    pool = shared_pool(kind, num_processes, use_gpu) if keep_warm else WorkerPool(kind, num_processes, use_gpu)
    pool.timeout_s = timeout_s
    try:
        results = pool.run(spec)
    finally:
        if not keep_warm:
            pool.close()
    _raise_worker_errors(results)
    return results[0]


class _DistributedBackend:
    """What the Horovod and torch backends share: ranks on the executors (a
    SparkSession) or as local processes started once and kept warm."""

    name = "?"

    def __init__(self, spark: "SparkSession | None", num_processes: int, use_gpu: bool = False,
                 timeout_s: float = 24 * 3600, keep_warm: bool = True):
        self.spark = spark
        self.num_processes = num_processes
        self.use_gpu = use_gpu
        self.timeout_s = timeout_s
        self.keep_warm = keep_warm

    def start(self) -> None:
        """Local processes only (no SparkSession, kept warm): start them now, so
        they import, join their group and warm up while the caller does other
        work (a night's Spark stages, say) instead of when the first run comes."""
        if self.spark is None and self.keep_warm:
            from .pool import shared_pool

            shared_pool(self.name, self.num_processes, self.use_gpu).ensure_started()


class HorovodBackend(_DistributedBackend):
    """Horovod. With a SparkSession the ranks run on the executors through
    ``horovod.spark.run``; without one (``train.launcher=processes``) they are
    local processes that start once (pool.py)."""

    name = "horovod"

    def run(self, spec: TrainSpec) -> dict[str, Any]:
        try:
            import horovod.torch  # noqa: F401 - fail here, with what to do, not in every worker
        except ImportError as e:
            raise TrainingFailed(
                f"train.backend=horovod but horovod is not importable ({e}); build it with "
                "lib/bootstrap_env.sh or set train.backend=torch"
            ) from None
        if self.spark is None:
            return _run_on_pool("horovod", self.num_processes, spec, self.use_gpu or spec.use_gpu, self.timeout_s,
                                self.keep_warm)
        import horovod.spark

        # env=None: workers inherit this environment (a partial env breaks their launch).
        try:
            results = horovod.spark.run(horovod_entry, args=(spec,), num_proc=self.num_processes,
                                        use_gloo=True, use_mpi=False,
                                        verbose=int(os.environ.get("DELTAREC_HOROVOD_VERBOSE", "0")))
        except Exception as e:
            raise TrainingFailed(_worker_message(e)) from e
        _raise_worker_errors(results)
        return results[0]


class TorchBackend(_DistributedBackend):
    """torch.distributed. With a SparkSession the ranks run on the executors
    through TorchDistributor; without one (``train.launcher=processes``) they
    are local processes that start once (pool.py)."""

    name = "torch"

    def run(self, spec: TrainSpec) -> dict[str, Any]:
        if self.spark is None:
            return _run_on_pool("torch", self.num_processes, spec, self.use_gpu or spec.use_gpu, self.timeout_s,
                                self.keep_warm)
        from pyspark.ml.torch.distributor import TorchDistributor

        try:
            return TorchDistributor(num_processes=self.num_processes, local_mode=False,
                                    use_gpu=self.use_gpu).run(torch_entry, spec)
        except Exception as e:
            raise TrainingFailed(_worker_message(e)) from e


_SECONDARY = ("shut down", "did not complete in", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _raise_worker_errors(results: list[dict[str, Any]]) -> None:
    errors = [r for r in results if "error" in r]
    if not errors:
        return
    # The rank that failed first has its own error; the others only saw the
    # collective break under them (horovod shut down, gloo lost its peer).
    own = [r for r in errors if not any(m in r["error"].split("\n")[0] for m in _SECONDARY)] or errors
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


def make_backend(name: str, spark: "SparkSession | None", num_processes: int, use_gpu: bool = False,
                 launcher: str = "spark"):
    """``launcher``: ``spark`` runs the ranks on the executors, ``processes`` as
    local processes kept warm between runs of this driver (started here, so
    they get ready while the caller goes on)."""
    if name == "local":
        return LocalBackend()
    if name not in ("horovod", "torch"):
        raise ValueError(f"train.backend={name!r}: choose horovod, torch or local")
    if launcher not in ("spark", "processes"):
        raise ValueError(f"train.launcher={launcher!r}: choose spark or processes")
    cls = HorovodBackend if name == "horovod" else TorchBackend
    if launcher == "processes":
        backend = cls(None, num_processes, use_gpu)
        backend.start()
        return backend
    if spark is None:
        raise TrainingFailed(f"train.backend={name} runs on Spark executors and needs a SparkSession "
                             "(or set train.launcher=processes)")
    return cls(spark, num_processes, use_gpu)

"""Where a training rank runs: host, process, Spark executor, and the deltarec
code it imported.

Recorded in each rank's entry of a run's ``metrics.train.ranks`` so a run
summary shows that the ranks really ran in different executors, and from the
code Spark shipped (``--py-files``) rather than a copy that only happens to be
installed on the machine. A rank of ``horovod.spark.run`` or
``TorchDistributor`` is a child process of a Spark Python worker, which is a
child of the executor's JVM: the JVM's command line names the executor
(``CoarseGrainedExecutorBackend --executor-id N``). Linux ``/proc`` only;
elsewhere the executor fields are None.
"""
from __future__ import annotations

import os
import socket
from typing import Any

EXECUTOR_MAIN = "org.apache.spark.executor.CoarseGrainedExecutorBackend"
DRIVER_MAIN = "org.apache.spark.deploy.SparkSubmit"


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def spark_jvm() -> tuple[str | None, int | None]:
    """(executor id, pid) of the Spark JVM this process descends from:
    ``"driver"`` for the driver's JVM (local mode), (None, None) outside Spark."""
    pid = os.getpid()
    for _ in range(32):  # rank -> launcher -> Python worker -> daemon -> JVM: a few levels
        pid = _parent(pid)
        if not pid or pid <= 1:
            return None, None
        args = _cmdline(pid)
        if EXECUTOR_MAIN in args:
            i = args.index("--executor-id") if "--executor-id" in args else -1
            return (args[i + 1] if 0 <= i < len(args) - 1 else "?"), pid
        if DRIVER_MAIN in args:
            return "driver", pid
    return None, None


def worker_placement() -> dict[str, Any]:
    """This process's host, pid, Spark executor (id and JVM pid) and the path
    deltarec was imported from."""
    import deltarec

    executor, jvm = spark_jvm()
    return {"host": socket.gethostname(), "pid": os.getpid(), "executor_id": executor, "executor_pid": jvm,
            "code": os.path.dirname(deltarec.__file__)}

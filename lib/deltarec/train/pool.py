"""Local worker processes that start once and train run after run
(``train.launcher=processes``, for torch and for Horovod).

A night on one machine used to pay, before its first step, a new process per
rank (the interpreter, importing torch and the project: 2-5 s on a loaded
2-core machine) and a new process group, for a few seconds of steps. A pool
pays that once per driver process: its ranks join their group at start, then
wait for specs; every later run only reads its shard, builds the model,
steps and saves. ``shared_pool`` keeps one pool per (backend, world size,
GPU) for the life of the driver, so the nights of one ``deltarec`` process
share it.

Horovod's ranks meet through Horovod's own Gloo rendezvous server, started
here with the environment ``horovodrun`` would set (no ``horovodrun``, no
Spark); torch's through ``MASTER_ADDR``/``MASTER_PORT``.

A run that fails on any rank leaves the group in an unknown state (a peer may
be waiting in a collective), so the pool is then shut down and the next run
starts a fresh one. Workers poll their parent and exit when it is gone. Their
environment is the driver's when the pool started: a variable set later does
not reach them.
"""
from __future__ import annotations

import atexit
import os
import queue
import socket
import threading
import time
from typing import Any, Callable

from .spec import TrainSpec
from .workers import TrainingFailed, entry_phases, guarded, warm_up

KINDS = ("torch", "horovod")

# An idle pool of Horovod ranks is not free: each rank's background thread
# negotiates every HOROVOD_CYCLE_TIME (0.1 ms here, workers.join_horovod), so
# two idle ranks kept one of this 2-core machine's cores busy (measured: 10 s
# of CPU per 10 s, for as long as the driver lived). Such a pool closes after
# this many idle seconds; the next run starts it again. Torch ranks wait in a
# queue at no cost and stay.
IDLE_CLOSE_S = {"horovod": 60.0, "torch": None}
_BY_KIND = object()  # WorkerPool(idle_close_s=...) not given: IDLE_CLOSE_S[kind]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_env(kind: str, world: int) -> tuple[list[dict[str, str]], Callable[[], None]]:
    """The environment each of ``world`` local ranks needs to join a ``kind``
    group, and a function that stops what this started (Horovod's
    rendezvous server; nothing for torch)."""
    if kind == "torch":
        port = str(_free_port())
        return [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": str(world),
                 "LOCAL_RANK": str(r)} for r in range(world)], lambda: None
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    plan = get_host_assignments(parse_hosts(f"localhost:{world}"), world)
    server = RendezvousServer()
    port = server.start()
    server.init(plan)
    common = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
              "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "lo",
              "HOROVOD_HOSTNAME": "localhost"}
    return [{**common, "HOROVOD_RANK": str(s.rank), "HOROVOD_SIZE": str(s.size),
             "HOROVOD_LOCAL_RANK": str(s.local_rank), "HOROVOD_LOCAL_SIZE": str(s.local_size),
             "HOROVOD_CROSS_RANK": str(s.cross_rank), "HOROVOD_CROSS_SIZE": str(s.cross_size)}
            for s in plan], server.stop


def _join(kind: str, use_gpu: bool):
    from .workers import join_horovod, join_torch

    return join_horovod(use_gpu) if kind == "horovod" else join_torch(use_gpu)


def _leave(kind: str) -> None:
    from .workers import leave_horovod, leave_torch

    leave_horovod() if kind == "horovod" else leave_torch()


def _worker_main(kind: str, rank: int, env: dict[str, str], use_gpu: bool, inbox, outbox) -> None:
    """One rank: join the group once, then train every spec that arrives
    until a None (or the parent's exit); report each result or error."""
    entered = time.time()
    os.environ.update(env)
    parent = os.getppid()
    try:
        t = time.perf_counter()
        collective = _join(kind, use_gpu)
        phases = entry_phases(entered, time.perf_counter() - t)
        t = time.perf_counter()
        warm_up()  # while no spec is here yet, if the driver started the pool early
        phases["warm_up"] = time.perf_counter() - t
    except BaseException as e:  # noqa: BLE001 - e.g. the group failing to form
        outbox.put((rank, {"error": f"worker rank {rank} ({kind}) could not join its group: "
                                    f"{type(e).__name__}: {e}", "rank": rank}))
        return
    try:
        while True:
            try:
                spec = inbox.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the driver is gone: nobody will send a spec
                    return
                continue
            if spec is None:
                return
            phases.setdefault("entered_at", time.time())
            try:
                outbox.put((rank, guarded(spec, collective, phases)))
            except TrainingFailed as e:
                outbox.put((rank, {"error": str(e), "rank": rank}))
                return  # the group may be broken: the driver starts a fresh pool
            phases = {"group": 0.0}  # a warm run: the process, its imports and its group are paid
    finally:
        _leave(kind)


class WorkerPool:
    """``world`` local ranks of ``kind`` (torch or horovod) that start once."""

    def __init__(self, kind: str, world: int, use_gpu: bool = False, timeout_s: float = 24 * 3600,
                 idle_close_s: Any = _BY_KIND):
        if kind not in KINDS:
            raise ValueError(f"worker pool kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.kind, self.world, self.use_gpu, self.timeout_s = kind, world, use_gpu, timeout_s
        self.idle_close_s: float | None = IDLE_CLOSE_S[kind] if idle_close_s is _BY_KIND else idle_close_s
        self.procs: list = []
        self.runs = 0  # runs served: 0 means the next one pays the start
        self._release = None
        self._lock = threading.RLock()  # run / close against the idle timer
        self._idle_timer: threading.Timer | None = None

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch/Spark threads exist is unsafe
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(self.world)]
        envs, self._release = group_env(self.kind, self.world)
        self.procs = [ctx.Process(target=_worker_main, args=(self.kind, r, env, self.use_gpu, self.inboxes[r],
                                                             self.results),
                                  name=f"deltarec-{self.kind}-rank{r}", daemon=True)
                      for r, env in enumerate(envs)]
        for p in self.procs:
            p.start()
        self.runs = 0

    def ensure_started(self) -> None:
        """Start the ranks unless they are running; returns at once (they
        import, join their group and warm up in the background)."""
        with self._lock:
            self._cancel_idle_close()
            self._start_unless_alive()
            self._schedule_idle_close()

    def _start_unless_alive(self) -> None:
        if not self.alive:
            self.close()
            self.start()

    def _cancel_idle_close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _schedule_idle_close(self) -> None:
        if self.idle_close_s is not None and self.procs:
            self._idle_timer = threading.Timer(self.idle_close_s, self._close_if_idle)
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _close_if_idle(self) -> None:
        # blocks while a run holds the lock; a run that started meanwhile cancelled this timer
        with self._lock:
            if self._idle_timer is threading.current_thread():
                self._idle_timer = None
                self.close()

    def run(self, spec: TrainSpec) -> list[dict[str, Any]]:
        """Every rank's result (or ``{"error", "rank"}``), in rank order. A
        failure on any rank shuts the pool down."""
        with self._lock:
            self._cancel_idle_close()
            try:
                return self._run(spec)
            finally:
                self._schedule_idle_close()

    def _run(self, spec: TrainSpec) -> list[dict[str, Any]]:
        self._start_unless_alive()
        for box in self.inboxes:
            box.put(spec)
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.timeout_s
        try:
            while len(got) < self.world:
                try:
                    rank, res = self.results.get(timeout=1.0)
                    got[rank] = res
                    if "error" in res:
                        # let the others notice the broken group, then stop
                        deadline = min(deadline, time.monotonic() + 10)
                    continue
                except queue.Empty:
                    pass
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in got]
                if dead or time.monotonic() > deadline:
                    why = (f"rank {dead[0]} exited with code {self.procs[dead[0]].exitcode} without a result"
                           if dead else f"no result after {self.timeout_s:.0f} s")
                    errs = [v for v in got.values() if "error" in v]
                    if errs:
                        break
                    raise TrainingFailed(f"{self.kind} local-process training failed: {why}")
        except BaseException:
            self.close()
            raise
        self.runs += 1
        if any("error" in v for v in got.values()):
            self.close()
        return [got[r] for r in sorted(got)]

    def close(self) -> None:
        self._cancel_idle_close()
        for p, box in zip(self.procs, getattr(self, "inboxes", [])):
            if p.is_alive():
                box.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
        if self._release is not None:
            self._release()
            self._release = None


_POOLS: dict[tuple[str, int, bool], WorkerPool] = {}


def shared_pool(kind: str, world: int, use_gpu: bool = False) -> WorkerPool:
    """The driver's pool for (kind, world, use_gpu), created on first use and
    kept for the next runs."""
    key = (kind, world, use_gpu)
    if key not in _POOLS:
        _POOLS[key] = WorkerPool(kind, world, use_gpu)
    return _POOLS[key]


def close_pools() -> None:
    """Stop every shared pool's workers (also done at interpreter exit)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(close_pools)

"""A Horovod collective whose peer never joins it fails after the spec's
``collective_timeout_s`` with an error naming the wait, instead of spinning
for ever (real Horovod ranks over Gloo, two local processes)."""
import multiprocessing as mp
import os
import time

import pytest

pytest.importorskip("horovod.torch")


def _rank(env: dict, timeout_s: float, out) -> None:
    os.environ.update(env)
    import torch

    from deltarec.train.workers import join_horovod, leave_horovod

    collective = join_horovod(False)
    collective.timeout_s = timeout_s
    try:
        if collective.rank == 0:
            t0 = time.monotonic()
            try:
                collective.allgather(torch.ones(3))
                out.put((0, "completed", time.monotonic() - t0))
            except RuntimeError as e:
                out.put((0, str(e), time.monotonic() - t0))
        else:
            time.sleep(timeout_s + 3)  # alive, in the group, never joining rank 0's allgather
            out.put((1, "slept", 0.0))
    finally:
        leave_horovod()


def test_a_collective_whose_peer_never_comes_fails_after_the_timeout():
    from deltarec.train.pool import group_env

    envs, stop = group_env("horovod", 2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(env, 3.0, out), daemon=True) for env in envs]
    try:
        for p in procs:
            p.start()
        got = {}
        for _ in procs:
            rank, what, seconds = out.get(timeout=120)
            got[rank] = (what, seconds)
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        stop()
    what, seconds = got[0]
    assert what.startswith("horovod allgather did not complete in 3 s on rank 0/2"), what
    assert 3.0 <= seconds < 30

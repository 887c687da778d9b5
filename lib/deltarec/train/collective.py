"""Collectives: what the training loop needs from a distributed backend.

The loop, the gradient exchange (exchange.py), model and checkpoint code
receive one of these and never import horovod or torch.distributed
themselves. Each offers the same few operations:

- ``allgather(t)``: every rank's 1-D tensor, in rank order (lengths may differ);
- ``allreduce_mean(t)``; ``allgather_object(obj)``;
- ``broadcast_state(model, optimizer)``: rank 0's weights and optimizer state
  to every rank; ``barrier()``.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from .spec import load_optimizer_state


class LocalCollective:
    """One worker: everything is the identity."""

    rank, size, local_rank = 0, 1, 0
    name = "local"

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allgather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_state(self, model, optimizer) -> None:
        pass

    def barrier(self) -> None:
        pass


class TorchCollective:
    """torch.distributed (gloo on CPU, nccl on GPU); the process group must be initialised."""

    name = "torch"

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.backend = str(dist.get_backend())  # gloo | nccl
        self._capacity = 0  # allgather's buffer size: the same on every rank

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t / self.size

    def allgather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """all_gather takes equal shapes, so every rank sends a buffer of the
        same capacity with its length in front; a step's payloads change little,
        so one collective suffices unless some rank's outgrew the capacity (all
        ranks see that in the lengths and send again at a capacity that every
        rank derives from the same lengths)."""
        if t.element_size() > 8:
            raise TypeError(f"allgather: {t.dtype} elements are wider than the 8-byte length it carries")
        k = 8 // t.element_size()  # elements per int64 length
        n = t.numel()
        buf = t.new_zeros(k + self._capacity)
        buf[:k] = torch.tensor([n], dtype=torch.long, device=t.device).view(t.dtype)
        if n <= self._capacity:
            buf[k:k + n] = t
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        self.dist.all_gather(parts, buf)
        lengths = torch.stack([p[:k] for p in parts]).view(torch.long).reshape(-1).tolist()
        if max(lengths) <= self._capacity:
            return [p[k:k + m] for p, m in zip(parts, lengths)]
        self._capacity = max(lengths) + max(lengths) // 4  # room for the next steps' growth
        padded = t.new_zeros(max(lengths))
        padded[:n] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.dist.all_gather(parts, padded)
        return [p[:m] for p, m in zip(parts, lengths)]

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_state(self, model, optimizer) -> None:
        for t in model.state_dict().values():
            self.dist.broadcast(t, src=0)
        # Optimizer state may be empty on fresh ranks: ship it whole from rank 0.
        state = [optimizer.state_dict() if self.rank == 0 else None]
        self.dist.broadcast_object_list(state, src=0)
        if self.rank != 0:
            load_optimizer_state(optimizer, state[0])

    def barrier(self) -> None:
        self.dist.barrier()


class HorovodCollective:
    """Horovod (Gloo on CPU, NCCL on GPU); ``hvd`` is ``horovod.torch``, initialised."""

    name = "horovod"

    def __init__(self, hvd, timeout_s: float = 600.0):
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.timeout_s = timeout_s  # TrainSpec.collective_timeout_s, set by the worker

    def _wait(self, handle, what: str):
        """``hvd.synchronize(handle)`` that cannot spin forever. When a peer
        rank fails and shuts Horovod down, this rank's pending collective
        normally fails with "Horovod has been shut down"; but when the peer's
        shutdown races this rank's enqueue, Horovod's background thread can
        stop with the handle never completed, and ``synchronize`` then spins
        on it at 100 % CPU for ever (seen: 10 min in the test suite, a rank
        whose peer had exited). Polling with a deadline turns that into an
        error that names the wait."""
        deadline = time.monotonic() + self.timeout_s
        pause = 0.0
        while not self.hvd.poll(handle):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"horovod {what} did not complete in {self.timeout_s:.0f} s on rank {self.rank}/{self.size}: "
                    "a peer rank stopped or hung (its own error comes first); raise "
                    "train.collective_timeout_s if a rank legitimately waits longer")
            time.sleep(pause)
            pause = min(0.005, pause + 0.0001)  # a step's collective takes ms: start by yielding only
        return self.hvd.synchronize(handle)

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        handle = self.hvd.allreduce_async(t, op=self.hvd.Average, name="deltarec.allreduce_mean")
        return self._wait(handle, "allreduce")

    def allgather(self, t: torch.Tensor) -> list[torch.Tensor]:
        # Horovod's allgather takes tensors of different lengths and concatenates
        # them; the lengths ride in the same grouped call (one negotiation) to
        # split the result again. A length is an int64 carried bit for bit.
        if t.element_size() > 8:
            raise TypeError(f"allgather: {t.dtype} elements are wider than the 8-byte length it carries")
        length = torch.tensor([t.numel()], dtype=torch.long, device=t.device).view(t.dtype)
        handle = self.hvd.grouped_allgather_async([length, t], name="deltarec.allgather")
        lengths, flat = self._wait(handle, "allgather")
        return list(torch.split(flat, lengths.clone().view(torch.long).tolist()))

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.hvd.allgather_object(obj, name="deltarec.allgather_object")

    def broadcast_state(self, model, optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # An explicit name: horovod's default is the object's type name, which
        # differs between rank 0 (dict) and the others (None) and deadlocks.
        state = self.hvd.broadcast_object(optimizer.state_dict() if self.rank == 0 else None, root_rank=0,
                                          name="deltarec.optimizer_state")
        if self.rank != 0:
            load_optimizer_state(optimizer, state)

    def barrier(self) -> None:
        self.hvd.barrier()

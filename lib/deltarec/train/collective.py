"""Collectives: what the training loop needs from a distributed backend.

The loop, model and checkpoint code receive one of these and never import
horovod or torch.distributed themselves. Every implementation averages
gradients across workers in ``DistributedOptimizer.synchronize``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch


class _AveragingOptimizer:
    """Wraps an optimizer: ``step`` first averages gradients over the workers.

    Same surface as ``hvd.DistributedOptimizer`` for what the loop uses:
    ``synchronize()`` (average now, e.g. before clipping) and
    ``skip_synchronize()`` (step without averaging again).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], allreduce_mean):
        self._opt = optimizer
        self._params = params
        self._allreduce_mean = allreduce_mean
        self._synced = False

    def __getattr__(self, name):  # param_groups, state, state_dict, ...
        return getattr(self._opt, name)

    def zero_grad(self, set_to_none: bool = True):
        self._opt.zero_grad(set_to_none=set_to_none)
        self._synced = False

    def synchronize(self):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self._allreduce_mean(flat)
        offset = 0
        for p, g in zip(self._params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        self._synced = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._synced = True
        yield

    def step(self, closure=None):
        if not self._synced:
            self.synchronize()
        out = self._opt.step(closure)
        self._synced = False
        return out


class LocalCollective:
    """One worker: everything is the identity."""

    rank, size, local_rank = 0, 1, 0
    name = "local"

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_state(self, model, optimizer) -> None:
        pass

    def distributed_optimizer(self, optimizer, model, backward_passes_per_step: int = 1):
        return _AveragingOptimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lambda t: t)

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
        import os

        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t / self.size

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
            optimizer.load_state_dict(state[0])

    def distributed_optimizer(self, optimizer, model, backward_passes_per_step: int = 1):
        # Gradients accumulate locally over the micro-batches; one allreduce per step.
        return _AveragingOptimizer(optimizer, [p for p in model.parameters() if p.requires_grad],
                                   self.allreduce_mean)

    def barrier(self) -> None:
        self.dist.barrier()


class HorovodCollective:
    """Horovod (Gloo on CPU, NCCL on GPU); ``hvd`` is ``horovod.torch``, initialised."""

    name = "horovod"

    def __init__(self, hvd):
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Average)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.hvd.allgather_object(obj, name="deltarec.allgather_object")

    def broadcast_state(self, model, optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # An explicit name: horovod's default is the object's type name, which
        # differs between rank 0 (dict) and the others (None) and deadlocks.
        state = self.hvd.broadcast_object(optimizer.state_dict() if self.rank == 0 else None, root_rank=0,
                                          name="deltarec.optimizer_state")
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def distributed_optimizer(self, optimizer, model, backward_passes_per_step: int = 1):
        return self.hvd.DistributedOptimizer(
            optimizer, named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
            op=self.hvd.Average, backward_passes_per_step=backward_passes_per_step,
        )

    def barrier(self) -> None:
        self.hvd.barrier()

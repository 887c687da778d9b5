"""Collectives: what the training loop needs from a distributed backend.

The loop, model and checkpoint code receive one of these and never import
horovod or torch.distributed themselves. Every implementation averages
gradients across workers in ``DistributedOptimizer.synchronize``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch


def sparse_embedding_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Switch the model's trainable embedding tables to sparse gradients and
    return their weights.

    A batch touches a few hundred rows of tables with tens of thousands, so
    exchanging (row index, row gradient) pairs instead of the dense table
    gradient cuts the bytes sent per step by orders of magnitude. Averaging is
    unchanged: the gathered rows are summed into a dense gradient (rows nobody
    touched stay zero) before the optimizer steps, exactly as after a dense
    allreduce.
    """
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad and m.max_norm is None:
            m.sparse = True  # read by forward(): F.embedding(..., sparse=self.sparse)
            out.append(m.weight)
    return out


def densify_grads(params) -> None:
    """Sparse gradients → dense (duplicates summed): optimizers like Adam only take dense ones."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


class _SyncThenStep:
    """The surface of ``hvd.DistributedOptimizer`` the loop uses:
    ``synchronize()`` (average now, e.g. before clipping),
    ``skip_synchronize()`` (step without averaging again) and ``step()``
    (synchronize unless already done, then ``_apply``). Subclasses set ``_opt``
    and implement ``synchronize`` and ``_apply``."""

    _opt = None
    _synced = False

    def __getattr__(self, name):  # param_groups, state, state_dict, ...
        return getattr(self._opt, name)

    def zero_grad(self, set_to_none: bool = True):
        self._zero_grad(set_to_none)
        self._synced = False

    def _zero_grad(self, set_to_none: bool) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._synced = True
        yield

    def step(self, closure=None):
        if not self._synced:
            self.synchronize()
        out = self._apply(closure)
        self._synced = False
        return out


class _AveragingOptimizer(_SyncThenStep):
    """Wraps an optimizer: ``step`` first averages gradients over the workers."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], allreduce_mean,
                 sparse: list[torch.nn.Parameter] = (), allgather=None, size: int = 1):
        self._opt = optimizer
        sparse_ids = {id(p) for p in sparse}
        self._sparse = [p for p in params if id(p) in sparse_ids]
        self._params = [p for p in params if id(p) not in sparse_ids]
        self._allreduce_mean = allreduce_mean
        self._allgather = allgather  # concatenates each rank's tensor along dim 0
        self._size = size

    def synchronize(self):
        dense = list(self._params)
        if self._sparse and self._size > 1:
            # A table whose gradient is dense on any rank (a penalty over the whole
            # table) goes through the dense allreduce on every rank: the ranks
            # must issue the same collectives in the same order.
            flags = torch.tensor([float(p.grad is not None and not p.grad.is_sparse) for p in self._sparse])
            flags = self._allreduce_mean(flags)
            for p, f in zip(self._sparse, flags.tolist()):
                if f > 0:
                    dense.append(p)
                    continue
                g = p.grad.coalesce() if p.grad is not None else None
                rows = g.indices()[0] if g is not None else torch.zeros(0, dtype=torch.long, device=p.device)
                vals = g.values() if g is not None else p.new_zeros((0, *p.shape[1:]))
                rows, vals = self._allgather(rows.contiguous()), self._allgather(vals.contiguous())
                p.grad = torch.zeros_like(p).index_add_(0, rows, vals).div_(self._size)
        else:
            densify_grads(self._sparse)
            dense += self._sparse
        densify_grads(dense)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self._allreduce_mean(flat)
            offset = 0
            for p, g in zip(dense, grads):
                n = g.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone()
                offset += n
        self._synced = True

    def _apply(self, closure):
        return self._opt.step(closure)


class _DensifyAfterSync(_SyncThenStep):
    """hvd.DistributedOptimizer whose averaged sparse gradients are made dense
    before the wrapped optimizer (Adam, ...) steps."""

    def __init__(self, inner, sparse: list[torch.nn.Parameter]):
        self._opt = inner
        self._sparse = sparse

    def _zero_grad(self, set_to_none: bool) -> None:
        self._opt.zero_grad()  # horovod's takes no argument

    def synchronize(self):
        self._opt.synchronize()
        densify_grads(self._sparse)
        self._synced = True

    def _apply(self, closure):
        with self._opt.skip_synchronize():
            return self._opt.step(closure)


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
        return _AveragingOptimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lambda t: t,
                                   sparse=sparse_embedding_params(model))

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
                                   self.allreduce_mean, sparse=sparse_embedding_params(model),
                                   allgather=self.allgather, size=self.size)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Each rank's tensor concatenated along dim 0 (lengths may differ)."""
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        self.dist.all_gather(sizes, n)
        sizes = [int(x) for x in sizes]
        longest = max(sizes)
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.dist.all_gather(parts, padded)
        return torch.cat([x[:k] for x, k in zip(parts, sizes)])

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
        # Sparse embedding gradients go through horovod's allgather-based sparse
        # allreduce (hooks fire during backward, overlapping communication).
        sparse = sparse_embedding_params(model)
        inner = self.hvd.DistributedOptimizer(
            optimizer, named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
            op=self.hvd.Average, backward_passes_per_step=backward_passes_per_step,
        )
        return _DensifyAfterSync(inner, sparse) if sparse else inner

    def barrier(self) -> None:
        self.hvd.barrier()

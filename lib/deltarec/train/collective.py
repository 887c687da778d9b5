"""Collectives: what the training loop needs from a distributed backend.

The loop, model and checkpoint code receive one of these and never import
horovod or torch.distributed themselves. Every implementation averages
gradients across workers in ``DistributedOptimizer.synchronize``.
"""
from __future__ import annotations

import contextlib
import math
import time
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
    """Wraps an optimizer: ``step`` first averages gradients over the workers.

    Per step it issues two collectives whatever the model: a small header
    (each rank's sparse row counts, and which tables have a dense gradient)
    and one gather of a flat payload holding every sparse table's rows and
    row gradients and, when small, the dense gradients too. Each collective
    costs a fixed latency that dwarfs the bytes at these sizes, so one per
    table and kind (as before) left the workers waiting most of the step.
    Every rank sums the gathered parts in rank order, so all ranks end with
    the same averaged gradient.
    """

    # Dense gradients ride in the gather while what each rank receives beyond
    # an allreduce stays small; larger models get their own allreduce.
    FOLD_LIMIT = 1 << 20

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], collective,
                 sparse: list[torch.nn.Parameter] = ()):
        from .optim import keeps_sparse

        self._opt = optimizer
        # Optimizers that update only the rows named (optim.py) get the averaged
        # sparse gradient as it is; the others get it made dense.
        self._keep_sparse = keeps_sparse(optimizer)
        sparse_ids = {id(p) for p in sparse}
        self._sparse = [p for p in params if id(p) in sparse_ids]
        self._params = [p for p in params if id(p) not in sparse_ids]
        self._c = collective

    sync_seconds = 0.0  # time in synchronize: the exchange and waiting for the other ranks

    def synchronize(self):
        t0 = time.perf_counter()
        try:
            self._synchronize()
        finally:
            self.sync_seconds += time.perf_counter() - t0

    def _synchronize(self):
        size = self._c.size
        if size == 1:
            if not self._keep_sparse:
                densify_grads(self._sparse)
            self._synced = True
            return
        T = len(self._sparse)
        local = []  # per sparse table: (rows, values), or None where its gradient is dense
        for p in self._sparse:
            g = p.grad
            if g is None:
                local.append((torch.zeros(0, dtype=torch.long, device=p.device), p.new_zeros((0, *p.shape[1:]))))
            elif g.is_sparse:
                g = g.coalesce()
                local.append((g.indices()[0], g.values()))
            else:  # a penalty over the whole table made it dense on this rank
                local.append(None)
        ref = (self._params or self._sparse)[0]
        head = torch.tensor([float(x is None) for x in local] + [0 if x is None else x[0].numel() for x in local],
                            dtype=torch.long, device=ref.device)
        heads = torch.stack(self._c.gather_equal(head)).cpu() if T else torch.zeros((size, 0), dtype=torch.long)
        dense_anywhere = heads[:, :T].amax(0).tolist()
        nnz = heads[:, T:].tolist()  # [rank][table]
        # A table dense on any rank is averaged densely on every rank: the ranks
        # must agree on what each payload holds.
        dense = list(self._params) + [p for p, d in zip(self._sparse, dense_anywhere) if d]
        densify_grads(dense)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
        numel = sum(g.numel() for g in grads)
        fold = numel * (size - 1) <= self.FOLD_LIMIT
        dtype = ref.dtype
        k = 8 // torch.empty(0, dtype=dtype).element_size()  # payload elements per int64 row id
        kept = [t for t in range(T) if not dense_anywhere[t]]
        width = {t: math.prod(self._sparse[t].shape[1:]) for t in kept}
        parts = [local[t][0].contiguous().view(dtype) for t in kept]  # row ids, bit for bit
        parts += [local[t][1].reshape(-1).to(dtype) for t in kept]
        if fold and grads:
            parts += [g.reshape(-1).to(dtype) for g in grads]
        payload = torch.cat(parts) if parts else ref.new_zeros(0)
        lengths = [sum(n[t] * (k + width[t]) for t in kept) + (numel if fold else 0) for n in nnz]
        gathered = self._c.gather_varying(payload, lengths) if any(lengths) else [payload] * size
        rows = {t: [] for t in kept}
        vals = {t: [] for t in kept}
        dense_sum = None
        for r, buf in enumerate(gathered):
            o = 0
            for t in kept:
                n = nnz[r][t]
                rows[t].append(buf[o:o + n * k].clone().view(torch.long))
                o += n * k
            for t in kept:
                n = nnz[r][t]
                vals[t].append(buf[o:o + n * width[t]].view(n, *self._sparse[t].shape[1:]))
                o += n * width[t]
            if fold and grads:
                d = buf[o:o + numel]
                dense_sum = d.clone() if dense_sum is None else dense_sum.add_(d)
        for t in kept:
            p = self._sparse[t]
            r, v = torch.cat(rows[t]), torch.cat(vals[t]).to(p.dtype).div_(size)
            if self._keep_sparse:  # duplicates summed in rank order, as below
                p.grad = torch.sparse_coo_tensor(r.unsqueeze(0), v, p.shape).coalesce()
            else:
                p.grad = torch.zeros_like(p).index_add_(0, r, v)
        if grads:
            flat = dense_sum.div_(size) if fold else self._c.allreduce_mean(torch.cat([g.reshape(-1) for g in grads]))
            offset = 0
            for p, g in zip(dense, grads):
                n = g.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
                offset += n
        self._synced = True

    def _apply(self, closure):
        return self._opt.step(closure)


class _DensifyAfterSync(_SyncThenStep):
    """hvd.DistributedOptimizer whose averaged sparse gradients are made dense
    before the wrapped optimizer (Adam, ...) steps."""

    def __init__(self, inner, sparse: list[torch.nn.Parameter], keep_sparse: bool = False):
        self._opt = inner
        self._sparse = [] if keep_sparse else sparse  # nothing to densify for a row-wise optimizer

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
        return _AveragingOptimizer(optimizer, [p for p in model.parameters() if p.requires_grad], self,
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
        self.backend = str(dist.get_backend())  # gloo | nccl

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
        return _AveragingOptimizer(optimizer, [p for p in model.parameters() if p.requires_grad], self,
                                   sparse=sparse_embedding_params(model))

    def gather_equal(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (all the same shape), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(parts, t)
        return parts

    def gather_varying(self, t: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """Every rank's 1-D tensor, whose lengths all ranks already know."""
        padded = t.new_zeros(max(lengths))
        padded[:t.numel()] = t
        return [x[:n] for x, n in zip(self.gather_equal(padded), lengths)]

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
        from .optim import keeps_sparse

        return _DensifyAfterSync(inner, sparse, keeps_sparse(optimizer)) if sparse else inner

    def barrier(self) -> None:
        self.hvd.barrier()

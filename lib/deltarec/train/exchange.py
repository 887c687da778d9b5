"""Gradient averaging across workers, the same for every backend.

``GradientExchange.average()`` leaves on every rank the average over the
ranks of each trainable parameter's gradient. It needs only two things of a
collective (collective.py): ``allgather(tensor) -> [tensor of each rank]``
(1-D, lengths may differ) and ``allreduce_mean``; the loop passes the
collective in, so the step never knows whether Horovod or torch.distributed
carries the bytes.

Per step it issues one gather whatever the model: each rank packs a small
header (per embedding table: sparse or dense here, and how many rows) and then
every table's row ids, row gradients and, when small, the dense gradients
into one flat buffer. A collective costs a fixed latency that dwarfs the bytes
at these sizes, so one per table and kind (Horovod's sparse allreduce: two
allgathers per table) leaves the workers waiting most of the step. Each
rank's buffer describes itself, so no rank needs to know beforehand what the
others send. Every rank sums the gathered parts in rank order, so all ranks
end with the same averaged gradient.

Embedding tables exchange (row index, row gradient) pairs instead of the
dense table gradient: a batch touches a few hundred rows of tables with tens
of thousands, so that cuts the bytes per step by orders of magnitude. The
average is unchanged: the gathered rows are summed into a dense gradient (rows
nobody touched stay zero), or kept sparse for optimizers that update only the
rows named (optim.py).
"""
from __future__ import annotations

import math
import time

import torch

from .optim import keeps_sparse

DENSE, SPARSE = 1, 0  # per-table flag in the header


def sparse_embedding_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Switch the model's trainable embedding tables to sparse gradients and
    return their weights."""
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


class GradientExchange:
    """Averages the gradients of ``model``'s trainable parameters over the
    ranks of ``collective`` for ``optimizer`` (which decides whether embedding
    gradients stay sparse)."""

    # Dense gradients ride in the gather while what each rank receives beyond
    # an allreduce stays small; larger models get their own allreduce.
    FOLD_LIMIT = 1 << 20

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, collective):
        sparse = sparse_embedding_params(model)
        params = [p for p in model.parameters() if p.requires_grad]
        ids = {id(p) for p in sparse}
        self.tables = [p for p in params if id(p) in ids]
        self.dense = [p for p in params if id(p) not in ids]
        self.keep_sparse = keeps_sparse(optimizer)
        self.collective = collective
        self.seconds = 0.0  # in average(): packing, the exchange and waiting for the other ranks
        numel = sum(p.numel() for p in self.dense)
        self.fold = numel * (collective.size - 1) <= self.FOLD_LIMIT  # the same decision on every rank
        ref = (self.dense or self.tables or [torch.zeros(0)])[0]
        self.dtype, self.device = ref.dtype, ref.device
        self.k = 8 // torch.empty(0, dtype=self.dtype).element_size()  # payload elements per int64

    def average(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.collective.size == 1:
                if not self.keep_sparse:
                    densify_grads(self.tables)
            else:
                self._exchange()
        finally:
            self.seconds += time.perf_counter() - t0

    def _pack(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This rank's buffer: header, then per table its row ids or nothing,
        then row gradients or the dense table gradient, then (folded) the
        dense parameters' gradients. Also returns those dense gradients."""
        dtype, T = self.dtype, len(self.tables)
        kinds, counts, ids, values = [], [], [], []
        for p in self.tables:
            g = p.grad
            if g is None:
                kinds.append(SPARSE)
                counts.append(0)
            elif g.is_sparse:
                g = g.coalesce()
                kinds.append(SPARSE)
                counts.append(g.indices().shape[1])
                ids.append(g.indices()[0].contiguous().view(dtype))  # row ids, bit for bit
                values.append(g.values().reshape(-1).to(dtype))
            else:  # something used the whole table (a penalty, a full softmax): send it dense
                kinds.append(DENSE)
                counts.append(0)
                values.append(g.reshape(-1).to(dtype))
        header = torch.tensor(kinds + counts, dtype=torch.long, device=self.device).view(dtype) if T else None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        parts = ([header] if T else []) + ids + values
        if self.fold:
            parts += [g.reshape(-1).to(dtype) for g in grads]
        buf = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=self.device)
        return buf, grads

    def _exchange(self) -> None:
        size, T, k = self.collective.size, len(self.tables), self.k
        buf, grads = self._pack()
        gathered = self.collective.allgather(buf)
        rows: list[list[torch.Tensor]] = [[] for _ in range(T)]
        vals: list[list[torch.Tensor]] = [[] for _ in range(T)]
        dense_sum: list[torch.Tensor | None] = [None] * T  # tables some rank sent dense
        numel = sum(g.numel() for g in grads)
        folded = None
        for b in gathered:
            head = b[:2 * T * k].clone().view(torch.long).tolist() if T else []  # clone: an aligned copy
            kinds, counts = head[:T], head[T:]
            o = 2 * T * k
            for t in range(T):
                if kinds[t] == SPARSE:
                    rows[t].append(b[o:o + counts[t] * k].clone().view(torch.long))
                    o += counts[t] * k
            for t, p in enumerate(self.tables):
                if kinds[t] == SPARSE:
                    n = counts[t] * math.prod(p.shape[1:])
                    vals[t].append(b[o:o + n].view(counts[t], *p.shape[1:]))
                else:
                    n = p.numel()
                    d = b[o:o + n].view_as(p)
                    dense_sum[t] = d.clone() if dense_sum[t] is None else dense_sum[t].add_(d)
                o += n
            if self.fold and grads:
                d = b[o:o + numel]
                folded = d.clone() if folded is None else folded.add_(d)
        for t, p in enumerate(self.tables):
            r = torch.cat(rows[t]) if rows[t] else torch.zeros(0, dtype=torch.long, device=p.device)
            v = torch.cat(vals[t]).to(p.dtype) if vals[t] else p.new_zeros((0, *p.shape[1:]))
            if dense_sum[t] is not None:  # dense on some rank: the rows of the others add into it
                p.grad = dense_sum[t].to(p.dtype).index_add_(0, r, v).div_(size)
            elif self.keep_sparse:  # duplicates summed in rank order, as below
                p.grad = torch.sparse_coo_tensor(r.unsqueeze(0), v.div_(size), p.shape).coalesce()
            else:
                p.grad = torch.zeros_like(p).index_add_(0, r, v.div_(size))
        if grads:
            flat = folded.div_(size) if self.fold else \
                self.collective.allreduce_mean(torch.cat([g.reshape(-1) for g in grads]))
            offset = 0
            for p, g in zip(self.dense, grads):
                n = g.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
                offset += n

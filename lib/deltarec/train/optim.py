"""Optimizers that update only the embedding rows a batch touched.

A recommender's embedding tables have tens of thousands of rows and a batch
touches a few hundred. Dense Adam updates every row every step (its moments
decay everywhere), so its cost does not shrink when the batch is split over
workers: with two workers each still pays the whole table's update. These
keep an embedding table's gradient sparse through the optimizer step:

- ``lazy_adam``: Adam whose sparse gradients update only the named rows and
  their moments (TensorFlow's LazyAdam, torch's SparseAdam); dense gradients
  (the MLP, or a table under a penalty) get the plain Adam update. A row's
  moments wait while it is not seen, so it is not the same trajectory as
  dense Adam; it is the usual choice for large embedding tables.
- ``adagrad`` without weight decay is exact either way: a zero gradient
  leaves both its accumulator and the weight unchanged.
"""
from __future__ import annotations

import torch


class LazyAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LazyAdam: bad hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = float(st["step"])
                c1, c2 = 1 - b1 ** t, 1 - b2 ** t
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if g.is_sparse:
                    g = g.coalesce()
                    rows, gv = g.indices()[0], g.values()
                    if wd:
                        gv = gv + wd * p[rows]
                    mr = m[rows].mul_(b1).add_(gv, alpha=1 - b1)
                    vr = v[rows].mul_(b2).addcmul_(gv, gv, value=1 - b2)
                    m[rows], v[rows] = mr, vr
                    p.index_add_(0, rows, (mr / c1).div_((vr / c2).sqrt_().add_(eps)).mul_(-lr))
                else:
                    if wd:
                        g = g.add(p, alpha=wd)
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.addcdiv_(m / c1, (v / c2).sqrt_().add_(eps), value=-lr)
        return loss


def keeps_sparse(optimizer) -> bool:
    """Whether ``optimizer`` takes sparse embedding gradients as they are and
    gets the same result it would from the dense ones (or, LazyAdam, is
    meant for them)."""
    if isinstance(optimizer, LazyAdam):
        return True
    if isinstance(optimizer, torch.optim.Adagrad):
        return all(g.get("weight_decay", 0) == 0 for g in optimizer.param_groups)
    return False


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` that also takes sparse gradients (a sparse
    gradient's norm is its stored values' norm, once duplicates are summed)."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return float(total)

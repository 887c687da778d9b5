"""Forgetting control for nightly updates, each switched on by config and combinable:

- replay: a seeded sample of earlier runs' examples (older runs only, read from
  the lake as of a fixed table version) mixed into tonight's training files;
- proximal: ``λ Σ (θ - θ_parent)²`` keeps weights near the parent's;
- EWC: ``λ/2 Σ F (θ - θ_parent)²`` with the diagonal Fisher F computed at the
  end of the parent's training and saved with its checkpoint;
- distillation: per example, ``BCE(s, σ(t)) - BCE(t, σ(t))`` between the
  student's and the parent's logits (zero when they agree, positive otherwise).

Every penalty is zero at the parent's weights and grows away from them. Rows
a table gained tonight (new or re-assigned vocabulary ids) have no parent and
are not anchored (mask 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

FISHER_FILE = "fisher.safetensors"


@dataclass
class Anchor:
    """The parent's weights (grown to tonight's table sizes) and where they apply."""

    weights: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]  # 1.0 where the parent had this weight, else 0.0
    fisher: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, parent_rows: dict[str, int], fresh_rows: dict[str, list[int]],
           fisher: dict[str, torch.Tensor] | None = None) -> "Anchor":
        """Snapshot ``model`` right after its warm start. ``parent_rows``: the
        parent's row count of each grown parameter; ``fresh_rows``: rows
        (re)initialised tonight."""
        weights, mask = {}, {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            weights[n] = p.detach().clone()
            m = torch.ones_like(p)
            if n in parent_rows:
                m[parent_rows[n]:] = 0.0
            if fresh_rows.get(n):
                m[torch.tensor(fresh_rows[n], dtype=torch.long, device=m.device)] = 0.0
            mask[n] = m
        if fisher is not None:
            fisher = {n: _fit(fisher[n], weights[n]) * mask[n] for n in weights if n in fisher}
        return cls(weights, mask, fisher)


def _fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` padded with zero rows to ``like``'s shape (a table that grew)."""
    t = t.to(like.device, like.dtype)
    if t.shape == like.shape:
        return t
    out = torch.zeros_like(like)
    out[:t.shape[0]] = t
    return out


def proximal_penalty(model: torch.nn.Module, anchor: Anchor, lam: float) -> torch.Tensor:
    total = torch.zeros((), device=next(model.parameters()).device)
    for n, p in model.named_parameters():
        if n in anchor.weights:
            total = total + (anchor.mask[n] * (p - anchor.weights[n]) ** 2).sum()
    return lam * total


def ewc_penalty(model: torch.nn.Module, anchor: Anchor, lam: float) -> torch.Tensor:
    total = torch.zeros((), device=next(model.parameters()).device)
    if not anchor.fisher:
        return total
    for n, p in model.named_parameters():
        if n in anchor.fisher:
            total = total + (anchor.fisher[n] * (p - anchor.weights[n]) ** 2).sum()
    return 0.5 * lam * total


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-example KL divergence of Bernoulli(σ(t)) from Bernoulli(σ(s))."""
    target = torch.sigmoid(teacher_logits)
    return (F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none"))


def fisher_diagonal(model: torch.nn.Module, batches: Iterable[dict], loss_of: Callable[[dict], torch.Tensor],
                    allreduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over mini-batches of the squared
    gradient of the batch's mean loss, times the batch size (so it estimates
    the per-example expectation). Averaged over ranks with ``allreduce_mean``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    was = model.training
    model.eval()
    for b in batches:
        if len(b) == 0:
            continue
        model.zero_grad(set_to_none=True)
        loss_of(b).backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.detach() ** 2 * len(b)
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was)
    out = {}
    for n, a in acc.items():
        a = a / max(count, 1)
        out[n] = allreduce_mean(a) if allreduce_mean is not None else a
    return out


def fisher_to_bytes(fisher: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in fisher.items()})


def fisher_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


# ---------------------------------------------------------------- replay

def replay_sample(spark: "SparkSession", lake, table: str, run_ids: list[str], rows: int, seed: int,
                  version: int | None) -> "DataFrame":
    """About ``rows`` examples drawn (seeded, hash-based, so the same on every
    rerun) from the partitions of ``run_ids`` of ``table`` as of ``version``
    (time travel: rows written later never leak in). Holdout rows stay out."""
    from pyspark.sql import functions as Fs

    df = lake.read(table, version=version).where(Fs.col("run_id").isin(run_ids))
    if "holdout" in df.columns:
        df = df.where(~Fs.coalesce(Fs.col("holdout"), Fs.lit(False)))
    total = df.count()
    if total == 0 or rows <= 0:
        return df.limit(0)
    frac = min(1.0, rows / total)
    # keep a row when its seeded hash falls under the fraction: deterministic per event
    h = Fs.pmod(Fs.xxhash64(Fs.col("event_id"), Fs.col("run_id"), Fs.lit(seed)), Fs.lit(1_000_000))
    return df.where(h < Fs.lit(int(round(frac * 1_000_000))))


"""The training objective, in one place: what the step, the validation slice
and the Fisher estimate all minimise or measure.

``loss_sum`` returns the *sum* over a micro-batch of each example's weighted
loss; the loop scales it by ``world / global_count`` so that averaging
gradients over ranks gives the gradient of the mean over the global batch
(loop.py). A new objective (a ranking loss, say) replaces ``loss_sum`` and
keeps that contract: a sum of per-example (or per-group) terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .regularizers import distillation


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             teacher_logits: torch.Tensor | None = None, distill: float = 0.0) -> torch.Tensor:
    """Σ_i w_i · (BCE(logit_i, label_i) + distill · KL_i) over the rows given.

    ``teacher_logits`` (the parent's, for distillation) adds, per example, the
    divergence of the student's prediction from the parent's, weighted like
    the loss so it averages over the global batch the same way."""
    per = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    if teacher_logits is not None and distill > 0:
        per = per + distill * distillation(logits.float(), teacher_logits.float())
    return (per * weights).sum()


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the per-example loss (no distillation)."""
    return loss_sum(logits, labels, weights) / weights.sum().clamp(min=1e-12)

"""The training objective, in one place: what the step, the validation slice
and the Fisher estimate all minimise or measure.

``loss_sum`` returns the *sum* over a micro-batch of each example's weighted
loss; the loop scales it by ``world / global_count`` so that averaging
gradients over ranks gives the gradient of the mean over the global batch
(loop.py). ``train.loss`` (bce | bpr | sampled_softmax | full_softmax) picks
each row's term: :func:`step_loss_sum` asks ``losses.Objective`` for it and
keeps that contract (a sum of per-row terms), so averaged gradients stay exact
under every loss. Validation and the Fisher estimate keep the pointwise log
loss, the one every loss also applies to label-0 rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import Objective
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


def step_loss_sum(objective: Objective, model: torch.nn.Module, batch, teacher: torch.nn.Module | None = None,
                  distill: float = 0.0) -> torch.Tensor:
    """Σ_i w_i · (objective's term_i + distill · KL_i) over ``batch``'s rows:
    ``train.loss=bce`` is :func:`loss_sum` of the model's logits; a ranking
    loss gives one term per row (``losses.Objective.per_row``, after its
    ``begin_step`` for the optimizer step)."""
    t_logits = None
    if teacher is not None and distill > 0:
        with torch.no_grad():
            t_logits = teacher(batch)
    if objective.spec.name == "bce":
        return loss_sum(model(batch), batch["label"], batch["weight"], t_logits, distill)
    per = objective.per_row(model, batch)
    if t_logits is not None:
        per = per + distill * distillation(model(batch).float(), t_logits.float())
    return (per * batch["weight"]).sum()


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the per-example loss (no distillation)."""
    return loss_sum(logits, labels, weights) / weights.sum().clamp(min=1e-12)

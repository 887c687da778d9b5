"""Champion/challenger gate: score both models on tonight's held-out examples
and promote the candidate only when no gated metric is worse than the
champion's by more than the tolerance.

Pointwise metrics (auc, gauc, logloss) use every held-out row (positives,
sampled negatives, retractions); ranking metrics (ndcg@K, hr@K, recall@K,
mrr@K) rank the whole catalogue for each held-out user against that user's
held-out positives.

A gate knows its sample: below ``gate.min_users`` holdout users it decides
"insufficient evidence" (the champion stays), and a metric the candidate
fails rejects it only when a paired bootstrap over the holdout's users
(``gate.bootstrap_samples``, seeded) finds it worse in at least
``gate.confidence`` of the resamples; that share is stored with each check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .metrics import auc, gauc, logloss, ranking_metrics

if TYPE_CHECKING:
    import torch

    from ..config import GateConfig

LOWER_IS_BETTER = {"logloss"}
RANKING = ("ndcg", "hr", "recall", "mrr")


def parse_metric(name: str) -> tuple[str, int | None]:
    base, _, k = name.partition("@")
    return base, (int(k) if k else None)


INSUFFICIENT = "insufficient_evidence"


@dataclass
class GateDecision:
    passed: bool
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""  # promoted | rejected | insufficient_evidence (default: from passed)
    confidence: dict[str, Any] = field(default_factory=dict)  # the bootstrap's samples, seed, P(worse) per metric

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "checks": self.checks,
                "verdict": self.verdict or ("promoted" if self.passed else "rejected"),
                "confidence": self.confidence}


def decide(candidate: dict[str, float], champion: dict[str, float], cfg: "GateConfig", *,
           users: int | None = None, bootstrap: dict[str, dict[str, Any]] | None = None) -> GateDecision:
    """Every metric in ``cfg.metrics``: candidate >= champion - tol (logloss:
    candidate <= champion + tol); tol is ``cfg.tolerance`` (absolute) or
    ``cfg.tolerance * |champion|`` (relative).

    ``users`` (distinct users of the holdout) below ``cfg.min_users``: not
    promoted, verdict insufficient_evidence, whatever the values. ``bootstrap``
    (:func:`paired_bootstrap` per metric): a failed check whose P(worse) is
    below ``cfg.confidence`` passes as within noise, and says so.

    NaN (a metric that cannot be computed on tonight's holdout: one class
    only, no positives) is never compared, and each case says so: the
    candidate's NaN where the champion has a value fails (no evidence to
    promote on); a NaN of the champion leaves that metric undecided (passed
    None, not counted); when no metric is decided the candidate is rejected,
    the reason saying the holdout could not decide."""
    checks, failed, undecided, noise = [], [], [], []
    bootstrap = bootstrap or {}
    for m in cfg.metrics:
        base, _ = parse_metric(m)
        c, ch = candidate.get(m, float("nan")), champion.get(m, float("nan"))
        tol = cfg.tolerance * (abs(ch) if cfg.tolerance_kind == "relative" else 1.0)
        op = "<=" if base in LOWER_IS_BETTER else ">="
        if math.isnan(ch):
            why = "for both models" if math.isnan(c) else f"for the champion (candidate {c:.5f})"
            undecided.append(f"{m} cannot be computed on tonight's holdout {why}")
            checks.append({"metric": m, "candidate": c, "champion": ch, "bound": None, "passed": None,
                           "reason": undecided[-1]})
            continue
        if math.isnan(c):
            ok, bound = False, None
            failed.append(f"{m} cannot be computed for the candidate on tonight's holdout (champion {ch:.5f})")
        else:
            bound = ch + tol if base in LOWER_IS_BETTER else ch - tol
            ok = c <= bound if base in LOWER_IS_BETTER else c >= bound
            p_worse = (bootstrap.get(m) or {}).get("p_worse")
            if not ok and p_worse is not None and p_worse < cfg.confidence:
                ok = True  # worse on tonight's users, but not beyond what resampling them moves
                noise.append(f"{m} {c:.5f} below {bound:.5f} but within noise (worse in {p_worse:.0%} of "
                             f"{bootstrap[m]['samples']} resamples < gate.confidence {cfg.confidence:g})")
            elif not ok:
                failed.append(f"{m} {c:.5f} not {op} {bound:.5f} (champion {ch:.5f}, "
                              f"{cfg.tolerance_kind} tolerance {cfg.tolerance:g}"
                              + (f"; worse in {p_worse:.0%} of {bootstrap[m]['samples']} resamples"
                                 if p_worse is not None else "") + ")")
        checks.append({"metric": m, "candidate": c, "champion": ch, "bound": bound, "passed": bool(ok),
                       **({"p_worse": bootstrap[m]["p_worse"], "diff_ci": bootstrap[m]["diff_ci"]}
                          if m in bootstrap else {})})
    confidence = {"samples": cfg.bootstrap_samples, "seed": cfg.bootstrap_seed, "required": cfg.confidence,
                  "p_worse": {m: b.get("p_worse") for m, b in bootstrap.items()}} if bootstrap else {}
    note = ("; undecided: " + "; ".join(undecided)) if undecided else ""
    note += ("; " + "; ".join(noise)) if noise else ""
    if users is not None and users < cfg.min_users:
        return GateDecision(False, f"insufficient evidence: {users} users in tonight's holdout, fewer than "
                            f"gate.min_users={cfg.min_users}; the champion stays and the candidate is kept as a "
                            "candidate (a larger features.holdout_fraction or a lower gate.min_users decides)",
                            checks, INSUFFICIENT, confidence)
    if failed:
        return GateDecision(False, "gate failed: " + "; ".join(failed) + note, checks, confidence=confidence)
    if len(undecided) == len(checks):
        return GateDecision(False, "gate failed: no metric decided: " + "; ".join(undecided)
                            + " (the champion stays; a larger holdout, features.holdout_fraction, or other "
                            "gate.metrics can decide)", checks, confidence=confidence)
    return GateDecision(True, "gate passed: " + ", ".join(
        f"{c['metric']} {c['candidate']:.5f} vs champion {c['champion']:.5f}" for c in checks
        if c["passed"]) + note, checks, confidence=confidence)


# ------------------------------------------------------------ scoring
def score_pairs(model: "torch.nn.Module", rows: pa.Table, chunk: int = 8192) -> np.ndarray:
    """Raw scores (logits) of ``rows`` (user_idx, item_idx[, history_idx]): the
    model's ``forward`` on the batch training gives it (``data.shards.model_batch``)."""
    import torch

    from ..data.shards import model_batch

    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, rows.num_rows, chunk):
            out.append(model(model_batch(rows.slice(s, chunk), model)).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate_models(models: dict[str, "torch.nn.Module"], rows: pa.Table, catalog: np.ndarray,
                    metrics: list[str], *, slices: dict[str, np.ndarray] | None = None,
                    gate: "GateConfig | None" = None,
                    repeats: tuple[np.ndarray, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Metrics of each model on ``rows`` (columns user_idx, item_idx, label;
    with history_idx and event_time, ranking passes each user's history;
    ``repeats``, each user's repeat lists as
    :func:`~deltarec.evaluation.prequential.user_repeats` gives them, reach the
    ranking of every model that reads them, as its pointwise scores read the
    rows' own).

    Returns ``{role: {metric: value}, "n": rows, "users": held-out users with a
    positive, "holdout_users": distinct users of rows}``; with ``slices`` (name
    → boolean row mask) also ``{"slices": {name: {role: {metric: value}}}}``
    (slices never gate); with ``gate`` (bootstrap_samples > 0) and roles
    candidate and champion, ``{"bootstrap": {metric: paired_bootstrap}}``."""
    from .prequential import align_histories, align_repeats, model_topk, relevant_sets, user_histories

    labels = rows["label"].to_numpy().astype(np.float64)
    users = rows["user_idx"].to_numpy()
    items = rows["item_idx"].to_numpy()
    ks = sorted({k for m in metrics for b, k in [parse_metric(m)] if b in RANKING})
    out: dict[str, Any] = {"n": int(rows.num_rows), "holdout_users": int(len(np.unique(users)))}
    kept: dict[str, dict[str, Any]] = {}  # per role, on every row: what the bootstrap resamples
    # each held-out user's history before their first held-out row, for models that read one
    histories = None
    if "history_idx" in rows.column_names and "event_time" in rows.column_names:
        width = max([int(getattr(m, "history_length", 0) or 0) for m in models.values()] + [1])
        histories = user_histories(rows.filter(pa.array(labels == 1)), width)
    masks = {"all": np.ones(len(labels), dtype=bool), **(slices or {})}
    sliced: dict[str, Any] = {}
    for role, model in models.items():
        scores = score_pairs(model, rows)
        probs = 1.0 / (1.0 + np.exp(-np.clip(scores.astype(np.float64), -50, 50)))
        for name, mask in masks.items():
            vals: dict[str, float] = {}
            y, s, p, u, it = labels[mask], scores[mask], probs[mask], users[mask], items[mask]
            for m in metrics:
                base, _ = parse_metric(m)
                if base == "auc":
                    vals[m] = _or_nan(lambda: auc(y, s))
                elif base == "gauc":
                    vals[m] = _or_nan(lambda: gauc(u, y, s))
                elif base == "logloss":
                    vals[m] = _or_nan(lambda: logloss(y, p))
            pos = y == 1
            if ks and pos.any() and len(catalog):
                uniq, relevant = relevant_sets(u[pos], it[pos])
                top = model_topk(model, uniq, catalog, min(max(ks), len(catalog)),
                                 histories=align_histories(uniq, histories),
                                 repeats=align_repeats(uniq, repeats))
                for k in ks:
                    r = ranking_metrics(top, relevant, min(k, top.shape[1]))
                    for b in RANKING:
                        if f"{b}@{k}" in metrics:
                            vals[f"{b}@{k}"] = r[b]
                if name == "all":
                    out["users"] = int(len(uniq))
                    kept.setdefault(role, {}).update(top=top, relevant=relevant)
            if name == "all":
                kept.setdefault(role, {}).update(scores=s, probs=p)
            for m in metrics:
                vals.setdefault(m, float("nan"))
            vals = {k: round(float(v), 6) for k, v in vals.items()}
            if name == "all":
                out[role] = vals
            else:
                sliced.setdefault(name, {"n": int(mask.sum())})[role] = vals
    if sliced:
        out["slices"] = sliced
    if gate is not None and gate.bootstrap_samples > 0 and {"candidate", "champion"} <= set(kept):
        from .bootstrap import bootstrap_metrics

        out["bootstrap"] = bootstrap_metrics(metrics, kept["candidate"], kept["champion"], labels, users, gate)
    return out


def _or_nan(fn) -> float:
    try:
        return fn()
    except ValueError:  # one class only in a small slice: undefined, not a crash
        return float("nan")

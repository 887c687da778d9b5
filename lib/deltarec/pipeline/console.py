"""How a night reads to people: the one printer the demo, the notebooks and
``deltarec nightly|status`` use.

A night is either a :class:`~deltarec.pipeline.nightly.NightResult` (what a
run returns) or a ledger ``RunRecord`` (what ``status`` reads back); both
become the same :func:`night_row`. Reads nothing from the lake except in
:func:`summary` (the lake's paths); writes nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..evaluation.prequential import role_metrics

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from .nightly import NightResult

# prequential roles shown per night, with their column label
SHOWN = (("champion", "champion"), ("stale", "stale"), ("popularity", "pop"))
LABELS = {"champion": "champion, updated nightly", "stale": "first model, never updated",
          "popularity": "most popular, last {days} days"}


def night_row(night: Any) -> dict[str, Any]:
    """One night's figures: run, strategy, versions, registry status, rows,
    examples, training seconds and next-day HR/NDCG per role (None: not
    measured). ``night``: a NightResult or a ledger RunRecord."""
    if hasattr(night, "source_first"):  # a RunRecord
        versions, status = (night.source_first, night.source_last), night.status
    else:  # a NightResult
        versions, status = night.source_versions, night.registry_status or night.status
    m = night.metrics or {}
    rows = m.get("rows") or {}
    row: dict[str, Any] = {
        "run_id": night.run_id, "strategy": night.strategy, "status": status,
        "versions": f"{versions[0]}..{versions[1]}" if versions else "-",
        "consumed": rows.get("consumed", 0), "quarantined": rows.get("quarantined", 0),
        "examples": m.get("examples", 0), "train_s": (m.get("train") or {}).get("seconds"),
    }
    for role, _ in SHOWN:
        got = role_metrics(m.get("prequential"), role)
        row[f"hr_{role}"], row[f"ndcg_{role}"] = got.get("hr"), got.get("ndcg")
    return row


def describe(r: "NightResult") -> str:
    """What a nightly run consumed and did (or that there was nothing new):
    one line, then :func:`night_summary`."""
    if r.status == "noop":
        return (f"nothing new for model {r.model!r}: watermark {r.watermark} is the latest version; "
                "no run, no checkpoint written")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.quarantine_reasons.items(), key=lambda kv: -kv[1]))
    head = (f"run {r.run_id} ({r.strategy}): versions {r.source_versions[0]}..{r.source_versions[1]}, "
            f"{r.rows_consumed} rows consumed = {r.rows_accepted} accepted + {r.rows_quarantined} quarantined"
            f"{' (' + reasons + ')' if reasons else ''}, {r.examples} examples, trained in {r.train_seconds:.1f}s")
    lines = (r.metrics or {}).get("summary") or night_summary(r.metrics or {})
    return "\n".join([head, *lines])


def _fmt(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"  # v != v: NaN, not computable


def _counts(d: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((d or {}).items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def night_summary(m: dict[str, Any]) -> list[str]:
    """A night's readable summary from its run metrics (what the ledger
    stores): quarantined by reason, examples by kind, retractions by cause,
    seconds per stage, next-day metrics per role, the gate's decision. Stored
    in the run's ``metrics["summary"]`` and printed for every night."""
    rows, job = m.get("rows") or {}, m.get("delta_job") or {}
    lines = [f"  quarantined by reason: {_counts(rows.get('quarantine_reasons'))}",
             f"  examples by kind: {_counts(job.get('example_kinds'))}; retractions by cause: "
             f"{_counts(job.get('retractions'))}; unchanged rewrites cancelled: {job.get('rewrites_cancelled', 0)}"]
    stages = m.get("stages") or {}
    if stages:
        lines.append("  seconds per stage: " + ", ".join(
            f"{k} {v.get('seconds', 0):.1f}" for k, v in stages.items() if isinstance(v, dict)))
    pre = m.get("prequential") or {}
    shown = [(role, role_metrics(pre, role)) for role in ("champion", "candidate", "stale", "popularity")]
    shown = [(role, got) for role, got in shown if got]
    if shown:
        k = pre.get("k", "k")
        lines.append(f"  next-day (before training on it) HR@{k} / NDCG@{k}: " + "; ".join(
            f"{role} {_fmt(got.get('hr'))} / {_fmt(got.get('ndcg'))}" for role, got in shown))
    else:
        lines.append("  next-day metrics: not measured (no earlier model to score the new day)")
    if m.get("strategy_reason"):
        lines.append(f"  strategy: {m['strategy_reason']}")
    decision = (m.get("gate") or {}).get("decision") or {}
    if decision:
        verdict = (decision.get("verdict") or ("promoted" if decision.get("passed") else "rejected")).replace("_", " ")
        conf = decision.get("confidence") or {}
        lines.append(f"  gate: {verdict}: {decision.get('reason')}" + (
            f" [P(candidate worse) over {conf['samples']} user resamples: " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in conf["p_worse"].items()) + "]" if conf.get("p_worse") else ""))
    return lines


def header(k: int) -> str:
    """The markdown header of :func:`table_row` lines."""
    cols = ["night", "versions", "consumed", "quarant.", "examples", "train s"]
    for _, label in SHOWN:
        cols += [f"HR@{k} {label}", f"NDCG@{k} {label}"]
    return "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table_row(label: str, night: Any) -> str:
    """One markdown line of :func:`header`'s table."""
    row = night_row(night)
    cells = [label, row["versions"], str(row["consumed"]), str(row["quarantined"]), str(row["examples"]),
             _num(row["train_s"], ".1f")]
    for role, _ in SHOWN:
        cells += [_num(row[f"hr_{role}"], ".4f"), _num(row[f"ndcg_{role}"], ".4f")]
    return "| " + " | ".join(cells) + " |"


def summary(results: list["NightResult"], lake: "LakeEngine", cfg: "Config", seconds: float) -> str:
    """Means of the next-day metrics over the nights after the first, and where things are."""
    rows = [night_row(r) for r in results[1:] if r.status == "committed"]
    rows = [r for r in rows if r["ndcg_champion"] is not None]
    lines = [f"\nsummary: {len(results)} runs committed in {seconds:.0f}s wall"]
    if rows:
        for role, _ in SHOWN:
            def mean(key):
                vals = [r[key] for r in rows if r[key] is not None]
                return sum(vals) / len(vals) if vals else float("nan")

            lines.append(f"  mean next-day HR@{cfg.eval.k} {mean('hr_' + role):.4f}  "
                         f"NDCG@{cfg.eval.k} {mean('ndcg_' + role):.4f}  "
                         f"{LABELS[role].format(days=cfg.eval.popularity_days)}")
    lines.append(f"  lake: {lake.root}")
    lines.append(f"  checkpoints: {lake.uri(cfg.lake.checkpoints_dir)}/{cfg.model.name}/")
    lines.append(f"  latest: {results[-1].checkpoint.get('path', '-')}")
    lines.append("  see `deltarec status` (or --json) for the ledger")
    return "\n".join(lines)


def status_header() -> str:
    """The header of :func:`status_line`."""
    return (f"{'run_id':<24} {'strategy':<11} {'versions':<11} {'status':<10} {'examples':>9} "
            f"{'HR@k':>7} {'NDCG@k':>7}  committed")


def status_line(run: Any, committed_at: str | None, verified: bool = True) -> str:
    """One ``deltarec status`` line of a ledger run: the champion's next-day metrics that night."""
    row = night_row(run)
    hr, ndcg = (f"{row[k]:>7.4f}" if row[k] is not None else f"{'-':>7}" for k in ("hr_champion", "ndcg_champion"))
    return (f"{row['run_id']:<24} {row['strategy']:<11} {row['versions']:<11} {row['status']:<10} "
            f"{row['examples']:>9} {hr} {ndcg}  {committed_at}" + ("" if verified else "  CHECKSUM MISMATCH"))

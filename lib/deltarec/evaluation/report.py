"""Reports over the run ledger: lineage of runs and next-day metrics over nights."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..lake.ledger import Ledger, RunRecord
from .prequential import role_metrics

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

# (metrics["prequential"] role, legend label, line colour)
SERIES = (("champion", "champion, updated nightly", "tab:blue"), ("stale", "first model, never updated", "tab:orange"),
          ("popularity", "most popular", "tab:green"))


def load_runs(lake: "LakeEngine", cfg: "Config", *, all_models: bool = False) -> list[RunRecord]:
    """Committed runs in ``cfg.lake.runs_table`` (of ``cfg.model.name`` unless ``all_models``), oldest first."""
    return Ledger(lake, cfg.lake.runs_table).runs(None if all_models else cfg.model.name)


def lineage(runs: list[RunRecord], *, verify: bool = False) -> list[dict[str, Any]]:
    """One row per run: its source version range, parent chain (the run first,
    then its ancestors), checkpoint, and whether its range starts right after
    its parent's. ``verify`` re-hashes each checkpoint against the ledger
    (column ``verified``: True, or the error)."""
    from ..registry.core import parent_chain

    by_id = {r.run_id: r for r in runs}
    rows = []
    for r in runs:
        chain = [r.run_id] + [p.run_id for p in parent_chain(r, by_id)[0]]
        parent = by_id.get(r.parent_run_id) if r.parent_run_id else None
        pre = role_metrics(r.metrics.get("prequential"), "champion")
        rows.append({
            "run_id": r.run_id,
            "model": r.model,
            "strategy": r.strategy,
            "status": r.status,  # registry: champion / candidate / retired
            "first_version": r.source_first,
            "last_version": r.source_last,
            "parent": r.parent_run_id,
            "chain": " <- ".join(chain),
            "depth": len(chain) - 1,
            "contiguous": (r.source_first == 0 if r.parent_run_id is None
                           else parent is not None and r.source_first == parent.source_last + 1),
            "examples": r.metrics.get("examples"),
            "ndcg": pre.get("ndcg"),
            "hr": pre.get("hr"),
            "checkpoint": r.checkpoint_path,
            "sha256": r.checkpoint_sha256,
            "committed_at": r.committed_at.isoformat() if r.committed_at else None,
        })
        if verify:
            from ..train.checkpoint import CheckpointError, verify_checkpoint  # imports torch

            try:
                verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
                rows[-1]["verified"] = True
            except CheckpointError as e:
                rows[-1]["verified"] = f"FAILED: {e}"
    return rows


def plot_nights(runs: list[RunRecord], path: str | os.PathLike) -> str:
    """PNG of next-day NDCG@k and HR@k per run for the updated model, the
    never-updated first model and the popularity baseline; x is each run's
    last source version. Runs without prequential metrics (a lineage's first,
    full run) have no points. Returns the path written."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone
    # (a notebook's inline backend keeps working).
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = os.fspath(path)
    if not path.endswith(".png"):
        raise ValueError(f"plot_nights writes a PNG: give a path ending in .png, not {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    k = next((r.metrics["prequential"].get("k") for r in runs if r.metrics.get("prequential")), None)
    at = f"@{k}" if k else ""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, title in ((axes[0], "ndcg", f"next-day NDCG{at}"), (axes[1], "hr", f"next-day HR{at}")):
        for name, label, colour in SERIES:
            pts = [(r.source_last, role_metrics(r.metrics.get("prequential"), name)[key]) for r in runs
                   if key in role_metrics(r.metrics.get("prequential"), name)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=label, color=colour)
        ax.set_title(title)
        ax.set_xlabel("run's last source version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if not any(ax.lines for ax in axes):
        axes[0].text(0.5, 0.5, f"no next-day metrics yet ({len(runs)} runs;\nthe first run of a lineage has none)",
                     ha="center", va="center", transform=axes[0].transAxes)
    else:
        axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(f"model {runs[-1].model if runs else '?'!r}: {len(runs)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------ deltarec report
ROLE_STYLE = {"champion": ("champion (in service)", "tab:blue", "o"),
              "candidate": ("candidate not promoted", "tab:red", "x"),
              "stale": ("first model, never updated", "tab:orange", "s"),
              "popularity": ("most popular", "tab:green", "^")}


def load_metrics(lake: "LakeEngine", cfg: "Config") -> list[dict[str, Any]]:
    """Rows of ``lake.metrics_table`` for committed runs of the configured
    model (a crashed attempt's rows are left out), oldest night first."""
    table = cfg.lake.metrics_table
    if not lake.exists(table):
        return []
    committed = {r.run_id for r in load_runs(lake, cfg)}
    rows = [r for r in lake.read_arrow(table, filters=[("model", "=", cfg.model.name)]).to_pylist()
            if r["run_id"] in committed]
    return sorted(rows, key=lambda r: (r["source_last"], r["phase"], r["role"], r["metric"]))


def plot_metrics(rows: list[dict[str, Any]], runs: list[RunRecord], path: str | os.PathLike,
                 k: int = 10) -> str:
    """PNG: next-day NDCG@k and HR@k per role over nights, and the gate's
    metrics of candidate vs champion (promoted nights filled, rejected hollow)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    status = {r.run_id: r.status for r in runs}
    gate_metrics = sorted({r["metric"] for r in rows if r["phase"] == "gate"})
    fig = Figure(figsize=(5 * (2 + min(len(gate_metrics), 2)), 4))
    axes = fig.subplots(1, 2 + min(len(gate_metrics), 2), squeeze=False)[0]
    for ax, metric in zip(axes[:2], (f"ndcg@{k}", f"hr@{k}")):
        for role, (label, colour, marker) in ROLE_STYLE.items():
            pts = [(r["source_last"], r["value"]) for r in rows
                   if r["phase"] == "prequential" and r["role"] == role and r["metric"] == metric]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=marker, label=label, color=colour,
                        linestyle="none" if role == "candidate" else "-")
        ax.set_title(f"next-day {metric} (before training on the day)")
    for ax, metric in zip(axes[2:], gate_metrics):
        for role, colour in (("champion", "tab:blue"), ("candidate", "tab:purple")):
            pts = [(r["source_last"], r["value"], status.get(r["run_id"]) != "candidate") for r in rows
                   if r["phase"] == "gate" and r["role"] == role and r["metric"] == metric]
            if pts:
                xs, ys, promoted = zip(*pts)
                ax.plot(xs, ys, color=colour, alpha=0.5, label=f"gate: {role}")
                ax.scatter(xs, ys, color=[colour if p else "white" for p in promoted], edgecolors=colour, zorder=3)
        ax.set_title(f"gate {metric} on tonight's holdout\n(hollow: candidate rejected)")
    for ax in axes:
        ax.set_xlabel("night (run's last source version)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no metrics yet\n(the first run has none)", ha="center", va="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_report(lake: "LakeEngine", cfg: "Config", out_dir: str | os.PathLike) -> dict[str, Any]:
    """``out_dir``/metrics_over_nights.png and ``out_dir``/index.html."""
    import html

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    runs = load_runs(lake, cfg)
    rows = load_metrics(lake, cfg)
    png = plot_metrics(rows, runs, os.path.join(out_dir, "metrics_over_nights.png"), cfg.eval.k)
    by_run: dict[str, dict[str, float]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], {})[f"{r['phase']}:{r['role']}:{r['metric']}"] = r["value"]
    cols = sorted({c for d in by_run.values() for c in d})
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in ["run", "status", "versions", "parent", "reason"] + cols)
    body = []
    for r in runs:
        vals = by_run.get(r.run_id, {})
        cells = [r.run_id, r.status, f"{r.source_first}..{r.source_last}", r.parent_run_id or "-",
                 r.status_reason or ""]
        body.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells)
                    + "".join(f"<td>{vals[c]:.4f}</td>" if c in vals else "<td>-</td>" for c in cols) + "</tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>deltarec: {esc(cfg.model.name)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"<h1>model {esc(cfg.model.name)}: {len(runs)} runs</h1><p>lake {esc(lake.root)}; metrics from "
            f"{esc(cfg.lake.metrics_table)}</p><img src='{os.path.basename(png)}' style='max-width:100%'>"
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>")
    html_path = os.path.join(out_dir, "index.html")
    with open(html_path, "w") as f:
        f.write(page)
    return {"png": png, "html": html_path, "runs": len(runs), "metric_rows": len(rows)}

"""Reports over the run ledger: lineage of runs and next-day metrics over nights."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..lake.ledger import Ledger, RunRecord

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

# (metrics["prequential"] key, legend label, line colour)
SERIES = (("model", "updated nightly", "tab:blue"), ("stale", "first model, never updated", "tab:orange"),
          ("popularity", "most popular", "tab:green"))


def load_runs(lake: "LakeEngine", cfg: "Config", *, all_models: bool = False) -> list[RunRecord]:
    """Committed runs in ``cfg.lake.runs_table`` (of ``cfg.model.name`` unless ``all_models``), oldest first."""
    return Ledger(lake, cfg.lake.runs_table).runs(None if all_models else cfg.model.name)


def lineage(runs: list[RunRecord], *, verify: bool = False) -> list[dict[str, Any]]:
    """One row per run: its source version range, parent chain (the run first,
    then its ancestors), checkpoint, and whether its range starts right after
    its parent's. ``verify`` re-hashes each checkpoint against the ledger
    (column ``verified``: True, or the error)."""
    by_id = {r.run_id: r for r in runs}
    rows = []
    for r in runs:
        chain, node, seen = [], r, set()
        while node is not None and node.run_id not in seen:
            seen.add(node.run_id)
            chain.append(node.run_id)
            node = by_id.get(node.parent_run_id) if node.parent_run_id else None
        parent = by_id.get(r.parent_run_id) if r.parent_run_id else None
        pre = r.metrics.get("prequential", {}).get("model", {})
        rows.append({
            "run_id": r.run_id,
            "model": r.model,
            "strategy": r.strategy,
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
            pts = [(r.source_last, r.metrics["prequential"][name][key]) for r in runs
                   if key in r.metrics.get("prequential", {}).get(name, {})]
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

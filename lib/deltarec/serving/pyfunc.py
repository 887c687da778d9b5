"""A champion as an MLflow pyfunc model: raw ids in, raw item ids and scores out.

``predict`` takes a DataFrame with ``user_id`` (raw ids), optionally
``history`` (a list of raw item ids, oldest first, replacing the history stored
for that user; the stored repeat lists stay) and ``k``; it returns one row per
input row: ``user_id``, ``item_ids`` and ``scores`` (best first), ``fallback``
("popularity" for a user with no history, else None) and ``run_id``.

The artifact carries everything: ``bundle.pt`` (``torch.save`` of plain
values: the network's name, parameters and weights, the catalogue, every
item's hashed bucket, each user's stored history and, for a model that reads
them, repeat lists with the time they are scored as of (the one a refresh of
the same lake uses), the popularity list, the hashing parameters) and the
deltarec package as code (the model classes and the top-k routine), so
``mlflow.pyfunc.load_model`` needs mlflow and torch, not a lake, Spark or an
installed deltarec.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import torch

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import RunRecord

BUNDLE_FORMAT = 1


class DeltarecRecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.load_bundle(torch.load(context.artifacts["bundle"], weights_only=True))

    def load_bundle(self, b: dict[str, Any]) -> None:
        from ..models import build_model
        from .scorer import Catalog

        if b.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"bundle format {b.get('format')!r}; this code reads format {BUNDLE_FORMAT}")
        self.bundle = b
        self.model = build_model(b["model"], **b["model_params"])
        self.model.load_state_dict(b["state_dict"])
        self.model.eval()
        self.catalog = Catalog.from_dict(b["catalog"])
        self.item_bucket = dict(zip(b["items"]["ids"], b["items"]["buckets"]))
        self.histories = dict(zip(b["users"]["keys"], b["users"]["histories"]))
        self.repeats = dict(zip(b["users"]["keys"], b["users"].get("repeats") or []))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from .ids import bucket, user_key
        from .scorer import excluded, parse_exclude, top_items

        b = self.bundle
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "user_id" not in df.columns:
            raise ValueError(f"the input needs a user_id column (raw user ids); it has {list(df.columns)}")
        ks, hists, keys = [], [], []
        for i, row in enumerate(df.itertuples(index=False)):
            r = row._asdict()
            k = r.get("k", None)
            k = b["k"] if k is None or (isinstance(k, float) and k != k) else k
            if isinstance(k, bool) or not float(k).is_integer() or not 1 <= int(k) <= b["max_k"]:
                raise ValueError(f"row {i}: k={k!r} must be an integer in 1..{b['max_k']}")
            key = user_key(str(r["user_id"]))
            h = r.get("history", None)
            if h is None or (isinstance(h, float) and h != h):
                h = self.histories.get(key, [])
            else:
                h = [str(x) for x in list(h)]
                unknown = [x for x in h if x not in self.item_bucket]
                if unknown:
                    raise ValueError(f"row {i}: history holds item ids this model has never seen: {unknown[:5]}")
            ks.append(int(k))
            hists.append(h)
            keys.append(key)
        live = [i for i, h in enumerate(hists) if h]
        rule = parse_exclude(b["exclude"])
        top = top_items(self.model, self.catalog, [bucket(keys[i], b["user_buckets"], b["salt"]) for i in live],
                        [[self.item_bucket[x] for x in hists[i]] for i in live], max(ks, default=1),
                        [excluded(hists[i], rule) for i in live],
                        repeats=self.repeat_arrays([keys[i] for i in live]))
        scored = dict(zip(live, top))
        out = {"user_id": [], "item_ids": [], "scores": [], "fallback": [], "run_id": []}
        for i, k in enumerate(ks):
            picked = scored[i][:k] if i in scored else [tuple(p) for p in b["popular"][:k]]
            out["user_id"].append(str(df["user_id"].iloc[i]))
            out["item_ids"].append([p[0] for p in picked])
            out["scores"].append([float(p[1]) for p in picked])
            out["fallback"].append(None if i in scored else "popularity")
            out["run_id"].append(b["run_id"])
        return pd.DataFrame(out)

    def repeat_arrays(self, keys: list[str]):
        """The users' stored repeat lists as of the bundle's time (None: the model reads none)."""
        from ..features.repeats import feature_arrays, live_state
        from .scorer import repeat_items

        b, k = self.bundle, repeat_items(self.model)
        at, half_life = b.get("repeat_as_of"), b.get("repeat_half_life_days")
        if not k or at is None:  # None: no item_stats rows, no catalogue
            return None
        states = [live_state(self.repeats.get(u), [], at, half_life, k) for u in keys]
        return feature_arrays(states, [at] * len(keys), k, half_life)


def build_bundle(lake: "LakeEngine", cfg: "Config", run: "RunRecord") -> dict[str, Any]:
    """What the MLflow model of ``run`` carries, from the lake as it is now
    (the same catalogue, histories and popularity a refresh would use)."""
    from ..lake.ledger import Ledger
    from ..features.repeats import plain_rows
    from ..pipeline.recommend import hashing, popularity, repeat_settings
    from ..train.checkpoint import load_checkpoint
    from .catalog import catalog_from_item_stats, scoring_time, user_histories

    L, R = cfg.lake, cfg.recommend
    ck = load_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
    params = ck.meta["model_params"]
    if params.get("text"):
        raise ValueError(f"run {run.run_id} has an item-text tower, which the MLflow model does not carry yet "
                         "(its encoder and text snapshot live in the lake)")
    ub, ib, salt = hashing(cfg, run)
    import pyarrow.compute as pc

    stats = lake.read_arrow(L.item_stats_table)
    catalog, every = catalog_from_item_stats(stats, R.catalog_days, ib)
    state = lake.read_arrow(L.user_state_table) if lake.exists(L.user_state_table) else None
    hist = user_histories(state) if state is not None else {}
    repeats = plain_rows(state) if params.get("repeat_items") and state is not None else {}
    popular = popularity(lake, cfg, Ledger(lake, L.runs_table), {i for items in catalog.items for i in items},
                         pc.max(stats["last_seen"]).as_py() if stats.num_rows else None)
    return {"format": BUNDLE_FORMAT, "run_id": run.run_id, "checkpoint_sha256": run.checkpoint_sha256,
            "model": ck.meta["model"], "model_params": params, "state_dict": ck.model_state,
            "catalog": catalog.to_dict(), "items": {"ids": list(every), "buckets": list(every.values())},
            "users": {"keys": list(hist), "histories": list(hist.values()),
                      "repeats": [repeats.get(u) for u in hist] if repeats else []},
            "repeat_as_of": scoring_time(stats), "repeat_half_life_days": repeat_settings(cfg, run)[1],
            "popular": [[i, s] for i, s in popular], "k": R.k, "max_k": R.max_k, "exclude": R.exclude,
            "user_buckets": ub, "item_buckets": ib, "salt": salt}


def log_model(lake: "LakeEngine", cfg: "Config", run: "RunRecord", name: str = "model"):
    """Log ``run``'s pyfunc model into the active MLflow run; returns MLflow's ModelInfo."""
    import warnings

    import deltarec

    bundle = build_bundle(lake, cfg, run)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints.*")  # predict takes a plain DataFrame on purpose
        path = os.path.join(d, "bundle.pt")
        torch.save(bundle, path)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")), artifacts={"bundle": path},
            code_paths=[str(Path(deltarec.__file__).parent)],
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              "pandas", "numpy"])

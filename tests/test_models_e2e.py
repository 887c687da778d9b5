"""Two nightly runs (full, then incremental) for each model with each embedding
kind, on a few days of the real data, through run_nightly."""
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import make_config
from deltarec.lake import open_lake
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.pipeline.nightly import run_nightly
from deltarec.train.checkpoint import load_checkpoint

FAST = ("demo.enabled=false", "demo.max_days=4", "features.negatives=2", "features.history_length=4",
        "train.epochs=1", "train.full_epochs=1", "train.batch_size=512", "model.embedding_dim=8",
        "model.hidden=[16]", "model.vocab.oov_buckets=4", "train.checkpoint_every_steps=0")


def two_nights(spark, lake_root, *overrides):
    cfg = make_config(lake_root, *FAST, *overrides)
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    for _, ev in days[:2]:
        append_day(lake, cfg, ev, items)
    first = run_nightly(spark, cfg, lake=lake)
    append_day(lake, cfg, days[2][1], items)
    second = run_nightly(spark, cfg, lake=lake)
    return cfg, lake, first, second


CONTROLS = ("train.forgetting.replay_ratio=0.5", "train.forgetting.proximal=0.01", "train.forgetting.ewc=1.0",
            "train.forgetting.distill=0.5", "train.forgetting.fisher_batches=2")


@pytest.mark.parametrize("name,embedding", [("ranking", "hashed"), ("ranking", "dynamic"),
                                            ("sequential", "hashed"), ("sequential", "dynamic"),
                                            ("repeat_explore", "dynamic")])
def test_two_nights_per_model_and_embedding(spark, lake_root, real_data_path, tiny_bert, name, embedding):
    # riders, so each nightly wiring is covered without more nights: every forgetting control
    # on one combination, the text tower (frozen: Spark-computed embeddings; lora) on two others
    controls = CONTROLS if (name, embedding) == ("ranking", "dynamic") else ()
    if name == "repeat_explore":  # a ranking loss, with the forgetting controls on its incremental night
        controls = ("train.loss=sampled_softmax", *CONTROLS)
    text = {("sequential", "hashed"): "frozen", ("sequential", "dynamic"): "lora"}.get((name, embedding))
    if text:
        controls = ("model.text.enabled=true", f"model.text.model={tiny_bert}", f"model.text.mode={text}",
                    "model.text.max_length=8")
    cfg, lake, first, second = two_nights(spark, lake_root, f"model.name={name}", f"model.embedding={embedding}",
                                          *controls)
    assert (first.status, second.status) == ("committed", "committed")
    assert (first.strategy, second.strategy) == ("full", "incremental")
    a, b = (load_checkpoint(r.checkpoint["path"], r.checkpoint["sha256"]) for r in (first, second))
    assert b.meta["model"] == name and b.meta["warm_start"] == first.run_id
    if embedding == "dynamic":
        assert "vocab.parquet" in b.extras and "vocab.parquet" in second.checkpoint["files"]
        old = a.model_state["item_emb.weight"]
        assert b.model_state["item_emb.weight"].shape[0] >= old.shape[0]  # the table only grows
        assert a.meta["model_params"]["item_rows"] == old.shape[0]
    else:
        assert b.model_state["item_emb.weight"].shape[0] == cfg.features.item_buckets
    if name in ("sequential", "repeat_explore"):
        assert b.meta["model_params"]["history_length"] == 4
    assert second.prequential  # the champion was scored on the new day before training
    if text == "frozen":  # the tower's buffer holds the lake table's vectors
        emb = lake.read_arrow(cfg.model.text.table)
        assert emb.num_rows > 0 and float(b.model_state["text.frozen_lookup"].abs().sum()) > 0
    if text == "lora":
        assert any("lora_b" in k for k in b.model_state)
        moved = [k for k in b.model_state if "lora_b" in k and float(b.model_state[k].abs().sum()) > 0]
        assert moved  # the adapters trained (they start at zero)
    if controls and not text:
        assert "fisher.safetensors" in first.checkpoint["files"]  # saved by night 1 for night 2's EWC
        replay = list(Path(second.checkpoint["path"]).parent.joinpath("replay").glob("*.parquet"))
        assert replay, "no replay files were written"
        runs = set()
        for f in replay:
            runs |= set(pq.read_table(f, columns=["run_id"])["run_id"].to_pylist())
        assert runs == {first.run_id}  # only the older run, never tonight's

"""Forgetting control: each penalty is zero at the parent's weights and grows
away from them; EWC's Fisher travels with the checkpoint; replay draws only
from older versions of the lake."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_config
from deltarec.models import build_model
from deltarec.train.backends import LocalBackend
from deltarec.train.checkpoint import load_checkpoint
from deltarec.train.loop import TrainSpec, build
from deltarec.train.regularizers import (FISHER_FILE, Anchor, distillation, ewc_penalty, fisher_from_bytes,
                                         proximal_penalty, replay_sample)

P = {"user_buckets": 20, "item_buckets": 15, "embedding_dim": 4, "hidden": [8]}


def model():
    torch.manual_seed(0)
    return build_model("ranking", **P)


def moved(m, direction_seed, scale):
    g = torch.Generator().manual_seed(direction_seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["proximal", "ewc"])
def test_penalty_is_zero_at_the_parent_and_grows_away(kind):
    m = model()
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in m.named_parameters()}
    anchor = Anchor.of(m, {}, {}, fisher if kind == "ewc" else None)
    pen = (lambda: proximal_penalty(m, anchor, 0.5)) if kind == "proximal" else (lambda: ewc_penalty(m, anchor, 0.5))
    assert float(pen().detach()) == 0.0
    values = []
    for scale in (0.01, 0.1, 1.0):
        m2 = model()
        moved(m2, 1, scale)
        m = m2
        values.append(float(pen().detach()))
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] == pytest.approx(values[1] * 100, rel=1e-3)  # quadratic in the distance


def test_penalty_ignores_rows_the_parent_never_had():
    m = model()
    anchor = Anchor.of(m, {"user_emb.weight": 15}, {"item_emb.weight": [3]}, None)
    with torch.no_grad():
        m.user_emb.weight[15:] += 1.0  # rows the parent did not have
        m.item_emb.weight[3] += 1.0  # a row re-assigned tonight
    assert float(proximal_penalty(m, anchor, 1.0).detach()) == 0.0
    with torch.no_grad():
        m.user_emb.weight[0] += 1.0
    assert float(proximal_penalty(m, anchor, 1.0).detach()) == pytest.approx(4.0)  # one row of 4 dims moved by 1


def test_distillation_is_zero_when_agreeing_and_grows_with_disagreement():
    t = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(distillation(t, t), torch.zeros(3), atol=1e-6)
    d1, d2 = distillation(t + 0.5, t), distillation(t + 2.0, t)
    assert (d1 > 0).all() and (d2 > d1).all()


def examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return pa.table({"user_idx": pa.array(rng.integers(0, 20, n), pa.int64()),
                     "item_idx": pa.array(rng.integers(0, 15, n), pa.int64()),
                     "label": pa.array((rng.random(n) < 0.4).astype(np.float32)),
                     "weight": pa.array(np.ones(n, np.float32))})


def spec(files, out, parent=None, **kw):
    return TrainSpec(**{**dict(run_id=out.name, files=[str(f) for f in files], model_name="ranking", model_params=P,
                               optimizer="adam", lr=0.05, weight_decay=0.0, batch_size=32, epochs=3, seed=1,
                               checkpoint_dir=str(out), progress=False,
                               parent_path=parent["path"] if parent else None), **kw})


def distance(a, b):
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)


def test_each_control_keeps_the_update_closer_to_the_parent(tmp_path):
    pq.write_table(examples(256), tmp_path / "a.parquet")
    pq.write_table(examples(256, seed=9), tmp_path / "b.parquet")  # another night, other data
    parent = LocalBackend().run(spec([tmp_path / "a.parquet"], tmp_path / "p", fisher_batches=4))["checkpoint"]
    ck = load_checkpoint(parent["path"])
    assert FISHER_FILE in parent["files"]  # saved and checksummed with the checkpoint
    fisher = fisher_from_bytes(ck.extras[FISHER_FILE])
    params = {k for k, _ in build_model("ranking", **P).named_parameters()}  # not buffers (the item clock)
    assert set(fisher) == params and all((f >= 0).all() for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    _, _, state = build(spec([tmp_path / "b.parquet"], tmp_path / "x", parent=parent))
    assert state["warm"]["anchor"].fisher is not None  # the next night uses it

    def child(name, **kw):
        res = LocalBackend().run(spec([tmp_path / "b.parquet"], tmp_path / name, parent=parent, **kw))
        return distance(load_checkpoint(res["checkpoint"]["path"]).model_state, ck.model_state)

    free = child("free")
    assert child("prox", proximal=1.0) < 0.5 * free
    assert child("ewc", ewc=50.0) < free
    assert child("distill", distill=5.0) < free
    assert child("all", proximal=0.1, ewc=1.0, distill=1.0) < free  # combinable


def test_replay_draws_only_from_older_versions(spark, lake_root):
    from deltarec.lake import open_lake

    cfg = make_config(lake_root)
    lake = open_lake(cfg.lake, spark)
    schema = pa.schema([("run_id", pa.string()), ("event_id", pa.string()), ("label", pa.float32()),
                        ("holdout", pa.bool_())])

    def rows(run, n, tag="", holdout_every=0):
        return pa.table({"run_id": [run] * n, "event_id": [f"{run}{tag}-{i}" for i in range(n)],
                         "label": pa.array(np.ones(n, np.float32)),
                         "holdout": [bool(holdout_every and i % holdout_every == 0) for i in range(n)]}, schema=schema)

    lake.create("ex", schema, partition_by=["run_id"])
    lake.write("ex", rows("r1", 400, holdout_every=4), mode="overwrite", replace_where="run_id = 'r1'",
               partition_by=["run_id"])
    v_before = lake.write("ex", rows("r2", 400), mode="overwrite", replace_where="run_id = 'r2'",
                          partition_by=["run_id"])
    # later versions: tonight's rows and a rewrite of r1 that an older version never had
    lake.write("ex", rows("r3", 400), mode="overwrite", replace_where="run_id = 'r3'", partition_by=["run_id"])
    lake.write("ex", rows("r1", 400, tag="rewritten"), mode="overwrite", replace_where="run_id = 'r1'",
               partition_by=["run_id"])
    got = replay_sample(spark, lake, "ex", ["r1", "r2"], 200, seed=3, version=v_before).toArrow()
    ids = got["event_id"].to_pylist()
    assert 100 < len(ids) < 300  # about the asked-for count
    assert {r for r in got["run_id"].to_pylist()} <= {"r1", "r2"}  # never tonight's run
    assert not any("rewritten" in i for i in ids)  # rows as of the older version only
    assert not any(got["holdout"].to_pylist())  # the gate's rows are never replayed
    again = replay_sample(spark, lake, "ex", ["r1", "r2"], 200, seed=3, version=v_before).toArrow()
    assert sorted(again["event_id"].to_pylist()) == sorted(ids)  # seeded: a rerun draws the same sample
    other = replay_sample(spark, lake, "ex", ["r1", "r2"], 200, seed=4, version=v_before).toArrow()
    assert sorted(other["event_id"].to_pylist()) != sorted(ids)

"""Training: averaged gradients across real worker processes, checkpoints."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.train.backends import HorovodBackend, LocalBackend, make_backend
from deltarec.train.checkpoint import CheckpointCorrupt, load_checkpoint, save_checkpoint, verify_checkpoint
from deltarec.train.loop import TrainSpec

B, STEPS, WORLD = 64, 4, 2  # global batch, steps, workers


def examples(n, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "user_idx": pa.array(rng.integers(0, 50, n), pa.int64()),
        "item_idx": pa.array(rng.integers(0, 40, n), pa.int64()),
        "label": pa.array((rng.random(n) < 0.3).astype(np.float32)),
        "weight": pa.array(rng.uniform(0.5, 2.0, n).astype(np.float32)),
    })


def spec(files, out, **kw) -> TrainSpec:
    base = dict(run_id="t", files=[str(f) for f in files], model_name="ranking",
                model_params={"user_buckets": 50, "item_buckets": 40, "embedding_dim": 4, "hidden": [8]},
                optimizer="sgd", lr=0.5, weight_decay=0.0, batch_size=B, epochs=1, seed=3,
                checkpoint_dir=str(out), progress=False, shuffle=False)
    return TrainSpec(**{**base, **kw})


def interleave_for_one_worker(t: pa.Table) -> pa.Table:
    """Row order under which one worker's batch s holds exactly the rows that
    the two workers hold at step s (worker r reads the r-th contiguous half)."""
    half, b = t.num_rows // WORLD, B // WORLD
    idx = [r * half + s * b + j for s in range(STEPS) for r in range(WORLD) for j in range(b)]
    return t.take(pa.array(idx))


# Every backend runs the same exchange; Spark launches are slow here (~15-30 s
# each), so they run once per backend and the optimizers go through the warm
# local-process pools (the same collectives, launched without Spark).
LAUNCHES = [("horovod", "spark", "sgd"), ("torch", "spark", "sgd")] + [
    (b, "processes", o) for b in ("horovod", "torch") for o in ("sgd", "adam", "lazy_adam", "adagrad")]


@pytest.mark.parametrize("backend,launcher,optimizer", LAUNCHES)
def test_two_workers_on_global_batch_equal_one_worker(spark, tmp_path, backend, launcher, optimizer):
    t = examples(B * STEPS)
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(interleave_for_one_worker(t), tmp_path / "one.parquet")

    kw = {"optimizer": optimizer} if optimizer == "sgd" else {"optimizer": optimizer, "lr": 0.05}
    one = LocalBackend().run(spec([tmp_path / "one.parquet"], tmp_path / "ck1", **kw))
    two = make_backend(backend, spark, WORLD, launcher=launcher).run(spec([tmp_path / "two.parquet"],
                                                                          tmp_path / "ck2", **kw))

    assert two["world_size"] == WORLD and one["steps"] == two["steps"] == STEPS
    assert [r["examples"] for r in two["ranks"]] == [B * STEPS // WORLD] * WORLD
    assert {r["comm"] for r in two["ranks"]} == {"horovod" if backend == "horovod" else "gloo"}
    p1 = load_checkpoint(one["checkpoint"]["path"]).model_state
    p2 = load_checkpoint(two["checkpoint"]["path"]).model_state
    init = spec([], "")
    torch.manual_seed(init.seed)
    from deltarec.models import build_model

    p0 = build_model("ranking", **init.model_params).state_dict()
    moved = max(float((p1[k] - p0[k]).abs().max()) for k in p0)
    assert moved > 1e-2  # the steps really changed the weights ...
    for k in p1:  # ... identically on 2 workers and on 1
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6, msg=f"{backend}/{optimizer}: {k} differs")


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_uneven_shards_do_not_hang_and_use_every_row(tmp_path, backend):
    t = examples(B * 2 + 7)  # rank 0 gets one row more; the last step is partial
    pq.write_table(t, tmp_path / "odd.parquet")
    res = make_backend(backend, None, WORLD, launcher="processes").run(spec([tmp_path / "odd.parquet"],
                                                                            tmp_path / "ck"))
    assert sorted(r["examples"] for r in res["ranks"]) == [B + 3, B + 4]
    assert res["examples"] == t.num_rows


def test_worker_error_names_its_rank(spark, tmp_path):
    pq.write_table(examples(B), tmp_path / "x.parquet")
    bad = spec([tmp_path / "x.parquet"], tmp_path / "ck", model_params={"user_buckets": 5, "item_buckets": 40,
                                                                        "embedding_dim": 4, "hidden": [8]})
    with pytest.raises(Exception, match=r"worker rank \d/1 \(local\) failed: IndexError"):
        LocalBackend().run(bad)


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    from deltarec.models import build_model

    model = build_model("ranking", user_buckets=10, item_buckets=10, embedding_dim=4, hidden=[4])
    opt = torch.optim.Adam(model.parameters())
    model({"user_idx": torch.tensor([1]), "item_idx": torch.tensor([2])}).sum().backward()
    opt.step()
    saved = save_checkpoint(str(tmp_path / "ck"), model, opt, {"run_id": "r"}, {"global_step": 7})
    loaded = load_checkpoint(saved.path, saved.sha256)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v)
    assert loaded.train_state["global_step"] == 7 and loaded.meta["run_id"] == "r"
    assert loaded.optimizer_state["state"]  # Adam moments came back

    with pytest.raises(CheckpointCorrupt, match="!= recorded"):
        verify_checkpoint(saved.path, "0" * 64)
    blob = bytearray((tmp_path / "ck" / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "ck" / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointCorrupt, match="model.safetensors has sha256"):
        load_checkpoint(saved.path, saved.sha256)
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(CheckpointCorrupt, match="incomplete write"):
        verify_checkpoint(saved.path)


def test_warm_start_restores_model_and_optimizer(tmp_path):
    pq.write_table(examples(B * 2), tmp_path / "a.parquet")
    first = LocalBackend().run(spec([tmp_path / "a.parquet"], tmp_path / "p", optimizer="adam"))
    ck = first["checkpoint"]
    from deltarec.train.loop import build

    model, opt, state = build(spec([], tmp_path / "q", optimizer="adam", parent_path=ck["path"],
                                   parent_sha256=ck["sha256"]))
    parent = load_checkpoint(ck["path"])
    for k, v in parent.model_state.items():
        assert torch.equal(model.state_dict()[k], v)
    assert state["global_step"] == first["steps"]
    restored = opt.state_dict()["state"]
    for k, st in parent.optimizer_state["state"].items():
        assert torch.equal(restored[k]["exp_avg"], st["exp_avg"])
    # the saved state's kernel flags (None in older checkpoints) do not switch off the fused kernels
    parent.optimizer_state["param_groups"][0]["fused"] = None
    from deltarec.train.spec import load_optimizer_state

    load_optimizer_state(opt, parent.optimizer_state)
    assert opt.param_groups[0]["fused"] is True


def test_horovod_worker_error_names_the_failing_rank(spark, tmp_path):
    t = examples(B * 2)
    bad = t.column("item_idx").to_numpy().copy()
    bad[B:] = 999  # out of range only in rank 1's half
    t = t.set_column(1, "item_idx", pa.array(bad))
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(Exception, match=r"worker rank 1/2 \(horovod\) failed: IndexError") as e:
        # a bounded wait: should rank 1's shutdown race rank 0's enqueue, rank 0 stops after 60 s, not never
        HorovodBackend(spark, WORLD).run(spec([tmp_path / "x.parquet"], tmp_path / "ck", collective_timeout_s=60))
    assert "rank 0/2" not in str(e.value).split("\n")[0]
    # the session survives a failed training job
    assert spark.range(3).count() == 3


CRASHING_WORKER = """
import sys
sys.path.insert(0, {lib!r})
from deltarec.train.backends import LocalBackend
from deltarec.train.loop import TrainSpec
LocalBackend().run(TrainSpec(**{spec!r}))
"""


def test_crashed_run_resumes_from_in_run_checkpoint_to_the_same_weights(tmp_path):
    import dataclasses
    import os
    import subprocess
    import sys

    from conftest import ROOT

    pq.write_table(examples(B * 6), tmp_path / "d.parquet")
    common = dict(optimizer="adam", epochs=2, shuffle=True, checkpoint_every_steps=4)
    straight = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "a", resume_dir=str(tmp_path / "ra"),
                                       **common))
    crash_spec = spec([tmp_path / "d.parquet"], tmp_path / "b", resume_dir=str(tmp_path / "rb"), **common)
    code = CRASHING_WORKER.format(lib=str(ROOT / "lib"), spec=dataclasses.asdict(crash_spec))
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DELTAREC_CRASH_AT": "after_inrun_checkpoint"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 86, proc.stderr[-2000:]
    assert not (tmp_path / "b" / "manifest.json").exists()  # it died mid-run
    resumed = LocalBackend().run(crash_spec)
    assert resumed["resumed_from"] is not None and resumed["resumed_from"].endswith("step-000000004")
    assert resumed["ranks"][0]["examples"] == straight["ranks"][0]["examples"] - 4 * B  # 4 steps not redone
    a = load_checkpoint(straight["checkpoint"]["path"]).model_state
    b = load_checkpoint(resumed["checkpoint"]["path"]).model_state
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine or in CI)")
def test_gpu_bf16_training_tracks_the_cpu_result(tmp_path):  # pragma: no cover - GPU only
    pq.write_table(examples(B * 4), tmp_path / "g.parquet")
    cpu = LocalBackend().run(spec([tmp_path / "g.parquet"], tmp_path / "cpu"))
    gpu = LocalBackend().run(spec([tmp_path / "g.parquet"], tmp_path / "gpu", use_gpu=True))
    a = load_checkpoint(cpu["checkpoint"]["path"]).model_state
    b = load_checkpoint(gpu["checkpoint"]["path"]).model_state
    assert all(v.device.type == "cpu" for v in b.values())  # checkpoints are device-free
    for k in a:  # bf16 autocast: close, not equal
        torch.testing.assert_close(b[k], a[k], rtol=5e-2, atol=5e-2, msg=k)


def test_finetune_keeps_frozen_modules_and_trains_the_rest(tmp_path):
    pq.write_table(examples(B * 3), tmp_path / "d.parquet")
    parent = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "p", optimizer="adam"))["checkpoint"]
    child = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "c", optimizer="adam",
                                    parent_path=parent["path"], parent_sha256=parent["sha256"],
                                    freeze=["user_emb", "mlp"]))["checkpoint"]
    before, after = load_checkpoint(parent["path"]), load_checkpoint(child["path"])
    for k, v in before.model_state.items():
        same = torch.equal(after.model_state[k], v)
        if k.startswith("user_emb.") or k.startswith("mlp."):
            assert same, f"frozen {k} moved"
        elif k.split(".")[0] in ("item_emb", "item_bias", "bias"):  # (the repeat terms see no history here)
            assert not same, f"trained {k} did not move"
    # the optimizer kept the Adam moments of the parameters still trained
    names = after.train_state["optimizer_params"]
    assert "user_emb.weight" not in names and "item_emb.weight" in names
    with pytest.raises(Exception, match="'towers' names no module of the model; modules: bias, item_bias"):
        LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "x", freeze=["towers"]))


def test_warm_start_continues_lr_schedule_and_rng(tmp_path):
    from deltarec.train.loop import build

    pq.write_table(examples(B * 2), tmp_path / "d.parquet")
    kw = dict(optimizer="adam", lr_schedule="exponential", lr_decay=0.9)
    first = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "p", **kw))["checkpoint"]
    parent = load_checkpoint(first["path"])
    step = parent.train_state["global_step"]
    torch.manual_seed(999)  # whatever the process did before
    _, opt, state = build(spec([], tmp_path / "q", parent_path=first["path"], **kw))
    assert state["global_step"] == step == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.9 ** step)
    assert torch.equal(torch.get_rng_state(), parent.train_state["rng_torch"])
    _, opt2, _ = build(spec([], tmp_path / "r", scale_lr_by_workers=True), world=4)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * 4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    pq.write_table(examples(B * STEPS), tmp_path / "d.parquet")
    one = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "a"))
    acc = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "b", accumulation_steps=4))
    assert acc["steps"] == one["steps"] == STEPS
    a = load_checkpoint(one["checkpoint"]["path"]).model_state
    b = load_checkpoint(acc["checkpoint"]["path"]).model_state
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_early_stopping_on_the_validation_slice(tmp_path):
    pq.write_table(examples(B * 8), tmp_path / "d.parquet")  # random labels: nothing to learn, it overfits
    res = LocalBackend().run(spec([tmp_path / "d.parquet"], tmp_path / "a", optimizer="adam", lr=0.05,
                                  epochs=40, validation_fraction=0.25, patience=2, shuffle=True))
    hist = res["val_history"]
    assert res["epochs_run"] == len(hist) < 40
    best = min(range(len(hist)), key=hist.__getitem__)
    assert len(hist) - 1 - best == 2  # stopped after exactly `patience` epochs without improvement
    assert res["examples"] == res["epochs_run"] * (B * 8 - B * 2)  # validation rows never trained on

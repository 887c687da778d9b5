"""CUDA paths: NCCL process groups, bf16 autocast, pinned transfer. Every
test here skips without a GPU (CI has none); run them where one is."""
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.train.backends import LocalBackend, TorchBackend
from deltarec.train.checkpoint import load_checkpoint
from test_training import B, STEPS, WORLD, examples, interleave_for_one_worker, spec

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU (none on this machine or in CI)")


def _close_to_cpu(gpu_res, cpu_res):
    a = load_checkpoint(cpu_res["checkpoint"]["path"]).model_state
    b = load_checkpoint(gpu_res["checkpoint"]["path"]).model_state
    assert all(v.device.type == "cpu" for v in b.values())  # checkpoints are device-free
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    for k in a:  # bf16 autocast: close to the fp32 CPU run, not equal
        torch.testing.assert_close(b[k], a[k], rtol=5e-2, atol=5e-2, msg=k)
    return moved


@needs_gpu
def test_nccl_process_group_trains_like_the_cpu(tmp_path):
    pq.write_table(examples(B * STEPS), tmp_path / "g.parquet")
    cpu = LocalBackend().run(spec([tmp_path / "g.parquet"], tmp_path / "cpu"))
    gpu = TorchBackend(None, 1, use_gpu=True, timeout_s=300).run(
        spec([tmp_path / "g.parquet"], tmp_path / "gpu", use_gpu=True))
    r = gpu["ranks"][0]
    assert r["device"].startswith("cuda") and r["comm"] == "nccl", r
    assert gpu["steps"] == cpu["steps"] == STEPS
    _close_to_cpu(gpu, cpu)


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (NCCL refuses two ranks on one GPU); this machine has {GPUS}")
def test_two_gpus_on_global_batch_equal_one_gpu(tmp_path):  # pragma: no cover - multi-GPU only
    t = examples(B * STEPS)
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(interleave_for_one_worker(t), tmp_path / "one.parquet")
    one = TorchBackend(None, 1, use_gpu=True).run(spec([tmp_path / "one.parquet"], tmp_path / "ck1", use_gpu=True))
    two = TorchBackend(None, WORLD, use_gpu=True).run(spec([tmp_path / "two.parquet"], tmp_path / "ck2", use_gpu=True))
    assert sorted(r["device"] for r in two["ranks"]) == ["cuda:0", "cuda:1"]
    p1 = load_checkpoint(one["checkpoint"]["path"]).model_state
    p2 = load_checkpoint(two["checkpoint"]["path"]).model_state
    for k in p1:  # bf16 on both sides, same batches: only reduction order differs
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-2, atol=1e-3, msg=k)


@needs_gpu
def test_sequential_model_with_gradient_accumulation_on_gpu(tmp_path):
    """History columns, the attention model and accumulated micro-batches on CUDA.
    SGD, not Adam: Adam moves every weight by about lr whatever the gradient's
    size, so bf16 noise in a near-zero gradient flips whole steps."""
    import numpy as np
    import pyarrow as pa

    t = examples(B * STEPS)
    rng = np.random.default_rng(1)
    hist = [list(rng.integers(0, 40, rng.integers(0, 6))) for _ in range(t.num_rows)]
    t = t.append_column("history_idx", pa.array(hist, pa.list_(pa.int64())))
    pq.write_table(t, tmp_path / "s.parquet")
    kw = dict(model_name="sequential", history_length=5, accumulation_steps=2, optimizer="sgd", lr=0.2,
              model_params={"user_buckets": 50, "item_buckets": 40, "embedding_dim": 8, "heads": 2, "layers": 1,
                            "history_length": 5})
    cpu = LocalBackend().run(spec([tmp_path / "s.parquet"], tmp_path / "cpu", **kw))
    gpu = LocalBackend().run(spec([tmp_path / "s.parquet"], tmp_path / "gpu", use_gpu=True, **kw))
    assert gpu["ranks"][0]["device"].startswith("cuda")
    assert abs(gpu["train_loss"] - cpu["train_loss"]) < 0.05 * abs(cpu["train_loss"])
    _close_to_cpu(gpu, cpu)

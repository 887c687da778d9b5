"""What one training run is: the plain values the driver resolves (``TrainSpec``)
and the choices that follow from them alone (optimizer, device, learning rate).

The spec is pickled to every worker, so it holds only plain values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .optim import LazyAdam

# fused=True: torch's one-pass kernels (CPU and CUDA) instead of one pass over
# each tensor per operation, which on CPU is torch's default. Measured here on
# the ranking model's tables (24k x 32 rows): Adam 1.1 ms a step instead of
# 13, SGD with momentum 0.1 instead of 2.4. Adagrad keeps sparse gradients
# (optim.py), which the fused kernel does not take.
OPTIMIZERS = {
    "sgd": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd, fused=True),
    "adagrad": lambda p, lr, wd: torch.optim.Adagrad(p, lr=lr, weight_decay=wd),
    "rmsprop": lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, weight_decay=wd),
    "adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd, fused=True),
    "adamw": lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd, fused=True),
    # Adam whose embedding rows update only when a batch touches them (train/optim.py)
    "lazy_adam": lambda p, lr, wd: LazyAdam(p, lr=lr, weight_decay=wd),
}


@dataclass
class TrainSpec:
    run_id: str
    files: list[str]  # parquet files of this run's training_examples
    model_name: str
    model_params: dict[str, Any]
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int  # global
    epochs: int
    seed: int
    checkpoint_dir: str  # where rank 0 writes this run's checkpoint
    meta: dict[str, Any] = field(default_factory=dict)  # saved in meta.json
    parent_path: str | None = None
    parent_sha256: str | None = None
    grad_clip: float = 0.0
    progress: bool = True
    use_gpu: bool = False
    shuffle: bool = True  # per-epoch seeded shuffle of each rank's shard
    # In-run checkpoints: every N optimizer steps rank 0 saves the full state
    # under resume_dir; a rerun of the same run id resumes from the newest one.
    resume_dir: str | None = None
    checkpoint_every_steps: int = 0
    freeze: list[str] = field(default_factory=list)  # module prefixes kept fixed (finetune)
    lr_schedule: str = "constant"  # or "exponential": lr * lr_decay ** global_step
    lr_decay: float = 1.0
    scale_lr_by_workers: bool = False  # lr * world size (Horovod's convention)
    accumulation_steps: int = 1  # micro-batches per optimizer step
    validation_fraction: float = 0.0  # > 0: hold out this share of each shard for early stopping
    patience: int = 1  # epochs without a better validation loss before stopping
    # Examples of earlier runs mixed in against forgetting (read with the files;
    # they never count towards the vocabulary's admission or last-seen).
    replay_files: list[str] = field(default_factory=list)
    history_length: int = 0  # > 0: batches carry history_idx (N, L) (sequence models)
    repeat_items: int = 0  # > 0: batches carry the whole-history repeat lists (N, K) (features/repeats.py)
    # Dynamic vocabulary (model_params["embedding"] == "dynamic"): admission / eviction.
    vocab_min_count: int = 1
    vocab_ttl_nights: int = 0
    vocab_oov_buckets: int = 16
    # Forgetting control against the parent (0: off): proximal λ, EWC λ, distillation weight.
    proximal: float = 0.0
    ewc: float = 0.0
    distill: float = 0.0
    fisher_batches: int = 0  # 0: no Fisher saved; else batches of the shard used for it (EWC's next night)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "bce"})  # train.loss: losses.LossSpec's fields
    # A Horovod collective that waits longer fails the run instead of spinning
    # for ever on a peer that stopped (collective.HorovodCollective._wait).
    collective_timeout_s: float = 600.0


def make_optimizer(spec: TrainSpec, model: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    try:
        factory = OPTIMIZERS[spec.optimizer]
    except KeyError:
        raise ValueError(f"train.optimizer={spec.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return factory([p for p in model.parameters() if p.requires_grad], spec.lr if lr is None else lr,
                   spec.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``load_state_dict`` that keeps this optimizer's kernels: a saved state
    carries its own ``fused``/``foreach`` flags (None in checkpoints written
    before fused kernels were used), and loading them would silently switch a
    warm-started run back to the slow ones."""
    impl = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(impl)
        if group.get("fused"):  # fused kernels want the step counter beside the parameter
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device)


def device_for(spec: TrainSpec, local_rank: int = 0) -> torch.device:
    """CUDA device of this worker when asked for and present, else the CPU."""
    if spec.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def base_lr(spec: TrainSpec, world: int) -> float:
    return spec.lr * (world if spec.scale_lr_by_workers else 1)


def lr_at(spec: TrainSpec, world: int, global_step: int) -> float:
    """The schedule is a function of the global step, which checkpoints carry:
    a warm start or a resume continues it exactly."""
    if spec.lr_schedule == "exponential":
        return base_lr(spec, world) * spec.lr_decay ** global_step
    if spec.lr_schedule != "constant":
        raise ValueError(f"train.lr_schedule={spec.lr_schedule!r}; choose constant or exponential")
    return base_lr(spec, world)


def is_dynamic(spec: TrainSpec) -> bool:
    return spec.model_params.get("embedding", "hashed") == "dynamic"

"""In-run checkpoints: every ``spec.checkpoint_every_steps`` optimizer steps rank
0 saves the full state under ``spec.resume_dir``; a rerun of the same run id on
the same data resumes from the newest complete one (a crash while writing
one falls back to the one before).

"The same data" is the content of rank 0's shard (:func:`shard_key`: a digest
of its tensors, in the order the steps draw them, plus the world size), not
the file names: a rerun of a killed night rewrites its examples under new
names, and the same rows in the same order are the same run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

from ..faults import crash_point
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from .spec import TrainSpec, load_optimizer_state


# TrainSpec fields that name files or say where to write: they change between attempts at one run
PER_ATTEMPT = ("files", "replay_files", "checkpoint_dir", "resume_dir", "meta", "progress", "parent_path")


def shard_key(spec: TrainSpec, shard, world: int) -> str:
    """What an in-run checkpoint must match to be resumed from: the run id,
    the world size, the training settings (the spec but its per-attempt
    fields) and a SHA-256 of rank 0's shard (every tensor, by name)."""
    settings = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in PER_ATTEMPT}
    h = hashlib.sha256(f"{spec.run_id}|{world}|{json.dumps(settings, sort_keys=True, default=str)}".encode())
    for name in sorted(shard):
        t = shard[name].detach().cpu().contiguous()
        h.update(f"|{name}:{tuple(t.shape)}:{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def latest_inrun(spec: TrainSpec) -> str | None:
    """Newest complete, checksum-valid in-run checkpoint of this run, if any."""
    if not spec.resume_dir or not os.path.isdir(spec.resume_dir):
        return None
    for name in sorted(os.listdir(spec.resume_dir), reverse=True):
        path = os.path.join(spec.resume_dir, name)
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError:
            continue  # a crash while writing it: try the one before
    return None


def resume(spec: TrainSpec, model, optimizer, state: dict[str, Any], key: str) -> str | None:
    """Load the newest in-run checkpoint of this run into ``model``,
    ``optimizer`` and ``state`` when it was saved on the same data (``key``:
    :func:`shard_key`); returns its path, or None when there is none."""
    path = latest_inrun(spec)
    if path is None:
        return None
    ck = load_checkpoint(path)
    if ck.meta.get("run_id") != spec.run_id or ck.meta.get("shard_key") != key:
        return None  # another run's or other data's state: never resume from it
    model.load_state_dict(ck.model_state)
    load_optimizer_state(optimizer, ck.optimizer_state)
    state.clear()
    state.update(ck.train_state)
    return path


def save_inrun(spec: TrainSpec, model, optimizer, state: dict[str, Any], key: str) -> None:
    path = os.path.join(spec.resume_dir, f"step-{state['global_step']:09d}")
    save_checkpoint(path, model, optimizer, {"run_id": spec.run_id, "shard_key": key}, dict(state))
    for old in sorted(os.listdir(spec.resume_dir))[:-1]:  # keep the newest only
        shutil.rmtree(os.path.join(spec.resume_dir, old), ignore_errors=True)
    crash_point("after_inrun_checkpoint")

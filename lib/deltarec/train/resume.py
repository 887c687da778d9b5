"""In-run checkpoints: every ``spec.checkpoint_every_steps`` optimizer steps rank
0 saves the full state under ``spec.resume_dir``; a rerun of the same run id on
the same files resumes from the newest complete one (a crash while writing
one falls back to the one before)."""
from __future__ import annotations

import os
import shutil
from typing import Any

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from .spec import TrainSpec, load_optimizer_state

CRASH_ENV = "DELTAREC_CRASH_AT"  # tests: "after_inrun_checkpoint" kills the process right after one


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


def resume(spec: TrainSpec, model, optimizer, state: dict[str, Any]) -> str | None:
    """Load the newest in-run checkpoint of this run into ``model``,
    ``optimizer`` and ``state``; returns its path, or None when there is none."""
    path = latest_inrun(spec)
    if path is None:
        return None
    ck = load_checkpoint(path)
    if ck.meta.get("run_id") != spec.run_id or ck.meta.get("files") != sorted(spec.files):
        return None  # another run's or other data's state: never resume from it
    model.load_state_dict(ck.model_state)
    load_optimizer_state(optimizer, ck.optimizer_state)
    state.clear()
    state.update(ck.train_state)
    return path


def save_inrun(spec: TrainSpec, model, optimizer, state: dict[str, Any]) -> None:
    path = os.path.join(spec.resume_dir, f"step-{state['global_step']:09d}")
    save_checkpoint(path, model, optimizer, {"run_id": spec.run_id, "files": sorted(spec.files)}, dict(state))
    for old in sorted(os.listdir(spec.resume_dir))[:-1]:  # keep the newest only
        shutil.rmtree(os.path.join(spec.resume_dir, old), ignore_errors=True)
    if os.environ.get(CRASH_ENV) == "after_inrun_checkpoint":
        os._exit(86)

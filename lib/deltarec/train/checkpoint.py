"""Checkpoints: safetensors weights + torch optimizer/RNG state + JSON metadata,
each file with its sha256 in ``manifest.json``. The checkpoint's own sha256 is
that of the manifest, which is what the ledger records.

Files are written through ``pyarrow.fs`` so the lake root may be a local path
or an object-store URI.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lake.uri import filesystem

from .. import jsonout

MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    pass


class CheckpointCorrupt(CheckpointError):
    pass


class _LocalFS:
    """Plain Python file IO for local paths. (pyarrow's LocalFileSystem after a
    delta-rs read aborts the interpreter at exit: "terminate called without an
    active exception".)"""

    @staticmethod
    def create_dir(path, recursive=True):
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def open_output_stream(path):
        return open(path, "wb")

    @staticmethod
    def open_input_stream(path):
        return open(path, "rb")


def _fs(uri: str):
    fs, path = filesystem(uri)  # a local path, file:/, s3a://, abfss://, dbfs:/ ... (lake/uri.py)
    return (_LocalFS(), os.path.abspath(path)) if fs is None else (fs, path)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _write(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


@dataclass
class SavedCheckpoint:
    path: str
    sha256: str  # of manifest.json
    files: dict[str, str]  # file name -> sha256


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], train_state: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> SavedCheckpoint:
    """Write every file, then the manifest last: a directory without a manifest
    is an incomplete write and is never loaded. ``extra_files`` (e.g. the
    vocabulary, the EWC Fisher) are checksummed in the manifest like the rest."""
    from safetensors.torch import save as st_save

    fs, root = _fs(path)
    fs.create_dir(root, recursive=True)
    blobs: dict[str, bytes] = {
        "model.safetensors": st_save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}),
        "meta.json": jsonout.dumps(meta, sort_keys=True, indent=1, default=str).encode(),
    }
    if optimizer is not None or train_state is not None:
        buf = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "train_state": train_state or {}}, buf)
        blobs["train_state.pt"] = buf.getvalue()
    for name, data in (extra_files or {}).items():
        if name in blobs or name == MANIFEST or "/" in name:
            raise ValueError(f"checkpoint extra file name {name!r} clashes with a standard file or has a '/'")
        blobs[name] = data
    files = {}
    for name, data in blobs.items():
        _write(fs, f"{root}/{name}", data)
        files[name] = sha256_bytes(data)
    manifest = json.dumps({"format": FORMAT, "files": files}, sort_keys=True, indent=1).encode()
    _write(fs, f"{root}/{MANIFEST}", manifest)
    return SavedCheckpoint(path=path, sha256=sha256_bytes(manifest), files=files)


@dataclass
class LoadedCheckpoint:
    path: str
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    train_state: dict[str, Any]
    meta: dict[str, Any]
    extras: dict[str, bytes] = field(default_factory=dict)  # extra files by name (vocab, fisher, ...)


STANDARD_FILES = ("model.safetensors", "meta.json", "train_state.pt")


def verify_checkpoint(path: str, expected_sha256: str | None = None) -> dict[str, str]:
    """Check the manifest (against ``expected_sha256``) and every file's sha256."""
    fs, root = _fs(path)
    try:
        manifest_bytes = _read(fs, f"{root}/{MANIFEST}")
    except (FileNotFoundError, OSError):
        raise CheckpointCorrupt(f"checkpoint {path} has no {MANIFEST}: an incomplete write, not loadable") from None
    if expected_sha256 is not None and sha256_bytes(manifest_bytes) != expected_sha256:
        raise CheckpointCorrupt(
            f"checkpoint {path}: {MANIFEST} sha256 {sha256_bytes(manifest_bytes)} != recorded {expected_sha256}"
        )
    files = json.loads(manifest_bytes)["files"]
    for name, want in files.items():
        try:
            got = sha256_bytes(_read(fs, f"{root}/{name}"))
        except (FileNotFoundError, OSError):
            raise CheckpointCorrupt(f"checkpoint {path}: file {name} listed in the manifest is missing") from None
        if got != want:
            raise CheckpointCorrupt(f"checkpoint {path}: {name} has sha256 {got}, manifest says {want}")
    return files


def load_checkpoint(path: str, expected_sha256: str | None = None) -> LoadedCheckpoint:
    from safetensors.torch import load as st_load

    files = verify_checkpoint(path, expected_sha256)
    fs, root = _fs(path)
    model_state = st_load(_read(fs, f"{root}/model.safetensors"))
    meta = json.loads(_read(fs, f"{root}/meta.json"))
    opt_state, train_state = None, {}
    try:
        blob = torch.load(io.BytesIO(_read(fs, f"{root}/train_state.pt")), weights_only=False)
        opt_state, train_state = blob["optimizer"], blob["train_state"]
    except FileNotFoundError:
        pass
    extras = {name: _read(fs, f"{root}/{name}") for name in files if name not in STANDARD_FILES}
    return LoadedCheckpoint(path, model_state, opt_state, train_state, meta, extras)


def load_model(source: Any, sha256: str | None = None) -> torch.nn.Module:
    """The model of a checkpoint, verified and in eval mode. ``source``: a
    checkpoint path (with ``sha256``, the manifest's recorded digest), a
    ``{"path", "sha256"}`` dict as a training result gives it, or a ledger
    ``RunRecord`` (its recorded path and digest)."""
    from ..models import build_model

    if hasattr(source, "checkpoint_path"):  # a RunRecord (not imported: the lake needs no torch)
        path, sha256 = source.checkpoint_path, source.checkpoint_sha256
    elif isinstance(source, dict):
        path, sha256 = source["path"], source.get("sha256")
    else:
        path = source
    ck = load_checkpoint(path, sha256)
    model = build_model(ck.meta["model"], **ck.meta["model_params"])
    model.load_state_dict(ck.model_state)
    return model.eval()

"""Checkpoints in Hugging Face format, plus the state needed to resume. No ``ray`` here.

A checkpoint directory is a loadable model (``from_pretrained`` / ``pipeline``):
``config.json`` (with ``label2id``/``id2label``), ``model.safetensors`` and the tokenizer,
plus ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and ``trainer_state.json`` for
resume. The ``.pt`` files hold only tensors and plain containers and are read back with
``torch.load(weights_only=True)``, which refuses pickled code; model weights are only
ever safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from bertray import storage
from bertray.modeling import has_safetensors

STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: str | os.PathLike, model, tokenizer, optimizer, scheduler, scaler, state: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), path / "scaler.pt")
    (path / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, scaler) -> dict:
    """Restore model, optimizer, scheduler (and scaler) in place; return the trainer state."""
    path = Path(path)
    weights = load_file(path / "model.safetensors")
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(weights, strict=False)
    # Tied or buffer-only keys may be absent from safetensors; real weights must match.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def export_model(checkpoint_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the model part of a checkpoint to ``dest`` atomically (:mod:`bertray.storage`).

    The copy is staged in a hidden sibling of ``dest``, checked to hold a loadable model
    (``config.json`` and safetensors weights), then renamed into place: a reader of ``dest``
    sees the previous model or the new one, never a mix, and a failed export leaves the
    previous model as it was. ``dest`` may replace only a model folder (or an empty one).

    Raises:
        OutputError: ``dest`` is a file or a directory that is not a model folder.
    """
    fs, final = storage.filesystem(str(dest))
    storage.check_target(fs, final, str(dest), owned=_is_model_dir)
    with storage.staged(fs, final, str(dest)) as stage:
        shutil.copytree(checkpoint_dir, stage.path, ignore=shutil.ignore_patterns(*STATE_FILES), dirs_exist_ok=True)
        missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(stage.path, f))]
        if not has_safetensors(stage.path):
            missing.append("model.safetensors")
        if missing:
            raise RuntimeError(f"checkpoint {checkpoint_dir} lacks {missing}; nothing was exported to {dest}")
        storage.commit(fs, stage.path, final, owned=_is_model_dir)


def _is_model_dir(fs, path: str) -> bool:
    return storage.is_bertray_output(fs, path) or os.path.isfile(os.path.join(path, "config.json"))

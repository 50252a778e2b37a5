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
    """Copy the model part of a checkpoint to ``dest``, atomically (tmp dir + rename)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp, ignore=shutil.ignore_patterns(*STATE_FILES))
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)

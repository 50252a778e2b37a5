"""Checkpoints in Hugging Face format, plus the state needed to resume. No ``ray`` here.

A checkpoint directory is a loadable model (``from_pretrained`` / ``pipeline``):
``config.json`` (with ``label2id``/``id2label``), ``model.safetensors`` and the tokenizer
(its ``model_max_length`` is the training ``max_length``), plus ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt`` and ``trainer_state.json`` for resume. The ``.pt`` files hold only tensors and plain containers and are read back with
``torch.load(weights_only=True)``, which refuses pickled code; model weights are only
ever safetensors. Weights that are not finite are never saved or exported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bertray.errors import NonFiniteError

STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def weights_finite(model: torch.nn.Module) -> bool:
    """True when no parameter or buffer holds a NaN or an infinity (one pass over the weights)."""
    with torch.no_grad():
        checks = [torch.isfinite(t).all() for t in unwrap(model).state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def save_checkpoint(path: str | os.PathLike, model, tokenizer, optimizer, scheduler, scaler,
                    state: str | dict) -> None:
    """Write a checkpoint; ``state`` is the trainer state (JSON text, or a dict to dump)."""
    path = Path(path)
    if not weights_finite(model):
        raise NonFiniteError(f"refusing to save a checkpoint to {path}: the model's weights are not finite")
    path.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    torch.save(scaler.state_dict(), path / "scaler.pt")
    (path / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state, indent=2))


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, scaler) -> str:
    """Restore model, optimizer, scheduler and scaler in place; return the trainer state (JSON text)."""
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
    if (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return (path / "trainer_state.json").read_text()


def file_weights_finite(path: str | os.PathLike) -> bool:
    """:func:`weights_finite` for a ``model.safetensors`` file, one tensor at a time."""
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True


def export_model(checkpoint_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the model part of a checkpoint to ``dest``, atomically (tmp dir + rename).
    Refuses (:class:`NonFiniteError`) weights that are not finite."""
    if not file_weights_finite(Path(checkpoint_dir) / "model.safetensors"):
        raise NonFiniteError(f"checkpoint {checkpoint_dir} holds non-finite weights (NaN or infinity); not exported. "
                             "Train again with a lower train.lr or with train.max_grad_norm set")
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

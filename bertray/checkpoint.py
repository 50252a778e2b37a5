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

from bertray import storage
from bertray.calibration import fold_temperature
from bertray.errors import NonFiniteError
from bertray.modeling import has_safetensors

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


def export_model(checkpoint_dir: str | os.PathLike, dest: str | os.PathLike, temperature: float | None = None,
                 trust_remote_code: bool = False) -> None:
    """Copy the model part of a checkpoint to ``dest`` atomically (:mod:`bertray.storage`),
    with ``temperature`` folded into its classifier head when given (:mod:`bertray.calibration`).

    The copy is staged in a hidden sibling of ``dest``, checked to hold a loadable model
    (``config.json`` and safetensors weights), then renamed into place: a reader of ``dest``
    sees the previous model or the new one, never a mix, and a failed export leaves the
    previous model as it was. ``dest`` may replace only a model folder (or an empty one).

    Raises:
        OutputError: ``dest`` is a file or a directory that is not a model folder.
        NonFiniteError: the checkpoint's weights hold NaN or infinity.
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
        if temperature is not None:
            fold_temperature(stage.path, temperature, trust_remote_code)
        if not all(file_weights_finite(f) for f in Path(stage.path).glob("*.safetensors")):
            raise NonFiniteError(f"checkpoint {checkpoint_dir} holds non-finite weights (NaN or infinity); not "
                                 "exported. Train again with a lower train.lr or with train.max_grad_norm set")
        storage.commit(fs, stage.path, final, owned=_is_model_dir)


def _is_model_dir(fs, path: str) -> bool:
    return storage.is_bertray_output(fs, path) or os.path.isfile(os.path.join(path, "config.json"))

"""A run directory belongs to one run: its fingerprint, saved beside the checkpoints.

``<storage_path>/<name>/bertray_run.json`` (training) and ``<storage_path>/<name>-tune/bertray_run.json``
(a search) record what defines the run and its status. A rerun with the same fingerprint
resumes (or, when finished, says so); a different one is refused naming each differing key,
because resuming it would export the old run's model under the new run's name. Pure: no ray.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pyarrow import fs as pafs

from bertray.config_loader import to_dict
from bertray.errors import BertrayError

RUN_FILE = "bertray_run.json"
VERSION = 1

# What a resume may not change: the data and how it is read (the label map is added once
# known), the model, and every setting that shapes the optimisation or its step count.
# Left out on purpose: scaling (workers may change between attempts), output locations,
# logging, checkpoint retention, amp, data-pipeline tuning (tokenizer actors, buffers).
TRAIN_KEYS = (
    "data.train", "data.validation", "data.format", "data.text_column", "data.label_column",
    "data.text_pair_column", "data.label_separator", "model.problem_type",
    "data.drop_bad_rows", "data.validation_fraction", "data.max_train_rows", "data.max_validation_rows",
    "model.name", "model.num_hidden_layers", "model.freeze_encoder", "model.dropout",
    "train.epochs", "train.lr", "train.batch_size", "train.max_length", "train.scheduler", "train.warmup_ratio",
    "train.weight_decay", "train.grad_accum_steps", "train.max_grad_norm", "train.seed", "train.class_weights",
    "train.layer_lr_decay", "train.early_stopping_patience", "checkpoint.metric",
)
# A search is also defined by its space and scheduler (Tune would replay the pickled old ones).
TUNE_KEYS = TRAIN_KEYS + ("tune.space", "tune.num_samples", "tune.search_alg", "tune.grace_period",
                          "tune.reduction_factor")


class RunDirError(BertrayError):
    """A run directory that holds another run (or one of unknown origin)."""


def fingerprint(cfg, keys=TRAIN_KEYS) -> dict:
    """The values of ``keys`` (dotted) in ``cfg``, JSON-normalised so a reload compares equal."""
    flat = to_dict(cfg)
    out = {}
    for key in keys:
        value = flat
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def differences(old: dict, new: dict) -> list[str]:
    """``key: old → new`` for every key whose value differs (a key missing on one side is None)."""
    return [f"{k}: {json.dumps(old.get(k))} → {json.dumps(new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _fs(uri: str):
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _entries(uri: str) -> list[str]:
    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise RunDirError(f"{uri} is a file, not a run directory; give a new name or storage_path")
    return [Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(path))]


def occupied(uri: str) -> bool:
    """Whether ``uri`` exists with anything in it."""
    return bool(_entries(uri))


def has_checkpoints(uri: str) -> bool:
    """Whether an earlier attempt left checkpoints in ``uri`` (Ray Train names them checkpoint_*)."""
    return any(name.startswith("checkpoint_") for name in _entries(uri))


def read(uri: str) -> dict | None:
    """The saved record of the run in ``uri``, or None when there is none."""
    fs, path = _fs(uri)
    file = f"{path}/{RUN_FILE}"
    if fs.get_file_info(file).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(file) as f:
        return json.loads(f.read().decode())


def write(uri: str, record: dict) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):  # atomic where the filesystem allows it
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{RUN_FILE}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, f"{path}/{RUN_FILE}")
        return
    with fs.open_output_stream(f"{path}/{RUN_FILE}") as f:  # object stores write whole objects
        f.write(data)


def claim(uri: str, fp: dict, fresh_start: bool, what: str = "run", fix: str = "") -> str:
    """Make ``uri`` this run's directory; returns the previous status ("new", "running", "finished").

    Same fingerprint: resume. Another fingerprint, or entries with no record (an older bertray,
    or not a bertray run at all): refused unless ``fresh_start``, which deletes them first.
    """
    fix = fix or "give a new name or output_dir, or set fresh_start=true to delete the old run and start over"
    if fresh_start and _entries(uri):
        fs, path = _fs(uri)
        fs.delete_dir(path)
    entries = _entries(uri)
    record = read(uri) if RUN_FILE in entries else None
    if record is None and entries:
        raise RunDirError(f"{uri} already holds a {what} with no {RUN_FILE} (an older bertray or another tool), "
                          f"so it cannot be told whether it is this {what}; {fix}")
    if record is not None:
        diff = differences(record.get("fingerprint", {}), fp)
        if diff:
            raise RunDirError(f"{uri} holds another {what}; these settings differ (saved → now):\n  "
                              + "\n  ".join(diff) + f"\n{fix}")
        status = record.get("status", "running")
        if status == "finished":
            return status
        write(uri, {**record, "status": "running"})
        return status
    write(uri, {"version": VERSION, "status": "running", "fingerprint": fp})
    return "new"


def release(uri: str) -> None:
    """Undo a new :func:`claim` when the run fails before training starts: a run directory that
    holds only its record is removed (with its storage folder, if that is left empty), so a bad
    input leaves nothing behind."""
    if _entries(uri) != [RUN_FILE]:
        return
    fs, path = _fs(uri)
    fs.delete_dir(path)
    if "://" not in uri:
        try:
            os.rmdir(os.path.dirname(path))  # only if empty: other runs may share the storage
        except OSError:
            pass


def check_labels(uri: str, labels: list[str], fix: str = "") -> None:
    """Record the label map at the first attempt; a later attempt with other labels is another run."""
    record = read(uri) or {"version": VERSION, "status": "running", "fingerprint": {}}
    saved = record.get("labels")
    if saved is not None and saved != labels:
        fix = fix or "give a new name or output_dir, or set fresh_start=true to delete the old run and start over"
        raise RunDirError(f"{uri} holds a run with other labels: {saved} → {labels} (the data changed); {fix}")
    if saved is None:
        write(uri, {**record, "labels": labels})


def mark(uri: str, status: str) -> None:
    record = read(uri)
    if record is not None:
        write(uri, {**record, "status": status})


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """Refuse, before any cluster starts, an output directory that is a file or cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BertrayError(f"{key}={path} is a file; give a directory (a new or existing folder)")
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not existing.is_dir():
        raise BertrayError(f"{key}={path}: {existing} is a file, so the directory cannot be created; "
                           "give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BertrayError(f"{key}={path}: {existing} is not writable by this user; "
                           "give a directory you can write or fix its permissions")

"""Resumable predict: each input file's predictions are kept as a finished piece, so a rerun
of the same command after a failure predicts only the files that were not finished.

Pieces live in a hidden sibling of the output, ``.<name>.pieces/``:

- ``_command.json``: what the pieces were predicted with (the model's files, the output
  settings). Pieces of another command are discarded, never mixed in.
- ``<attempt>/<key>/part-<seq>.parquet``: one input file's predictions in row order, written
  by the run ``attempt`` (``key``: a hash of the file's path). Each run writes under its own
  attempt, so two runs never write the same file.
- ``<attempt>/<key>/_done.json``: written once every row of the input file is written: the
  file's path, size, modification time and rows, and the parts. A piece without it, or whose
  input file changed since, is predicted again.

The output is still committed in one step (:mod:`bertray.storage`): the pieces are moved into
the staging directory in input-file order, counted (rows in = rows out), ``_SUCCESS`` is
written, the stage is renamed into place, and the pieces directory is deleted.

Pure: pyarrow only, no ``ray``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bertray import storage

log = logging.getLogger(__name__)

COMMAND_FILE = "_command.json"
DONE_FILE = "_done.json"
SOURCE = "__bertray_source"
"""The column that carries each row's input file through the pipeline (dropped before writing)."""


@dataclass(frozen=True)
class Source:
    """One input file as the pieces know it."""

    path: str
    size: int
    mtime: str | None
    rows: int | None  # from the Parquet footer; None for CSV/JSONL (such pieces are never reused)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.path.encode()).hexdigest()[:20]

    def identity(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime": self.mtime, "rows": self.rows}


def sources(files: list[str], rows: dict[str, int] | None) -> list[Source]:
    """The input files with their size and modification time (one listing call)."""
    if not files:
        return []
    fs, _ = storage.filesystem(files[0])
    infos = fs.get_file_info([storage.filesystem(f)[1] for f in files])
    return [Source(f, int(i.size or 0), i.mtime.isoformat() if i.mtime else None, (rows or {}).get(f))
            for f, i in zip(files, infos, strict=True)]


def whole(name: str, inputs: list[Source]) -> Source:
    """Every input file as one piece (for inputs whose rows cannot carry their file's path)."""
    rows = None if any(s.rows is None for s in inputs) else sum(s.rows for s in inputs)
    mtimes = [s.mtime for s in inputs if s.mtime]
    return Source(f"{name} (all {len(inputs)} files)", sum(s.size for s in inputs), max(mtimes, default=None), rows)


def command(model_path: str, settings: dict) -> dict:
    """What a piece was predicted with: the model's files (config.json's content, the weights'
    sizes and times) and the settings that change an output row."""
    fs, path = storage.filesystem(model_path)
    files = sorted((i for i in fs.get_file_info(pafs.FileSelector(path)) if i.is_file), key=lambda i: i.path)
    with fs.open_input_stream(f"{path}/config.json") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    weights = [[i.base_name, i.size, i.mtime.isoformat() if i.mtime else None]
               for i in files if i.base_name.endswith(".safetensors")]
    return {"model": model_path, "config_sha256": config, "weights": weights, "settings": settings}


def directory(output: str) -> str:
    """The pieces directory of an output (a path or URI, as ``output``)."""
    return storage.sibling(output, f".{output.rstrip('/').rsplit('/', 1)[-1]}.pieces")


# ----------------------------------------------------------------------------- the driver's side


@dataclass(frozen=True)
class Resume:
    """What a run reuses and where it writes its own pieces."""

    fs: pafs.FileSystem
    root: str  # the pieces directory on ``fs``
    attempt: str  # this run's folder under it
    attempt_uri: str  # the same, as the writer opens it
    done: dict[str, list[str]]  # input path -> its finished parts (from any earlier attempt)


def prepare(uri: str, command: dict, inputs: list[Source]) -> Resume:
    """Discard another command's pieces, record this command, find the finished pieces."""
    fs, root = storage.filesystem(uri)
    text = json.dumps(command, sort_keys=True, indent=2)
    if storage.exists(fs, root) and _read(fs, f"{root}/{COMMAND_FILE}") != text:
        log.warning("discarding the pieces of another command (model or output settings differ) in %s", root)
        print(f"[bertray] discarding staged pieces of another command in {root}", flush=True)
        storage.delete(fs, root)
    fs.create_dir(root, recursive=True)
    storage.write_bytes(fs, f"{root}/{COMMAND_FILE}", text)
    attempt = uuid.uuid4().hex[:12]
    return Resume(fs, root, f"{root}/{attempt}", f"{uri.rstrip('/')}/{attempt}", _finished(fs, root, inputs))


def _finished(fs: pafs.FileSystem, root: str, inputs: list[Source]) -> dict[str, list[str]]:
    """Input path -> parts of its finished piece, for the inputs whose file is unchanged."""
    want = {s.path: s.identity() for s in inputs if s.rows is not None}
    found: dict[str, list[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if not info.path.endswith("/" + DONE_FILE):
            continue
        record = _record(fs, info.path)
        source = record.get("source", {})
        parts = record.get("parts", [])
        if want.get(source.get("path")) == source and all(storage.exists(fs, p) for p in parts):
            found[source["path"]] = parts
    return found


def _record(fs: pafs.FileSystem, path: str) -> dict:
    """A ``_done.json``'s content; {} when it is unreadable (a run killed while writing it)."""
    try:
        found = json.loads(_read(fs, path) or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _read(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (OSError, UnicodeDecodeError):
        return None


def collect(resume: Resume, inputs: list[Source], stage_path: str) -> int:
    """Move every input's parts into ``stage_path`` (on the same filesystem) in input order;
    returns the files moved.

    Raises:
        RuntimeError: an input file has no finished piece (nothing is committed).
    """
    fs = resume.fs
    finished = {**resume.done, **_finished(fs, resume.attempt, inputs), **_unchecked(fs, resume.attempt)}
    moved = 0
    for index, source in enumerate(inputs):
        parts = finished.get(source.path, [] if source.rows == 0 else None)  # an empty file has no rows to write
        if parts is None:
            raise RuntimeError(f"no predictions were written for {source.path}; nothing was committed")
        for seq, part in enumerate(parts):
            try:
                fs.move(part, f"{stage_path}/part-{index:05d}-{seq:05d}.parquet")
            except FileNotFoundError:
                raise RuntimeError(f"the finished predictions of {source.path} ({part}) were removed while this run "
                                   "ran (another run of the same command committed them?); nothing was "
                                   "committed: rerun") from None
            moved += 1
    return moved


def _unchecked(fs: pafs.FileSystem, attempt: str) -> dict[str, list[str]]:
    """This run's pieces of inputs with no footer row count (CSV/JSONL): the total is checked later."""
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(attempt, recursive=True, allow_not_found=True)):
        if info.path.endswith("/" + DONE_FILE):
            record = _record(fs, info.path)
            if record and record["source"]["rows"] is None:
                found[record["source"]["path"]] = record["parts"]
    return found


def discard(resume: Resume) -> None:
    """Delete the pieces once the output is committed (a failure here only leaves them behind)."""
    try:
        storage.delete(resume.fs, resume.root)
    except OSError as e:
        log.warning("could not delete the finished pieces in %s (%s); delete them by hand", resume.root, e)


# ----------------------------------------------------------------------------- the writer


class PieceWriter:
    """Ray Data callable class (one actor, so batches arrive in input order): writes each
    input file's rows as parts under the attempt folder, and ``_done.json`` once the file's
    rows are all written. Returns one row per part: the input path and the rows written."""

    def __init__(self, attempt_uri: str, inputs: list[dict]):
        self.fs, self.attempt = storage.filesystem(attempt_uri)
        self.inputs = {s["path"]: Source(**s) for s in inputs}
        self.parts: dict[str, list[str]] = {}
        self.rows: dict[str, int] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column(SOURCE).to_pylist()
        data = batch.drop_columns([SOURCE])
        written = {"path": [], "rows": []}
        start = 0
        for i in range(1, len(paths) + 1):  # runs of rows from one input file
            if i == len(paths) or paths[i] != paths[start]:
                self._write(paths[start], data.slice(start, i - start))
                written["path"].append(paths[start])
                written["rows"].append(i - start)
                start = i
        return pa.table(written, schema=pa.schema([("path", pa.string()), ("rows", pa.int64())]))

    def _write(self, path: str, rows: pa.Table) -> None:
        source = self.inputs[path]
        folder = f"{self.attempt}/{source.key}"
        parts = self.parts.setdefault(path, [])
        if not parts:
            self.fs.create_dir(folder, recursive=True)
        part = f"{folder}/part-{len(parts):05d}.parquet"
        with self.fs.open_output_stream(part) as f:
            pq.write_table(rows, f)
        parts.append(part)
        self.rows[path] = self.rows.get(path, 0) + rows.num_rows
        if source.rows is None or self.rows[path] == source.rows:
            record = {"source": source.identity(), "parts": parts}
            storage.write_bytes(self.fs, f"{folder}/{DONE_FILE}", json.dumps(record))

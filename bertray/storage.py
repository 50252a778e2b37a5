"""The staged-output transaction shared by predict, evaluate and model export.

A writer never writes into its final path. It stages everything in a hidden sibling
``.<name>.tmp-<id>``, verifies it, and only then commits:

- On a local or shared filesystem by ``rename``: an existing output is renamed aside to
  ``.<name>.old-<id>``, the staged one renamed in, the old one deleted. A reader sees the
  old output or the new one, never a mix; a run that fails or is killed leaves the final
  path as it was (a kill between the two renames leaves the old output at ``.old-<id>``).
- On object stores (s3://, gs://), which have no rename: the files are copied to the final
  prefix with ``_SUCCESS`` last, so readers there must wait for ``_SUCCESS`` (not atomic).

Only a previous bertray output may be replaced: an output directory whose ``_SUCCESS`` is a
JSON object (bertray writes its run summary there; Spark and Hadoop write an empty one), an
empty directory, or whatever the caller's ``owned`` rule accepts (model export: a model
folder). A plain file, or a directory bertray did not write, is refused and left as it is.

A failed run deletes its staging directory; a killed one cannot, and the next run reports
the leftovers (:func:`stale_leftovers`) without deleting them: another run may be writing.

Pure module: pyarrow's filesystems only, no ``ray``, no work at import.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow.fs as pafs

from bertray.errors import BertrayError

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"
"""The marker written last into every committed output: bertray's run summary, JSON."""

Owned = Callable[[pafs.FileSystem, str], bool]


class OutputError(BertrayError):
    """The output path cannot be written or holds something bertray must not replace."""


class OutputExistsError(OutputError):
    """The output exists and ``on_existing=error``."""


# ----------------------------------------------------------------------------- paths


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or any pyarrow URI (s3://, gs://)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def sibling(path: str, name: str) -> str:
    """``name`` in the directory that holds ``path`` (works on URIs and filesystem paths)."""
    return path.rstrip("/").rsplit("/", 1)[0] + "/" + name


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def write_bytes(fs: pafs.FileSystem, path: str, data: str | bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def stale_leftovers(fs: pafs.FileSystem, final: str) -> list[str]:
    """Staging and set-aside directories of earlier killed runs next to ``final``."""
    parent, name = final.rstrip("/").rsplit("/", 1)
    infos = fs.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True))
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    return sorted(i.path for i in infos if os.path.basename(i.path).startswith(prefixes))


# ----------------------------------------------------------------------------- what may be replaced


def is_bertray_output(fs: pafs.FileSystem, path: str) -> bool:
    """A directory bertray committed: its ``_SUCCESS`` holds a JSON object."""
    try:
        with fs.open_input_stream(f"{path}/{SUCCESS_FILE}") as f:
            return isinstance(json.loads(f.read()), dict)
    except (OSError, ValueError):  # absent, unreadable, empty (Spark's) or not JSON
        return False


def _is_empty_dir(fs: pafs.FileSystem, path: str) -> bool:
    return not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def check_target(fs: pafs.FileSystem, final: str, shown: str, on_existing: str = "overwrite",
                 owned: Owned = is_bertray_output) -> None:
    """Refuse, before any work, an output that this run could not commit.

    ``shown`` is the path as the user wrote it (a URI for object stores), for messages.

    Raises:
        OutputExistsError: ``final`` exists and ``on_existing=error``.
        OutputError: ``final`` is a file or a directory that is not a previous bertray output,
            or (locally) its parent cannot be created or written.
    """
    info = fs.get_file_info(final)
    if info.type == pafs.FileType.NotFound:
        if isinstance(fs, pafs.LocalFileSystem):
            _check_writable(final, shown)
        return
    if on_existing == "error":
        raise OutputExistsError(f"output {shown} already exists and on_existing=error; pass on_existing=overwrite "
                                "to replace it, or another output/date. The existing output was not touched.")
    _check_replaceable(fs, final, shown, owned)


def _check_replaceable(fs: pafs.FileSystem, final: str, shown: str, owned: Owned) -> None:
    info = fs.get_file_info(final)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {shown} is an existing file, not a previous bertray output; it was left "
                          "untouched. Choose another output path (or move the file away yourself).")
    if info.type == pafs.FileType.Directory and not (owned(fs, final) or _is_empty_dir(fs, final)):
        raise OutputError(f"output {shown} is a directory that bertray did not write (no bertray {SUCCESS_FILE} "
                          "in it); it was left untouched. Choose another output path, or move or delete that "
                          "directory yourself if it is really disposable.")


def _check_writable(final: str, shown: str) -> None:
    """The nearest existing ancestor of a local ``final`` is a directory this process can write."""
    parent = os.path.dirname(final.rstrip("/")) or "/"
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"output {shown}: {parent} is a file, so the output directory cannot be created there; "
                          "choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output {shown}: no permission to write in {parent}; choose a writable output path")


# ----------------------------------------------------------------------------- stage and commit


@dataclass(frozen=True)
class Stage:
    """A staging directory: ``path`` on ``fs`` (what pyarrow writes), ``uri`` (what Ray Data writes)."""

    fs: pafs.FileSystem
    path: str
    uri: str
    final: str


@contextmanager
def staged(fs: pafs.FileSystem, final: str, shown: str) -> Iterator[Stage]:
    """A fresh hidden sibling of ``final`` to write into; deleted if the block raises.

    The block ends with :func:`commit` (after which the staging directory is gone).
    """
    name = f".{final.rstrip('/').rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:12]}"
    stage = Stage(fs, sibling(final, name), sibling(shown, name), final)
    fs.create_dir(stage.path, recursive=True)
    try:
        yield stage
    except BaseException:
        try:
            delete(fs, stage.path)
        except Exception as cleanup:  # keep the original error
            log.warning("could not delete %s: %s", stage.path, cleanup)
        raise


def commit(fs: pafs.FileSystem, tmp: str, final: str, on_existing: str = "overwrite",
           owned: Owned = is_bertray_output) -> None:
    """Move the complete, verified ``tmp`` to ``final`` (see the module docstring).

    The output rule is checked again here: something may have appeared at ``final`` while
    the run was writing.

    Raises:
        OutputExistsError, OutputError: as :func:`check_target`; ``tmp`` is left for the caller to delete.
    """
    if exists(fs, final):
        if on_existing == "error":
            raise OutputExistsError(f"output {final} appeared while this run was writing and on_existing=error; "
                                    "the new output was discarded and the existing one left untouched")
        _check_replaceable(fs, final, final, owned)
    if isinstance(fs, pafs.LocalFileSystem):
        _rename_into_place(fs, tmp, final)
    else:
        _copy_into_place(fs, tmp, final)


def _rename_into_place(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    if not os.path.lexists(final):
        # Fails (rather than merging) if a non-empty directory or a file appeared meanwhile.
        os.rename(tmp, final)
        return
    old = sibling(final, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:12]}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)  # put the previous output back
        raise
    try:
        delete(fs, old)
    except OSError as e:  # committed; the old copy is only garbage now
        log.warning("could not delete the previous output %s: %s", old, e)


def _copy_into_place(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    """Object stores: no rename. Copy everything but ``_SUCCESS``, then ``_SUCCESS``, then drop ``tmp``."""
    if exists(fs, final):
        fs.delete_dir(final)
    fs.create_dir(final, recursive=True)  # a no-op on object stores, needed on filesystems with directories
    marker = None
    for info in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        if info.path == f"{tmp}/{SUCCESS_FILE}":
            marker = info.path
            continue
        target = final + info.path[len(tmp):]
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(info.path, target)
    if marker:
        fs.copy_file(marker, f"{final}/{SUCCESS_FILE}")
    fs.delete_dir(tmp)

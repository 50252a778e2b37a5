"""Input listing: the files behind a path, directory or glob, the same way for train, predict and evaluate.

Conventions are those of Spark, Hive and pyarrow's dataset discovery: below the path given, every
file or directory whose name starts with ``_`` or ``.`` is skipped (``_SUCCESS``, ``_temporary/``,
``.staging/``, a killed writer's hidden temp folder, ``.crc`` side files). Globs have shell
semantics: ``*``, ``?`` and ``[...]`` match within one path component, ``**`` matches any number of
directories. Local paths and any pyarrow filesystem URI (``s3://``, ``gs://``) work alike.

Pure module: pyarrow only, no ``ray``, no work at import.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pyarrow.fs as pafs

from bertray.errors import DataError

# The small example data shipped with the package: the default ``{data_root}``.
EXAMPLE_DATA = Path(__file__).resolve().parent / "example_data"
HIDDEN = ("_", ".")
_GLOB_CHARS = "*?["


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: a path for a pyarrow filesystem, not a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers may run in another directory, e.g. under
    ``ray job submit --working-dir``); URIs, ``hf:`` and ``models:/`` names and "" unchanged."""
    if not path or is_uri(path) or path.startswith(("hf:", "models:/")):
        return path
    return str(Path(path).expanduser().absolute())


def default_data_root() -> str:
    """$BERTRAY_DATA_ROOT, else the example data shipped inside the package (an absolute path
    through the package's own location, so it holds in a clone, a pip install and the copy
    that ``ray job submit --working-dir .`` unpacks)."""
    return os.environ.get("BERTRAY_DATA_ROOT") or str(EXAMPLE_DATA)


def is_glob(path: str) -> bool:
    return any(ch in path for ch in _GLOB_CHARS)


def list_files(path: str) -> list[str]:
    """Files behind ``path``, sorted: the file itself, every visible file under a directory, or a glob's matches.

    Returned paths are absolute local paths, or URIs with the scheme of ``path``.

    Raises:
        DataError: nothing matches ``path``, naming it and the forms accepted.
    """
    scheme, rest = path.split("://", 1) if is_uri(path) else ("", os.path.abspath(os.path.expanduser(path)))
    base, pattern = _split_glob(rest)
    fs, fs_base = _filesystem(scheme, base)
    if pattern:
        found = _glob(fs, fs_base, pattern)
    else:
        info = fs.get_file_info(fs_base)
        if info.type == pafs.FileType.File:
            found = [fs_base]
        elif info.type == pafs.FileType.Directory:
            found = _walk(fs, fs_base, recursive=True)
        else:
            found = []
    if not found:
        raise DataError(f"no data files found at {path!r}: check the path (a file, a directory, or a glob like "
                        f"data/*.parquet or data/**/*.parquet); names starting with '_' or '.' are skipped")
    prefix = f"{scheme}://" if scheme else ""
    return sorted(prefix + f for f in found)


def _split_glob(path: str) -> tuple[str, str]:
    """(the literal directory part, the pattern below it); the pattern is "" for a plain path."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if is_glob(part):
            return "/".join(parts[:i]) or "/", "/".join(parts[i:])
    return path, ""


def _filesystem(scheme: str, base: str) -> tuple[pafs.FileSystem, str]:
    if not scheme:
        return pafs.LocalFileSystem(), base
    return pafs.FileSystem.from_uri(f"{scheme}://{base}")


def _walk(fs: pafs.FileSystem, base: str, recursive: bool) -> list[str]:
    """Visible files under ``base``; a hidden directory is not descended into."""
    base = base.rstrip("/")
    selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
    files = []
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and not _hidden(info.path[len(base) + 1:]):
            files.append(info.path)
    return files


def _hidden(relative: str) -> bool:
    return any(part.startswith(HIDDEN) for part in relative.split("/"))


def _glob(fs: pafs.FileSystem, base: str, pattern: str) -> list[str]:
    pats = pattern.split("/")
    # A pattern in the last component only ("dir/*.parquet") lists one directory level: on an
    # object store each level listed is a round trip per prefix.
    recursive = len(pats) > 1 or "**" in pats
    base = base.rstrip("/") or "/"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
    cut = len(base.rstrip("/")) + 1
    return [i.path for i in infos
            if i.type == pafs.FileType.File and _match(i.path[cut:].split("/"), pats)]


def _match(parts: list[str], pats: list[str]) -> bool:
    """Shell-style match of path components. ``**`` spans zero or more visible directories; a
    name starting with ``_`` or ``.`` matches only a pattern that starts with the same character."""
    if not pats:
        return not parts
    if not parts:
        return pats == ["**"]
    head, pat = parts[0], pats[0]
    if pat == "**":
        if _match(parts, pats[1:]):
            return True
        return not head.startswith(HIDDEN) and _match(parts[1:], pats)
    if head.startswith(HIDDEN) and not pat.startswith(head[0]):
        return False
    return fnmatch.fnmatchcase(head, pat) and _match(parts[1:], pats[1:])

"""Find the line that makes a CSV or JSONL file unreadable, to name it in the error.

Arrow's readers report a bad byte or a malformed JSON line without the file, and with a row
number counted inside one block. Bad input is rare, so bertray reads at full speed and, only
when a read fails (or a CSV text column comes back as bytes), reads the files again here,
line by line, to say which file and which line to fix.

Pure module: pyarrow only, no ``ray``, no work at import.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

import pyarrow.fs as pafs

from bertray.paths import is_uri


def find_bad_line(path: str, fmt: str) -> str | None:
    """The first problem in a CSV (``fmt="csv"``) or JSONL (``fmt="json"``) file, as a message
    naming the file, the line (1-based, as editors count) and the fix; ``None`` if every line is
    valid UTF-8 and, for JSONL, one JSON object (blank lines allowed)."""
    for number, raw in enumerate(_lines(path), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"{path}: line {number}: not valid UTF-8 (byte {e.start + 1} of the line is "
                    f"{raw[e.start:e.start + 1]!r}). Save the file as UTF-8 (for example "
                    f"`iconv -f latin1 -t utf-8`) or fix that line.")
        if fmt == "json" and line.strip():
            problem = _json_problem(line)
            if problem:
                return (f"{path}: line {number}: {problem}. JSONL needs one JSON object per line: "
                        f"fix or remove that line.")
    return None


def find_first_bad_line(paths: Iterable[str], fmt: str) -> str | None:
    """:func:`find_bad_line` over several files; the first problem found."""
    for path in paths:
        problem = find_bad_line(path, fmt)
        if problem:
            return problem
    return None


def _json_problem(line: str) -> str | None:
    try:
        value = json.loads(line)
    except ValueError as e:
        return f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    return None


def _lines(path: str):
    if is_uri(path):
        fs, fs_path = pafs.FileSystem.from_uri(path)
    else:
        fs, fs_path = pafs.LocalFileSystem(), path
    # open_input_stream also undoes .gz/.zst/.bz2 compression, as Arrow's readers do.
    with fs.open_input_stream(fs_path) as stream:
        yield from io.BufferedReader(stream)

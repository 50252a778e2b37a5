"""Column rules shared by training, predict and evaluate: what a text column is, its null/empty
counts, and the "column not found" message.

Pure module: pyarrow only, no ``ray``, no work at import.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc


def is_text_type(t: pa.DataType) -> bool:
    """String columns in any Arrow layout (also dictionary-encoded), and all-null columns."""
    if pa.types.is_dictionary(t):
        return is_text_type(t.value_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _plain(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _blank(col: pa.ChunkedArray | pa.Array):
    """True where a non-null text is empty or whitespace only, null where the text is null."""
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)


def text_stats(col: pa.ChunkedArray | pa.Array) -> tuple[int, int]:
    """(null texts, empty or whitespace-only texts) of a text column."""
    if pa.types.is_null(col.type):
        return len(col), 0
    col = _plain(col)
    return col.null_count, int(pc.sum(_blank(col)).as_py() or 0)


def usable_text(col: pa.ChunkedArray | pa.Array):
    """Boolean mask: the text is neither null nor empty/whitespace only (the rows
    :func:`text_stats` does not count)."""
    if pa.types.is_null(col.type):
        return pa.array([False] * len(col))
    return pc.fill_null(pc.invert(_blank(_plain(col))), False)


def missing_column(path: str, column: str, available: Iterable[str], key: str | None = None) -> str:
    """The message for a column that is not in the data: the file, the column, the config key that
    named it, the columns there are, and the fix."""
    names = list(available)
    source = f" (from {key})" if key else ""
    fix = f" Set {key}=<one of those>." if key else " Use one of those."
    return f"{path}: column {column!r}{source} not found; columns in the data: {names}.{fix}"

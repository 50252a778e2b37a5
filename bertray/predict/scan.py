"""The input scan: one streaming pass, in Ray tasks of about a million rows each, that decodes every
page and keeps nothing.

It counts rows, null and empty texts and labels, and finds damaged pages and malformed
files before any prediction work, naming the file (Ray's readers would fail mid-run
without the name). In evaluate mode, null labels and labels unknown to the model fail
here, with counts. Decoding costs far less than the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bertray.columns import is_text_type, missing_column, text_stats
from bertray.errors import DataError
from bertray.labels import label_key
from bertray.paths import list_files
from bertray.storage import filesystem

FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "json": "JSONL"}
SCAN_BATCH_ROWS = 65536
SCAN_TASK_ROWS = 1_000_000
SCAN_TASK_FILES = 64
"""A scan task reads files until it has this many rows (known from the Parquet footers) or files.
A task per small file would start a worker process per file (seconds each, on a fresh many-core
node) to read it in milliseconds; a million short rows decode in about half a second, and 64 files
bound the task's time spent opening files on an object store."""

# ----------------------------------------------------------------------------- listing


def input_files(path: str) -> list[str]:
    """The data files behind the ``input`` file, directory or glob.

    Raises:
        DataError: nothing found at ``path``.
    """
    return list_files(path)


def parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The Parquet files predict wrote under ``directory`` (its own staging directory)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and not i.path.rsplit("/", 1)[-1].startswith(("_", ".")))


# ----------------------------------------------------------------------------- schemas


def parquet_footers(files: list[str]) -> dict[str, pq.FileMetaData]:
    """Footer (row count, schema) of every file; no data pages are read.

    Raises:
        DataError: naming the first file that is not readable Parquet.
    """
    if not files:
        return {}
    fs, _ = filesystem(files[0])

    def footer(f: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(filesystem(f)[1], filesystem=fs)
        except Exception as e:  # ArrowInvalid (not Parquet), OSError (truncated, unreadable)
            raise DataError(unreadable(f, e)) from e

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return dict(zip(files, pool.map(footer, files), strict=True))


def unreadable(path: str, err: Exception | str, fmt: str = "parquet") -> str:
    cause = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return f"{path}: not a readable {FORMAT_NAMES[fmt]} file ({cause.strip()}). Remove or replace this file."


def schema_problem(path: str, schema: pa.Schema, required: dict[str, str]) -> str | None:
    """What is wrong with one file's columns (``required``: config key -> column), or None."""
    for key, col in required.items():
        if col not in schema.names:
            return missing_column(path, col, schema.names, key)
    text_key, text_col = next(iter(required.items()))
    t = schema.field(text_col).type
    if not is_text_type(t):
        return f"{path}: column {text_col!r} ({text_key}) has type {t}; it must hold strings"
    return None


@contextmanager
def open_table(path: str, fmt: str) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    """``(schema, record batches)`` of one Parquet, CSV or JSONL file, read with pyarrow's own readers
    (those Ray Data uses); compressed CSV/JSONL (``.gz``, ``.zst``...) is detected from the name."""
    fs, fs_path = filesystem(path)
    if fmt == "parquet":
        with fs.open_input_file(fs_path) as fh:
            pf = pq.ParquetFile(fh)
            yield pf.schema_arrow, pf.iter_batches(batch_size=SCAN_BATCH_ROWS)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        with fs.open_input_stream(fs_path) as fh:
            reader = pacsv.open_csv(fh)
            yield reader.schema, iter(reader)
    else:
        import pyarrow.json as pajson

        with fs.open_input_stream(fs_path) as fh:
            table = pajson.read_json(fh)
            yield table.schema, iter(table.to_batches(SCAN_BATCH_ROWS))


def read_schema(path: str, fmt: str) -> pa.Schema:
    with open_table(path, fmt) as (schema, _):
        return schema


# ----------------------------------------------------------------------------- the scan


@dataclass
class ScanStats:
    rows: int = 0
    null: int = 0  # null texts
    empty: int = 0  # empty or whitespace-only texts (not null)
    labels: dict = field(default_factory=dict)  # label key (None: null label) -> rows


def _count_labels(col: pa.ChunkedArray | pa.Array, labels: dict) -> None:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_floating(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return  # values or label lists (regression, multi-label): the evaluation checks them
    for c in pc.value_counts(col).to_pylist():
        key = None if c["values"] is None else label_key(c["values"])
        labels[key] = labels.get(key, 0) + c["counts"]


def scan_file(path: str, fmt: str, required: dict[str, str]) -> dict:
    """One input file: rows, null/empty texts, label counts; a problem is reported, not raised."""
    rec = {"file": path, "rows": 0, "null": 0, "empty": 0, "labels": "[]", "error": "", "problem": ""}
    text_col, label_col = required["text_column"], required.get("label_column")
    labels: dict = {}
    try:
        with open_table(path, fmt) as (schema, batches):
            rec["problem"] = schema_problem(path, schema, required) or ""
            # Every column is decoded (not only text and label) so that any damaged page is found
            # here, named, before prediction starts.
            for batch in [] if rec["problem"] else batches:
                nulls, empty = text_stats(batch.column(text_col))
                rec["rows"] += batch.num_rows
                rec["null"] += nulls
                rec["empty"] += empty
                if label_col:
                    _count_labels(batch.column(label_col), labels)
    except Exception as e:  # a damaged page, a malformed line: report it with the file name
        rec["error"] = unreadable(path, e, fmt)
    rec["labels"] = json.dumps(list(labels.items()))
    return rec


def scan_task(row: dict, fmt: str, required: dict[str, str]) -> list[dict]:
    """One scan task: :func:`scan_file` of each of its files."""
    return [scan_file(path, fmt, required) for path in row["files"]]


def scan_groups(files: list[str], file_rows: dict[str, int] | None) -> list[list[str]]:
    """The files in order, cut into tasks of :data:`SCAN_TASK_ROWS` rows or :data:`SCAN_TASK_FILES`
    files, whichever comes first; a task per file when the rows are unknown (CSV/JSONL)."""
    if file_rows is None:
        return [[f] for f in files]
    groups: list[list[str]] = [[]]
    rows = 0
    for f in files:
        if rows >= SCAN_TASK_ROWS or len(groups[-1]) >= SCAN_TASK_FILES:
            groups.append([])
            rows = 0
        groups[-1].append(f)
        rows += file_rows[f]
    return groups


def scan_input(input_path: str, files: list[str], fmt: str, required: dict[str, str],
               file_rows: dict[str, int] | None) -> ScanStats:
    """Scan every file in parallel Ray tasks and sum the counts.

    ``file_rows``: each file's rows from its Parquet footer (None for CSV/JSONL); they size the
    tasks, and the rows read must add up to them.

    Raises:
        DataError: an unreadable file, a bad schema (CSV/JSONL), or Parquet footers that
            disagree with the rows read (the input changed during the run).
    """
    import ray.data

    from bertray.data import TASK_CPUS  # scan tasks import this module: it stays free of torch

    scans = ray.data.from_items([{"files": g} for g in scan_groups(files, file_rows)]).flat_map(
        scan_task, num_cpus=TASK_CPUS, fn_kwargs={"fmt": fmt, "required": required})
    stats, problems = ScanStats(), []
    for rec in scans.iter_rows():
        problems += [p for p in (rec["error"], rec["problem"]) if p]
        stats.rows += rec["rows"]
        stats.null += rec["null"]
        stats.empty += rec["empty"]
        for key, n in json.loads(rec["labels"]):
            stats.labels[key] = stats.labels.get(key, 0) + n
    if problems:
        raise DataError("; ".join(sorted(problems)))
    if file_rows is not None and stats.rows != (footer_rows := sum(file_rows.values())):
        raise DataError(f"{input_path}: Parquet footers say {footer_rows} rows but reading gives {stats.rows}; "
                        "the input changed during the run. Run again once it is complete.")
    return stats


def check_labels(input_path: str, label_column: str, labels: dict, label2id: dict[str, int]) -> None:
    """Evaluate mode: every row has a label, and the model knows every label.

    Raises:
        DataError: with the counts of null and unknown labels.
    """
    if labels.get(None):
        raise DataError(f"{input_path}: {labels[None]} row(s) have a null label in column {label_column!r}; "
                        "evaluation needs a label on every row (or unset label_column to only predict)")
    unknown = {k: n for k, n in labels.items() if k not in label2id}
    if unknown:
        detail = ", ".join(f"{k!r} ({n} rows)" for k, n in sorted(unknown.items()))
        raise DataError(f"{input_path}: label(s) in column {label_column!r} unknown to the model: {detail}. "
                        f"The model's labels (label2id): {list(label2id)}.")

"""Ray Data side of the pipeline: read labelled text, check it, split it, tokenize it.

Reading and tokenizing stream: nothing here materializes the corpus. One cheap scan
pass (text and label columns only) finds bad rows and the label set before training
starts, so problems surface as one clear error instead of a crash mid-epoch.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data import ActorPoolStrategy

from bertray.columns import is_text_type, missing_column, text_stats, usable_text
from bertray.config import DataConfig
from bertray.errors import DataError
from bertray.filecheck import find_first_bad_line
from bertray.labels import (
    build_label_map,
    check_classes,
    encode_labels,
    label_key,
    label_value,
    similar_labels,
)
from bertray.paths import list_files
from bertray.tokenization import encode_flat

log = logging.getLogger(__name__)

# Every Ray Data task here asks for a fraction of a CPU. A task that asks for a whole CPU
# (Ray Data's default) cannot be scheduled beside training workers and a tokenizer actor
# on a small machine, and ingest would stall at 0 rows. For the same reason the pipeline
# uses no select_columns/rename_columns (default-CPU tasks): the tokenizer picks columns.
TASK_CPUS = 0.25
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# Arrow's readers (and Ray's) undo these from the file name.
_COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")

# predict.py lists its input with this name until it calls list_files itself.
expand_paths = list_files


# ----------------------------------------------------------------------------- reading


def _format_of(path: str) -> str | None:
    root, ext = os.path.splitext(path.lower())
    if ext in _COMPRESSIONS:
        ext = os.path.splitext(root)[1]
    return _EXTENSIONS.get(ext)


def detect_format(files: list[str], fmt: str) -> str:
    """``fmt``, or with ``auto`` the one format all ``files`` have by their extension.

    Raises:
        DataError: unknown extensions or a mix of formats, naming files and the fix.
    """
    if fmt != "auto":
        return fmt
    kinds = {f: _format_of(f) for f in files}
    unknown = [f for f, k in kinds.items() if k is None]
    if unknown:
        raise DataError(f"cannot tell the format of {unknown[:3]} from the file name: use .parquet/.csv/.jsonl "
                        "names, or set data.format (predict: Parquet only)")
    if len(set(kinds.values())) > 1:
        raise DataError(f"the input mixes formats ({sorted(set(kinds.values()))}): give one format per path")
    return next(iter(kinds.values()))


def _is_hf_dataset(path: str) -> bool:
    return path.startswith("hf:") or (os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json"))))


def _read_hf(path: str, split: str | None) -> ray.data.Dataset:
    import datasets

    if path.startswith("hf:"):
        name, _, hf_split = path[3:].partition(":")
        ds = datasets.load_dataset(name, split=hf_split or split or "train")
    else:
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
    return ray.data.from_huggingface(ds)


def read_table(path: str, fmt: str = "auto", columns: list[str] | None = None, include_paths: bool = False,
               hf_split: str | None = None, files: list[str] | None = None) -> ray.data.Dataset:
    """A Ray Dataset over Parquet/CSV/JSONL at ``path`` (or a Hugging Face dataset).

    ``files``: ``list_files(path)`` when the caller has it already; on an object store each
    listing is a round trip per directory level, so a caller that reads a path several times
    lists it once.
    """
    if _is_hf_dataset(path):
        ds = _read_hf(path, hf_split)
        if include_paths:
            ds = ds.add_column("path", lambda b: pd.Series([path] * len(b)), batch_format="pandas")
        return ds
    files = files or list_files(path)
    fmt = detect_format(files, fmt)
    if fmt == "parquet":
        # Ray 2.60's DataSourceV2 Parquet path adds a ListFiles task that always asks for a
        # whole CPU; beside training workers on a small machine it never schedules and
        # ingest stalls at 0 rows. We list files ourselves, so the V1 reader (whose tasks
        # take TASK_CPUS) loses nothing. read_parquet picks the reader when it is called and
        # the Dataset keeps its own copy of the context, so the switch is undone right after:
        # the caller's other reads keep their DataContext as it was.
        ctx = ray.data.DataContext.get_current()
        before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            return ray.data.read_parquet(files, columns=columns, include_paths=include_paths, num_cpus=TASK_CPUS)
        finally:
            ctx.use_datasource_v2 = before
    if fmt == "csv":
        return ray.data.read_csv(files, include_paths=include_paths, num_cpus=TASK_CPUS)
    return ray.data.read_json(files, lines=True, include_paths=include_paths, num_cpus=TASK_CPUS)


def check_inputs(cfg: DataConfig) -> None:
    """Fail fast, before Ray starts, when a configured data path holds no files or files of no
    format bertray reads.

    Raises:
        DataError: naming the path and the config key.
    """
    for key, path in (("data.train", cfg.train), ("data.validation", cfg.validation)):
        if path and not _is_hf_dataset(path):
            try:
                detect_format(list_files(path), cfg.format)
            except DataError as e:
                raise DataError(f"{key}: {e}") from None


def check_columns(ds: ray.data.Dataset, path: str, required: dict[str, str]) -> None:
    """``required`` maps config key -> column name. Raises DataError listing the columns that exist."""
    names = list(ds.schema().names)
    for key, col in required.items():
        if col not in names:
            raise DataError(missing_column(path, col, names, key))


# ----------------------------------------------------------------------------- scan


@dataclass
class ScanReport:
    rows: int
    usable_rows: int  # rows with a text and a label (both sides of a holdout split)
    label_counts: dict  # label_value -> usable rows (with a holdout: its training side only)
    bad: dict  # file -> {"null_text": n, "empty_text": n, "null_label": n}
    text_types: dict  # file -> Arrow type of a text column that does not hold text

    @property
    def bad_rows(self) -> int:
        return self.rows - self.usable_rows


def _has_label(col: pa.ChunkedArray | pa.Array):
    """Boolean mask: the label is present (not null, and not NaN in a float column)."""
    present = pc.is_valid(col)
    if pa.types.is_floating(col.type):
        present = pc.and_(present, pc.invert(pc.fill_null(pc.is_nan(col), True)))
    return present


def _file_summary(batch: pa.Table, text_col: str, label_col: str) -> dict:
    summary = {}
    paths = batch.column("path")
    for path in pc.unique(paths).to_pylist():
        part = batch.filter(pc.equal(paths, path))
        nulls, empties = text_stats(part.column(text_col))
        label = part.column(label_col)
        summary[path] = {"rows": part.num_rows, "null_text": nulls, "empty_text": empties,
                         "null_label": part.num_rows - int(pc.sum(_has_label(label)).as_py() or 0)}
    return summary


def _summarize(batch: pa.Table, text_col: str, label_col: str, holdout: tuple[float, int] | None) -> pa.Table:
    text = batch.column(text_col)
    if not is_text_type(text.type):
        wrong = {p: str(text.type) for p in pc.unique(batch.column("path")).to_pylist()}
        return pa.table({"summary": [json.dumps({"files": {}, "usable": 0, "labels": [], "text_types": wrong})]})
    usable = pc.and_(usable_text(text), _has_label(batch.column(label_col)))
    keep = usable
    if holdout is not None:
        # Count only the rows hash_split keeps for training, so counts are exact.
        side = _hash_fraction(batch.select([text_col]).to_pandas()[text_col], holdout[1]) >= holdout[0]
        keep = pc.and_(keep, pa.array(side))
    counts = pc.value_counts(batch.column(label_col).filter(keep)).to_pylist()
    summary = {"files": _file_summary(batch, text_col, label_col), "usable": int(pc.sum(usable).as_py() or 0),
               "labels": [[label_value(c["values"]), c["counts"]] for c in counts], "text_types": {}}
    return pa.table({"summary": [json.dumps(summary)]})


def scan(ds: ray.data.Dataset, text_col: str, label_col: str, holdout: tuple[float, int] | None = None) -> ScanReport:
    """One pass over text and label: row count, label counts, bad rows per file, text columns
    that are not text.

    With ``holdout=(fraction, seed)`` the label counts cover only the training side of
    :func:`hash_split`.
    """
    summaries = ds.map_batches(_summarize, batch_format="pyarrow", batch_size=8192, num_cpus=TASK_CPUS,
                               fn_kwargs={"text_col": text_col, "label_col": label_col, "holdout": holdout})
    report = ScanReport(rows=0, usable_rows=0, label_counts={}, bad={}, text_types={})
    for row in summaries.iter_rows():
        s = json.loads(row["summary"])
        for path, c in s["files"].items():
            report.rows += c.pop("rows")
            agg = report.bad.setdefault(path, {"null_text": 0, "empty_text": 0, "null_label": 0})
            for k, v in c.items():
                agg[k] += v
        report.usable_rows += s["usable"]
        for value, n in s["labels"]:
            report.label_counts[value] = report.label_counts.get(value, 0) + n
        report.text_types.update(s["text_types"])
    report.bad = {p: c for p, c in report.bad.items() if sum(c.values())}
    return report


def bad_rows_message(report: ScanReport, cfg: DataConfig) -> str:
    lines = []
    for path, c in sorted(report.bad.items()):
        for kind, n in c.items():
            if n:
                col = cfg.label_column if kind == "null_label" else cfg.text_column
                lines.append(f"{path}: {n} row(s) with {kind.replace('_', ' ')} in column {col!r}")
    return "; ".join(lines)


def _text_type_message(report: ScanReport, fmt: str, cfg: DataConfig) -> str:
    files = sorted(report.text_types)
    if fmt == "csv":  # Arrow reads a CSV column with bytes that are not UTF-8 as binary
        problem = find_first_bad_line(files, fmt)
        if problem:
            return problem
    detail = "; ".join(f"{f}: {report.text_types[f]}" for f in files[:3])
    return (f"column {cfg.text_column!r} (from data.text_column) does not hold text ({detail}). Set "
            "data.text_column to the column with the text, or write that column as strings.")


@contextmanager
def _read_errors_named(files: list[str] | None, fmt: str):
    """A CSV/JSONL read that fails on bad bytes or a malformed line becomes a DataError naming
    the file and line (found by re-reading the files, only on this failure path)."""
    try:
        yield
    except DataError:
        raise
    except Exception:
        problem = find_first_bad_line(files, fmt) if files and fmt in ("csv", "json") else None
        if problem:
            raise DataError(problem) from None
        raise


def _drop_bad(batch: pa.Table, text_col: str, label_col: str) -> pa.Table:
    return batch.filter(pc.and_(usable_text(batch.column(text_col)), _has_label(batch.column(label_col))))


# ----------------------------------------------------------------------------- split


def _hash_fraction(texts: pd.Series, seed: int) -> np.ndarray:
    key = f"bertray{seed:09d}"[-16:].rjust(16, "0")
    h = pd.util.hash_pandas_object(texts.astype(str), index=False, hash_key=key).to_numpy()
    return (h % np.uint64(1_000_000)).astype(np.float64) / 1_000_000


def _split_filter(batch: pd.DataFrame, text_col: str, fraction: float, seed: int, want_validation: bool) -> pd.DataFrame:
    in_val = _hash_fraction(batch[text_col], seed) < fraction
    return batch[in_val if want_validation else ~in_val]


def hash_split(ds: ray.data.Dataset, text_col: str, fraction: float, seed: int) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Deterministic streaming split by a seeded hash of the text.

    Each row lands in validation with probability ``fraction`` independently of its class,
    so every class keeps its share in both parts (stratified in expectation) and nothing is
    materialized. Duplicate texts always land on the same side, so they cannot leak.
    """
    kw = {"batch_format": "pandas", "num_cpus": TASK_CPUS}
    args = {"text_col": text_col, "fraction": fraction, "seed": seed}
    train = ds.map_batches(_split_filter, fn_kwargs={**args, "want_validation": False}, **kw)
    val = ds.map_batches(_split_filter, fn_kwargs={**args, "want_validation": True}, **kw)
    return train, val


# ----------------------------------------------------------------------------- tokenize


class Tokenize:
    """Ray Data callable class: the fast tokenizer loads once per actor, not per batch."""

    def __init__(self, model_name: str, max_length: int, label2id: dict[str, int] | None,
                 text_column: str = "text", label_column: str = "label",
                 truncation: str = "head", trust_remote_code: bool = False, keep_columns: bool = False):
        from bertray.modeling import load_fast_tokenizer

        # A tokenizer per actor must not also spawn its own Rust thread pool per core.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = load_fast_tokenizer(model_name, trust_remote_code)
        self.max_length = max_length
        self.label2id = label2id
        self.truncation = truncation
        self.keep_columns = keep_columns
        self.text_column = text_column
        self.label_column = label_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        values, offsets = encode_flat(self.tokenizer, texts, self.max_length, self.truncation)
        cols = {"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}
        if self.label2id is not None:
            cols["labels"] = pa.array(encode_labels(batch.column(self.label_column).to_pylist(), self.label2id, self.label_column))
        out = pa.table(cols)
        if self.keep_columns:
            for name in batch.column_names:
                out = out.append_column(name, batch.column(name))
        return out


def tokenize_dataset(ds: ray.data.Dataset, model_name: str, max_length: int, label2id, cfg: DataConfig,
                     truncation: str = "head", trust_remote_code: bool = False) -> ray.data.Dataset:
    return ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={"model_name": model_name, "max_length": max_length, "label2id": label2id,
                               "truncation": truncation,
                               "text_column": cfg.text_column, "label_column": cfg.label_column,
                               "trust_remote_code": trust_remote_code},
        batch_format="pyarrow",
        batch_size=cfg.tokenize_batch_size,
        compute=ActorPoolStrategy(size=cfg.num_tokenizer_actors),
        num_cpus=cfg.tokenizer_actor_cpus,
    )


# ----------------------------------------------------------------------------- assembly


@dataclass
class PreparedData:
    train: ray.data.Dataset  # tokenized: input_ids (list<int32>), labels (int64)
    validation: ray.data.Dataset  # materialized (small; read every epoch)
    label2id: dict[str, int]
    id2label: dict[int, str]
    train_rows: int
    label_counts: dict[int, int]  # label id -> training rows (exact, after split and drops)
    dropped_rows: int


def _load_labelled(path: str, cfg: DataConfig, role: str, holdout=None) -> tuple[ray.data.Dataset, ScanReport]:
    """Check columns and scan for bad rows; returns (streaming dataset, report)."""
    cols = [cfg.text_column, cfg.label_column]
    limit = cfg.max_train_rows if role == "train" else cfg.max_validation_rows

    files = None if _is_hf_dataset(path) else list_files(path)  # listed once for the three reads below
    fmt = detect_format(files, cfg.format) if files else cfg.format

    def read(include_paths: bool) -> ray.data.Dataset:
        ds = read_table(path, fmt, columns=cols, include_paths=include_paths, hf_split=role, files=files)
        return ds.limit(limit) if limit else ds

    with _read_errors_named(files, fmt):
        check_columns(read_table(path, fmt, hf_split=role, files=files), path,
                      {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column})
        report = scan(read(include_paths=True), cfg.text_column, cfg.label_column, holdout)
    if report.text_types:
        raise DataError(_text_type_message(report, fmt, cfg))
    if report.bad and not cfg.drop_bad_rows:
        raise DataError(f"{role} data has bad rows: {bad_rows_message(report, cfg)}. "
                        "Clean them, or set data.drop_bad_rows=true to drop them (the count is reported).")
    ds = read(include_paths=False)
    if report.bad:
        log.warning("dropping %d bad %s row(s): %s", report.bad_rows, role, bad_rows_message(report, cfg))
        ds = ds.map_batches(_drop_bad, batch_format="pyarrow", num_cpus=TASK_CPUS,
                            fn_kwargs={"text_col": cfg.text_column, "label_col": cfg.label_column})
    return ds, report


def _check_labels(cfg: DataConfig, report: ScanReport, label2id: dict[str, int], vreport: ScanReport | None) -> None:
    """Before training: a validation set with rows, validation labels the model knows; a warning for labels that differ only by case or surrounding whitespace.

    Raises:
        DataError: naming the data, the counts and the fix.
    """
    similar = similar_labels(label2id)
    if similar:
        log.warning("training labels that differ only by case or surrounding whitespace: %s; they are trained as "
                    "different classes. Clean the label column if each group is one class.", similar)
    if vreport is None:
        held_out = report.usable_rows - sum(report.label_counts.values())
        if held_out == 0:
            raise DataError(f"data.validation_fraction={cfg.validation_fraction} of {report.usable_rows} usable "
                            f"training rows holds out 0 rows for validation: set data.validation to a labelled "
                            "file, or raise data.validation_fraction.")
        return
    if vreport.usable_rows == 0:
        raise DataError(f"data.validation={cfg.validation}: no usable validation rows ({vreport.rows} rows read, "
                        f"{vreport.bad_rows} with a null/empty text or a null label): metrics over 0 rows cannot "
                        "rank checkpoints. Point data.validation at labelled rows, or unset it to hold out a split.")
    unknown = {k: n for k, n in vreport.label_counts.items() if label_key(k) not in label2id}
    if unknown:
        detail = ", ".join(f"{label_key(k)!r} ({n} rows)" for k, n in sorted(unknown.items(), key=str))
        raise DataError(f"{cfg.validation}: validation label(s) not in the training label map: {detail}. "
                        f"Training labels: {list(label2id)}. Fix the labels or add them to the training data.")


def prepare(cfg_data: DataConfig, model_name: str, max_length: int, seed: int,
            trust_remote_code: bool = False) -> PreparedData:
    """Read, validate, split and tokenize train/validation data (lazily, streaming).

    Raises:
        DataError: unreadable files, wrong columns, bad rows, one class, no validation rows,
            unknown validation labels; all before any training starts.
    """
    holdout = None if cfg_data.validation else (cfg_data.validation_fraction, seed)
    train, report = _load_labelled(cfg_data.train, cfg_data, "train", holdout)
    vreport = None
    if cfg_data.validation:
        val, vreport = _load_labelled(cfg_data.validation, cfg_data, "validation")
    else:
        train, val = hash_split(train, cfg_data.text_column, cfg_data.validation_fraction, seed)
    check_classes(report.label_counts, f"data.train={cfg_data.train}")
    label2id, id2label = build_label_map(report.label_counts)
    _check_labels(cfg_data, report, label2id, vreport)
    kw = {"model_name": model_name, "max_length": max_length, "label2id": label2id, "cfg": cfg_data,
          "trust_remote_code": trust_remote_code}
    return PreparedData(
        train=tokenize_dataset(train, **kw),
        # Validation is tokenized once, here, and kept in the object store: it is read every
        # epoch by every worker, and a second streaming pipeline (another tokenizer actor)
        # beside the training workers and the training pipeline would not fit on a small node.
        validation=tokenize_dataset(val, **kw).materialize(),
        label2id=label2id,
        id2label=id2label,
        train_rows=sum(report.label_counts.values()),
        label_counts={label2id[label_key(k)]: v for k, v in report.label_counts.items()},
        dropped_rows=report.bad_rows + (vreport.bad_rows if vreport else 0),
    )

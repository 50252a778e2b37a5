"""Ray Data side of the pipeline: read labelled text, check it, split it, tokenize it.

Reading and tokenizing stream: nothing here materializes the corpus. One cheap scan
pass (text and label columns only) finds bad rows and the label set before training
starts, so problems surface as one clear error instead of a crash mid-epoch.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data import ActorPoolStrategy

from bertray.config import DataConfig
from bertray.errors import BertrayError
from bertray.labels import build_label_map, encode_labels
from bertray.tokenization import encode_flat

log = logging.getLogger(__name__)

# Every Ray Data task here asks for a fraction of a CPU. A task that asks for a whole CPU
# (Ray Data's default) cannot be scheduled beside training workers and a tokenizer actor
# on a small machine, and ingest would stall at 0 rows. For the same reason the pipeline
# uses no select_columns/rename_columns (default-CPU tasks): the tokenizer picks columns.
TASK_CPUS = 0.25
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class DataError(BertrayError):
    """Bad input data: the message names the file, column or label and the fix."""


# ----------------------------------------------------------------------------- reading


def expand_paths(path: str) -> list[str]:
    """Files behind a file, directory or glob, local or on any pyarrow filesystem.

    Raises:
        DataError: nothing exists at ``path``.
    """
    if "://" in path:
        fs, base = pafs.FileSystem.from_uri(path)
        scheme = path.split("://", 1)[0] + "://"
    else:
        fs, base, scheme = pafs.LocalFileSystem(), os.path.abspath(path), ""
    if any(ch in base for ch in "*?["):
        root = base[: min(base.find(ch) for ch in "*?[" if ch in base)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, base))
    else:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            files = [base]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and not os.path.basename(i.path).startswith(("_", "."))
                           and os.path.splitext(i.path)[1].lower() in _EXTENSIONS)
        else:
            files = []
    if not files:
        raise DataError(f"no data files found at {path!r}: check the path (a file, a directory, or a glob like data/*.parquet)")
    return [scheme + f for f in files]


def detect_format(files: list[str], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    kinds = {_EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"cannot tell the format of {files[:3]}...: use .parquet/.csv/.jsonl files or set data.format")
    return kinds.pop()


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

    ``files``: ``expand_paths(path)`` when the caller has it already; on an object store each
    listing is a round trip per directory level, so a caller that reads a path several times
    lists it once.
    """
    if _is_hf_dataset(path):
        ds = _read_hf(path, hf_split)
        if include_paths:
            ds = ds.add_column("path", lambda b: pd.Series([path] * len(b)), batch_format="pandas")
        return ds
    files = files or expand_paths(path)
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
    """Fail fast, before Ray starts, when a configured data path holds no files.

    Raises:
        DataError: naming the path and the config key.
    """
    for key, path in (("data.train", cfg.train), ("data.validation", cfg.validation)):
        if path and not _is_hf_dataset(path):
            try:
                expand_paths(path)
            except DataError as e:
                raise DataError(f"{key}: {e}") from None


def check_columns(ds: ray.data.Dataset, path: str, required: dict[str, str]) -> None:
    """``required`` maps config key -> column name. Raises DataError listing the columns that exist."""
    names = list(ds.schema().names)
    for key, col in required.items():
        if col not in names:
            raise DataError(f"{path}: column {col!r} (from {key}) not found; columns in the data: {names}. "
                            f"Set {key}=<one of those>.")


# ----------------------------------------------------------------------------- scan


@dataclass
class ScanReport:
    rows: int
    label_counts: dict  # raw label value -> rows
    bad: dict  # file -> {"null_text": n, "empty_text": n, "null_label": n}

    @property
    def bad_rows(self) -> int:
        return sum(sum(v.values()) for v in self.bad.values())


def _summarize(batch: pa.Table, text_col: str, label_col: str, holdout: tuple[float, int] | None) -> pa.Table:
    df = batch.to_pandas()
    text, label = df[text_col], df[label_col]
    null_text = text.isna()
    empty_text = ~null_text & (text.astype(str).str.strip() == "")
    null_label = label.isna()
    per_file = {}
    for path, idx in df.groupby("path").groups.items():
        per_file[path] = {"rows": len(idx), "null_text": int(null_text[idx].sum()),
                          "empty_text": int(empty_text[idx].sum()), "null_label": int(null_label[idx].sum())}
    ok = ~(null_text | empty_text | null_label)
    if holdout is not None:
        # Count only the rows hash_split keeps for training, so counts are exact.
        ok &= _hash_fraction(text, holdout[1]) >= holdout[0]
    counts = label[ok].value_counts()
    labels = {json.dumps(k.item() if hasattr(k, "item") else k): int(v) for k, v in counts.items()}
    return pa.table({"summary": [json.dumps({"files": per_file, "labels": labels})]})


def scan(ds: ray.data.Dataset, text_col: str, label_col: str, holdout: tuple[float, int] | None = None) -> ScanReport:
    """One pass over text and label: row count, label counts, bad rows per file.

    With ``holdout=(fraction, seed)`` the label counts cover only the training side of
    :func:`hash_split`.
    """
    summaries = ds.map_batches(_summarize, batch_format="pyarrow", batch_size=8192, num_cpus=TASK_CPUS,
                               fn_kwargs={"text_col": text_col, "label_col": label_col, "holdout": holdout})
    rows, labels, bad = 0, {}, {}
    for row in summaries.iter_rows():
        s = json.loads(row["summary"])
        for path, c in s["files"].items():
            rows += c.pop("rows")
            agg = bad.setdefault(path, {"null_text": 0, "empty_text": 0, "null_label": 0})
            for k, v in c.items():
                agg[k] += v
        for k, v in s["labels"].items():
            labels[json.loads(k)] = labels.get(json.loads(k), 0) + v
    bad = {p: c for p, c in bad.items() if sum(c.values())}
    return ScanReport(rows=rows, label_counts=labels, bad=bad)


def bad_rows_message(report: ScanReport, cfg: DataConfig) -> str:
    lines = []
    for path, c in sorted(report.bad.items()):
        for kind, n in c.items():
            if n:
                col = cfg.label_column if kind == "null_label" else cfg.text_column
                lines.append(f"{path}: {n} row(s) with {kind.replace('_', ' ')} in column {col!r}")
    return "; ".join(lines)


def _drop_bad(batch: pd.DataFrame, text_col: str, label_col: str) -> pd.DataFrame:
    text = batch[text_col]
    keep = text.notna() & (text.astype(str).str.strip() != "") & batch[label_col].notna()
    return batch[keep]


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

    files = None if _is_hf_dataset(path) else expand_paths(path)  # listed once for the three reads below

    def read(include_paths: bool) -> ray.data.Dataset:
        ds = read_table(path, cfg.format, columns=cols, include_paths=include_paths, hf_split=role, files=files)
        return ds.limit(limit) if limit else ds

    check_columns(read_table(path, cfg.format, hf_split=role, files=files), path,
                  {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column})
    report = scan(read(include_paths=True), cfg.text_column, cfg.label_column, holdout)
    if report.bad and not cfg.drop_bad_rows:
        raise DataError(f"{role} data has bad rows: {bad_rows_message(report, cfg)}. "
                        "Clean them, or set data.drop_bad_rows=true to drop them (the count is reported).")
    ds = read(include_paths=False)
    if report.bad:
        log.warning("dropping %d bad %s row(s): %s", report.bad_rows, role, bad_rows_message(report, cfg))
        ds = ds.map_batches(_drop_bad, batch_format="pandas", num_cpus=TASK_CPUS,
                            fn_kwargs={"text_col": cfg.text_column, "label_col": cfg.label_column})
    return ds, report


def prepare(cfg_data: DataConfig, model_name: str, max_length: int, seed: int,
            trust_remote_code: bool = False) -> PreparedData:
    """Read, validate, split and tokenize train/validation data (lazily, streaming)."""
    holdout = None if cfg_data.validation else (cfg_data.validation_fraction, seed)
    train, report = _load_labelled(cfg_data.train, cfg_data, "train", holdout)
    label2id, id2label = build_label_map(report.label_counts)
    dropped = report.bad_rows
    if cfg_data.validation:
        val, vreport = _load_labelled(cfg_data.validation, cfg_data, "validation")
        dropped += vreport.bad_rows
        unknown = {k: n for k, n in vreport.label_counts.items() if str(k) not in label2id}
        if unknown:
            detail = ", ".join(f"{k!r} ({n} rows)" for k, n in sorted(unknown.items(), key=str))
            raise DataError(f"{cfg_data.validation}: validation label(s) not in the training label map: {detail}. "
                            f"Training labels: {list(label2id)}. Fix the labels or add them to the training data.")
    else:
        train, val = hash_split(train, cfg_data.text_column, cfg_data.validation_fraction, seed)
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
        label_counts={label2id[str(k)]: v for k, v in report.label_counts.items()},
        dropped_rows=dropped,
    )

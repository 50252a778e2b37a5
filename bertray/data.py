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

from bertray import problem as bproblem
from bertray.columns import is_text_type, missing_column, text_stats, usable_text
from bertray.config import DataConfig
from bertray.errors import DataError
from bertray.filecheck import find_first_bad_line
from bertray.labels import check_classes, similar_labels
from bertray.paths import list_files
from bertray.problem import LabelStats, Problem
from bertray.tokenization import token_columns

log = logging.getLogger(__name__)

# Every Ray Data task here asks for a fraction of a CPU. A task that asks for a whole CPU
# (Ray Data's default) cannot be scheduled beside training workers and a tokenizer actor
# on a small machine, and ingest would stall at 0 rows. For the same reason the pipeline
# uses no select_columns/rename_columns (default-CPU tasks): the tokenizer picks columns.
TASK_CPUS = 0.25
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# Arrow's readers (and Ray's) undo these from the file name.
_COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")


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


def label_type(cfg: DataConfig) -> tuple[pa.DataType, str] | None:
    """(the label column's Arrow type, the file it was read from), from the first training
    file's schema, on the driver before Ray starts; None where that cannot be read cheaply
    (a Hugging Face dataset, a compressed file, a missing column): :func:`prepare` resolves
    the problem type from the Ray Dataset then."""
    import pyarrow.dataset as pads

    if _is_hf_dataset(cfg.train):
        return None
    try:
        files = list_files(cfg.train)
        schema = pads.dataset(files[:1], format=detect_format(files, cfg.format)).schema
        return schema.field(cfg.label_column).type, files[0]
    except Exception:  # noqa: BLE001 — the scan reports unreadable data with its own clear errors
        return None


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
    usable_rows: int  # rows with a text (and pair) and a good label (both sides of a holdout split)
    labels: LabelStats  # the usable rows' labels (with a holdout: its training side only)
    bad: dict  # file -> {"null_text": n, "empty_text": n, ..., "null_label": n}
    text_types: dict  # file -> [column, Arrow type] of a text column that does not hold text
    whole_values: list | None = None  # regression: the distinct labels while all are whole numbers (≤ 21)

    @property
    def bad_rows(self) -> int:
        return self.rows - self.usable_rows

    @property
    def label_counts(self) -> dict:
        return self.labels.counts


def _has_label(col: pa.ChunkedArray | pa.Array):
    """Boolean mask: the label is present (not null, and not NaN in a float column)."""
    present = pc.is_valid(col)
    if pa.types.is_floating(col.type):
        present = pc.and_(present, pc.invert(pc.fill_null(pc.is_nan(col), True)))
    return present


def _good_label(col, problem: Problem):
    """Present, and usable for the problem type (regression: finite; multi-label: no null element)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return pc.and_(_has_label(col), pa.array(~problem.bad_labels(col)))


def _text_columns(cfg: DataConfig) -> dict[str, str]:
    """Kind prefix in the scan's counts -> text column: ``text`` and, for pairs, ``text_pair``."""
    return {"text": cfg.text_column, **({"text_pair": cfg.text_pair_column} if cfg.text_pair_column else {})}


def _file_summary(batch: pa.Table, texts: dict[str, str], label_col: str, problem: Problem) -> dict:
    summary = {}
    paths = batch.column("path")
    for path in pc.unique(paths).to_pylist():
        part = batch.filter(pc.equal(paths, path))
        counts = {"rows": part.num_rows}
        for kind, col in texts.items():
            counts[f"null_{kind}"], counts[f"empty_{kind}"] = text_stats(part.column(col))
        good = _good_label(part.column(label_col), problem)
        counts["null_label"] = part.num_rows - int(pc.sum(good).as_py() or 0)
        summary[path] = counts
    return summary


def _whole_values(col: pa.Array) -> list | None:
    """Up to 21 distinct values of a numeric column while all are whole numbers, else None."""
    if not pa.types.is_floating(col.type) or len(col) == 0:
        return None
    x = np.unique(col.to_numpy(zero_copy_only=False))
    if len(x) > 21 or not np.all(x == np.round(x)):
        return None
    return x.tolist()


def _usable(batch: pa.Table, texts: dict[str, str], label_col: str, problem: Problem):
    usable = _good_label(batch.column(label_col), problem)
    for col in texts.values():
        usable = pc.and_(usable, usable_text(batch.column(col)))
    return usable


def _summarize(batch: pa.Table, texts: dict[str, str], label_col: str, holdout: tuple[float, int] | None,
               problem: Problem) -> pa.Table:
    wrong = [[c, str(batch.column(c).type)] for c in texts.values() if not is_text_type(batch.column(c).type)]
    if wrong:
        typed = {p: wrong[0] for p in pc.unique(batch.column("path")).to_pylist()}
        return pa.table({"summary": [json.dumps({"files": {}, "usable": 0, "labels": LabelStats().to_json(),
                                                 "text_types": typed, "whole": None})]})
    usable = _usable(batch, texts, label_col, problem)
    keep = usable
    if holdout is not None:
        # Count only the rows hash_split keeps for training, so counts are exact.
        text_col = texts["text"]
        side = _hash_fraction(batch.select([text_col]).to_pandas()[text_col], holdout[1]) >= holdout[0]
        keep = pc.and_(keep, pa.array(side))
    labels = batch.column(label_col).filter(keep).combine_chunks()
    summary = {"files": _file_summary(batch, texts, label_col, problem), "usable": int(pc.sum(usable).as_py() or 0),
               "labels": problem.label_stats(labels).to_json(), "text_types": {}, "whole": _whole_values(labels)}
    return pa.table({"summary": [json.dumps(summary)]})


def _merge_whole(a: list | None, b: list | None, first: bool) -> list | None:
    if first:
        return b
    if a is None or b is None:
        return None
    merged = sorted(set(a) | set(b))
    return merged if len(merged) <= 21 else None


def scan(ds: ray.data.Dataset, text_col: str | dict[str, str], label_col: str,
         holdout: tuple[float, int] | None = None, problem: Problem | None = None) -> ScanReport:
    """One pass over texts and label: row count, label statistics (``problem.label_stats``),
    bad rows per file, text columns that are not text.

    ``text_col``: the text column, or ``{"text": column, "text_pair": column}`` for pairs.
    ``problem``: the problem type, without labels yet (default: single-label).
    With ``holdout=(fraction, seed)`` the label counts cover only the training side of
    :func:`hash_split`.
    """
    texts = {"text": text_col} if isinstance(text_col, str) else dict(text_col)
    problem = problem or bproblem.make(bproblem.SINGLE)
    summaries = ds.map_batches(_summarize, batch_format="pyarrow", batch_size=8192, num_cpus=TASK_CPUS,
                               fn_kwargs={"texts": texts, "label_col": label_col, "holdout": holdout,
                                          "problem": problem})
    report = ScanReport(rows=0, usable_rows=0, labels=LabelStats(), bad={}, text_types={})
    first = True
    for row in summaries.iter_rows():
        s = json.loads(row["summary"])
        for path, c in s["files"].items():
            report.rows += c.pop("rows")
            agg = report.bad.setdefault(path, dict.fromkeys(c, 0))
            for k, v in c.items():
                agg[k] += v
        report.usable_rows += s["usable"]
        report.labels = report.labels + LabelStats.from_json(s["labels"])
        report.whole_values = _merge_whole(report.whole_values, s["whole"], first)
        report.text_types.update(s["text_types"])
        first = False
    report.bad = {p: c for p, c in report.bad.items() if sum(c.values())}
    return report


def bad_rows_message(report: ScanReport, cfg: DataConfig) -> str:
    lines = []
    columns = {"label": cfg.label_column, "text": cfg.text_column, "text_pair": cfg.text_pair_column}
    for path, c in sorted(report.bad.items()):
        for kind, n in c.items():
            if n:
                col = columns[kind.split("_", 1)[1]]
                lines.append(f"{path}: {n} row(s) with {kind.replace('_', ' ')} in column {col!r}")
    return "; ".join(lines)


def _text_type_message(report: ScanReport, fmt: str, cfg: DataConfig) -> str:
    files = sorted(report.text_types)
    if fmt == "csv":  # Arrow reads a CSV column with bytes that are not UTF-8 as binary
        problem = find_first_bad_line(files, fmt)
        if problem:
            return problem
    column = report.text_types[files[0]][0]
    key = "data.text_column" if column == cfg.text_column else "data.text_pair_column"
    detail = "; ".join(f"{f}: {report.text_types[f][1]}" for f in files[:3])
    return (f"column {column!r} (from {key}) does not hold text ({detail}). Set "
            f"{key} to the column with the text, or write that column as strings.")


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


def _drop_bad(batch: pa.Table, texts: dict[str, str], label_col: str, problem: Problem) -> pa.Table:
    return batch.filter(_usable(batch, texts, label_col, problem))


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
    """Ray Data callable class: the fast tokenizer loads once per actor, not per batch.

    ``problem`` (with its label map) encodes the ``labels`` column; ``label2id`` alone means
    single-label; neither: no labels (predict). ``text_pair_column``: rows are pairs, and a
    ``token_type_ids`` column (``list<int8>``, the ids' layout) is added.
    """

    def __init__(self, model_name: str, max_length: int, label2id: dict[str, int] | None = None,
                 text_column: str = "text", label_column: str = "label",
                 truncation: str = "head", trust_remote_code: bool = False, keep_columns: bool = False,
                 text_pair_column: str | None = None, problem: Problem | None = None):
        from bertray.modeling import load_fast_tokenizer

        # A tokenizer per actor must not also spawn its own Rust thread pool per core.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = load_fast_tokenizer(model_name, trust_remote_code)
        self.max_length = max_length
        if problem is None and label2id is not None:
            problem = bproblem.make(bproblem.SINGLE, label2id)
        self.problem = problem
        self.truncation = truncation
        self.keep_columns = keep_columns
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        pairs = batch.column(self.text_pair_column).to_pylist() if self.text_pair_column else None
        cols = token_columns(self.tokenizer, texts, self.max_length, self.truncation, pairs=pairs)
        if self.problem is not None:
            cols["labels"] = self.problem.encode(batch.column(self.label_column), "data", self.label_column)
        out = pa.table(cols)
        if self.keep_columns:
            for name in batch.column_names:
                out = out.append_column(name, batch.column(name))
        return out


def tokenize_dataset(ds: ray.data.Dataset, model_name: str, max_length: int, label2id, cfg: DataConfig,
                     truncation: str = "head", trust_remote_code: bool = False,
                     problem: Problem | None = None) -> ray.data.Dataset:
    return ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={"model_name": model_name, "max_length": max_length, "label2id": label2id,
                               "truncation": truncation, "problem": problem,
                               "text_column": cfg.text_column, "label_column": cfg.label_column,
                               "text_pair_column": cfg.text_pair_column,
                               "trust_remote_code": trust_remote_code},
        batch_format="pyarrow",
        batch_size=cfg.tokenize_batch_size,
        compute=ActorPoolStrategy(size=cfg.num_tokenizer_actors),
        num_cpus=cfg.tokenizer_actor_cpus,
    )


# ----------------------------------------------------------------------------- assembly


@dataclass
class PreparedData:
    train: ray.data.Dataset  # tokenized: input_ids (list<int32>), [token_type_ids], labels (problem.encode)
    validation: ray.data.Dataset  # materialized (small; read every epoch)
    problem: Problem  # with its label map
    train_rows: int
    label_stats: LabelStats  # the training rows' labels (exact, after split and drops)
    dropped_rows: int

    @property
    def label2id(self) -> dict[str, int]:
        """The head's outputs by name (regression: the one value, named after the label column)."""
        return self.problem.config_fields()["label2id"]

    @property
    def id2label(self) -> dict[int, str]:
        return self.problem.config_fields()["id2label"]

    @property
    def label_counts(self) -> dict[int, int]:
        """Label id -> training rows carrying it (empty for regression)."""
        return self.problem.label_counts(self.label_stats)


def _problem_of(schema, path: str, cfg: DataConfig, problem_type: str) -> Problem:
    """The problem type (``auto`` resolved from the label column's Arrow type in the Ray
    Dataset ``schema``), without labels yet."""
    label_type = dict(zip(schema.names, schema.types, strict=True))[cfg.label_column]
    name = bproblem.resolve(problem_type, label_type, cfg.label_separator, path, cfg.label_column)
    return bproblem.make(name, label_separator=cfg.label_separator, label_name=cfg.label_column)


def _load_labelled(path: str, cfg: DataConfig, role: str, holdout=None, problem_type: str = bproblem.AUTO
                   ) -> tuple[ray.data.Dataset, ScanReport, Problem]:
    """Check columns and the label type, scan for bad rows; returns (streaming dataset, report,
    the problem without labels)."""
    texts = _text_columns(cfg)
    cols = [*texts.values(), cfg.label_column]
    limit = cfg.max_train_rows if role == "train" else cfg.max_validation_rows

    files = None if _is_hf_dataset(path) else list_files(path)  # listed once for the three reads below
    fmt = detect_format(files, cfg.format) if files else cfg.format

    def read(include_paths: bool) -> ray.data.Dataset:
        ds = read_table(path, fmt, columns=cols, include_paths=include_paths, hf_split=role, files=files)
        if not limit:
            return ds
        # The first rows in file order, on every read: the scan that builds the label map and
        # the training read must see the same rows (unordered execution would pick others).
        ds.context.execution_options.preserve_order = True
        return ds.limit(limit)

    with _read_errors_named(files, fmt):
        whole = read_table(path, fmt, hf_split=role, files=files)
        check_columns(whole, path, {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column,
                                    **({"data.text_pair_column": cfg.text_pair_column} if cfg.text_pair_column else {})})
        problem = _problem_of(whole.schema(), path, cfg, problem_type)
        report = scan(read(include_paths=True), texts, cfg.label_column, holdout, problem)
    if report.text_types:
        raise DataError(_text_type_message(report, fmt, cfg))
    if report.bad and not cfg.drop_bad_rows:
        raise DataError(f"{role} data has bad rows: {bad_rows_message(report, cfg)}. "
                        "Clean them, or set data.drop_bad_rows=true to drop them (the count is reported).")
    ds = read(include_paths=False)
    if report.bad:
        log.warning("dropping %d bad %s row(s): %s", report.bad_rows, role, bad_rows_message(report, cfg))
        ds = ds.map_batches(_drop_bad, batch_format="pyarrow", num_cpus=TASK_CPUS,
                            fn_kwargs={"texts": texts, "label_col": cfg.label_column, "problem": problem})
    return ds, report, problem


def _check_labels(cfg: DataConfig, report: ScanReport, problem: Problem, vreport: ScanReport | None) -> None:
    """Before training: a validation set with rows, validation labels the model knows; a warning for labels that differ only by case or surrounding whitespace.

    Raises:
        DataError: naming the data, the counts and the fix.
    """
    similar = similar_labels(problem.label2id or {})
    if similar:
        log.warning("training labels that differ only by case or surrounding whitespace: %s; they are trained as "
                    "different classes. Clean the label column if each group is one class.", similar)
    if vreport is None:
        held_out = report.usable_rows - report.labels.rows
        if held_out == 0:
            raise DataError(f"data.validation_fraction={cfg.validation_fraction} of {report.usable_rows} usable "
                            f"training rows holds out 0 rows for validation: set data.validation to a labelled "
                            "file, or raise data.validation_fraction.")
        return
    if vreport.usable_rows == 0:
        raise DataError(f"data.validation={cfg.validation}: no usable validation rows ({vreport.rows} rows read, "
                        f"{vreport.bad_rows} with a null/empty text or a bad label): metrics over 0 rows cannot "
                        "rank checkpoints. Point data.validation at labelled rows, or unset it to hold out a split.")
    problem.check_known(vreport.labels, str(cfg.validation), cfg.label_column)


def _warn_whole_regression(cfg: DataConfig, problem_type: str, report: ScanReport) -> None:
    """``auto`` took a float column for regression: say so when it looks like classes."""
    if problem_type == bproblem.AUTO and report.whole_values is not None and len(report.whole_values) <= 20:
        print(f"[bertray] warning: column {cfg.label_column!r} holds floats, so model.problem_type=auto trains "
              f"regression, yet its values are {len(report.whole_values)} whole numbers "
              f"{report.whole_values[:10]}; to train them as classes set "
              "model.problem_type=single_label_classification", flush=True)


def _labelled_problem(problem: Problem, report: ScanReport, where: str) -> Problem:
    if problem.name == bproblem.REGRESSION:
        if report.labels.rows == 0:
            raise DataError(f"{where}: no usable training rows (numbers in the label column)")
        return problem
    if problem.name == bproblem.SINGLE:
        check_classes(report.label_counts, where)
    elif not report.label_counts:
        raise DataError(f"{where}: no labels in any training row ({report.labels.empty} rows with an empty "
                        "label list); check data.label_column")
    try:
        return problem.with_labels(report.labels)
    except bproblem.LabelError:
        raise
    except Exception as e:  # a mix of numbers and strings
        raise DataError(f"{where}: {e}") from None


def prepare(cfg_data: DataConfig, model_name: str, max_length: int, seed: int,
            trust_remote_code: bool = False, problem_type: str = bproblem.AUTO) -> PreparedData:
    """Read, validate, split and tokenize train/validation data (lazily, streaming).

    ``problem_type``: ``model.problem_type`` (``auto``: from the label column's type).

    Raises:
        DataError: unreadable files, wrong columns, bad rows, one class, no validation rows,
            unknown validation labels; all before any training starts.
        LabelError: labels that do not fit the problem type (a DataError's sibling: exit 1).
    """
    holdout = None if cfg_data.validation else (cfg_data.validation_fraction, seed)
    train, report, problem = _load_labelled(cfg_data.train, cfg_data, "train", holdout, problem_type)
    vreport = None
    if cfg_data.validation:
        val, vreport, _ = _load_labelled(cfg_data.validation, cfg_data, "validation", problem_type=problem.name)
    else:
        train, val = hash_split(train, cfg_data.text_column, cfg_data.validation_fraction, seed)
    _warn_whole_regression(cfg_data, problem_type, report)
    problem = _labelled_problem(problem, report, f"data.train={cfg_data.train}")
    _check_labels(cfg_data, report, problem, vreport)
    kw = {"model_name": model_name, "max_length": max_length, "label2id": None, "cfg": cfg_data,
          "trust_remote_code": trust_remote_code, "problem": problem}
    return PreparedData(
        train=tokenize_dataset(train, **kw),
        # Validation is tokenized once, here, and kept in the object store: it is read every
        # epoch by every worker, and a second streaming pipeline (another tokenizer actor)
        # beside the training workers and the training pipeline would not fit on a small node.
        validation=tokenize_dataset(val, **kw).materialize(),
        problem=problem,
        train_rows=report.labels.rows,
        label_stats=report.labels,
        dropped_rows=report.bad_rows + (vreport.bad_rows if vreport else 0),
    )

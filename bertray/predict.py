"""Batch prediction and evaluation over Parquet on Ray Data.

    python jobs/predict.py --config configs/predict.yaml model.path=outputs/sst2/model

Steps, all streaming (nothing materializes the dataset):

1. Preflight, on the driver, before Ray does any work: the output rule (``on_existing=error``
   refuses an existing output here), the model (``check_is_classifier``), and every input
   file's Parquet footer: row counts, text/label columns present, text is strings. A file
   that is not Parquet is named.
2. Scan: one Ray task per file decodes every page (keeping nothing), counts null/empty texts
   and labels, and names any file with a damaged page; in evaluate mode unknown or null
   labels fail here, with counts. Decoding is cheap next to the model.
3. Predict: ``read Parquet (tasks) -> tokenize (CPU actors) -> predict (actors) -> write``
   into a temp directory; every task asks for a fraction of a CPU (see bertray.data).
4. Verify and commit (below).

Output: every input column unchanged and in input order (hive partition keys of the input
become columns), plus ``prediction`` (the label name from the model's ``id2label``) and
``score`` (its softmax probability, float32); with ``top_k`` also ``top_k_labels`` /
``top_k_scores`` (lists, best first) and with ``all_scores`` one ``score_<label>`` column
per class. Text and label columns must be stored in the files (not hive keys).

Speed on CPU. Each predictor call takes a large batch (``PREDICT_BATCH_ROWS``), orders its
rows by token length, runs micro-batches of ``batch_size`` rows padded only to their own
longest row, with the weights in bf16 where ``amp`` says so (``auto``: when the CPU has
AVX512-BF16/AMX; ``fp32`` keeps them in fp32), with eager attention for narrow
micro-batches and SDPA for wide ones, and then restores the original row order. The model
loads once per actor; torch gets the node's cores divided by the predictors.

Null and empty texts are still scored, so rows in = rows out: a null text reaches the
tokenizer as ``""`` (the model sees ``[CLS] [SEP]``) but the text column is written back
unchanged (still null). ``null_texts`` and ``empty_texts`` (null, empty or whitespace only)
are counted in the summary.

Nightly-safe output. ``{date}`` in ``output`` becomes ``date`` (default: today on the
driver, YYYY-MM-DD). Ray writes into a sibling temp directory ``.<name>.tmp-<uuid>``; its row
count (from the written Parquet footers) must equal the input's, else the run fails and the
temp directory is deleted. Then it is committed: on a local or shared filesystem by
``rename`` (``overwrite`` renames the old output aside, renames the new one in, deletes the
old), so a run that fails or is killed leaves nothing at the final path and an existing
output is never half-replaced (a kill between the two renames leaves the old output at
``.<name>.old-<uuid>``). Object stores (s3://, gs://) have no rename: the files are copied
to the final prefix with ``_SUCCESS`` last, so readers there must wait for ``_SUCCESS``
(not atomic). A killed run leaves its temp directory behind; the next run warns about it
but does not delete it (another run might be writing it).

On a multi-node cluster, local input and output paths must be on a filesystem every node
mounts at the same path (NFS, a shared volume): read and write tasks run on any node, the
commit on the driver. Otherwise use an object store.

Files inside the output directory besides the data: ``_SUCCESS`` (the run summary, JSON)
and, in evaluate mode (``label_column`` set), ``_metrics.json`` and
``_confusion_matrix.png``. The leading underscore keeps Parquet readers (pyarrow, pandas,
Spark, Ray, bertray) from taking them for data, and they are committed together with the
predictions they describe. Metrics are computed from the written predictions (a read of
two columns), per-batch confusion matrices summed on the driver.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bertray.config import PredictConfig
from bertray.data import (
    TASK_CPUS,
    DataError,
    Tokenize,
    check_columns,
    detect_format,
    expand_paths,
    read_table,
)
from bertray.errors import BertrayError

log = logging.getLogger(__name__)

PREDICT_BATCH_ROWS = 4096
"""Rows per predictor call: the window sorted by length, then cut into micro-batches."""
TOKENIZE_BATCH_ROWS = 4096
SUCCESS_FILE = "_SUCCESS"
METRICS_FILE = "_metrics.json"
CONFUSION_PNG = "_confusion_matrix.png"
IDS = "input_ids"
RESERVED_COLUMNS = (IDS, "prediction", "score", "top_k_labels", "top_k_scores")


class PredictError(BertrayError):
    """A problem with the model, the input or the output; the message says what to change."""


class OutputExistsError(PredictError):
    """The output exists and ``on_existing=error``."""


# ----------------------------------------------------------------------------- paths


def resolve_output(cfg: PredictConfig) -> tuple[str, str]:
    """``(output path with {date} filled, date)``; local paths are made absolute."""
    date = cfg.date or datetime.date.today().isoformat()
    out = cfg.output.replace("{date}", date).rstrip("/")
    if "://" not in out:
        out = os.path.abspath(os.path.expanduser(out))
    return out, date


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _sibling(path: str, name: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] + "/" + name


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def _write_text(fs: pafs.FileSystem, path: str, text: str | bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode() if isinstance(text, str) else text)


def parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and not os.path.basename(i.path).startswith(("_", ".")))


def parquet_footers(files: list[str]) -> dict[str, pq.FileMetaData]:
    """Footer (row count, schema) of every file; no data pages are read.

    Raises:
        DataError: naming the first file that is not readable Parquet.
    """
    if not files:
        return {}
    fs, _ = _filesystem(files[0])

    def footer(f: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(_filesystem(f)[1], filesystem=fs)
        except Exception as e:  # ArrowInvalid (not Parquet), OSError (truncated, unreadable)
            raise DataError(_unreadable(f, e)) from e

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return dict(zip(files, pool.map(footer, files), strict=True))


def _unreadable(path: str, err: Exception | str) -> str:
    cause = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return f"{path}: not a readable Parquet file ({cause.strip()}). Remove or replace this file."


def _is_text_type(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _stale_leftovers(fs: pafs.FileSystem, final: str) -> list[str]:
    parent, name = final.rsplit("/", 1)
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    return sorted(i.path for i in infos if os.path.basename(i.path).startswith(prefixes))


# ----------------------------------------------------------------------------- labels


def label_key(value) -> str:
    """The ``label2id`` key of a raw label (same rule as bertray.labels: 1, 1.0, True -> "1")."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


# ----------------------------------------------------------------------------- Ray Data callables


class PredictTokenize(Tokenize):
    """:class:`bertray.data.Tokenize` that scores null texts as ``""`` and writes them back as null."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        col = batch.column(self.text_column)
        if col.null_count == 0:
            return super().__call__(batch)
        filled = pa.array([""] * len(col), pa.string()) if pa.types.is_null(col.type) else pc.fill_null(col, "")
        out = super().__call__(batch.set_column(batch.schema.get_field_index(self.text_column),
                                                self.text_column, filled))
        return out.set_column(out.schema.get_field_index(self.text_column), self.text_column, col)


class Predictor:
    """Ray Data callable class: one model per actor; length-sorted, dynamically padded micro-batches."""

    def __init__(self, model_path: str, amp: str, batch_size: int, pad_id: int, top_k: int | None,
                 all_scores: bool, threads: int | None, num_predictors: int, use_gpu: bool,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification

        from bertray.modeling import INFERENCE_EAGER_MAX_WIDTH, AttentionSwitch, amp_dtype
        from bertray.tokenization import pad_multiple

        if threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // num_predictors)
        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # Inference holds the weights in the AMP dtype itself rather than autocasting fp32
        # weights: no per-call weight casts (on 2 CPUs ~12% more rows/s than bf16 autocast),
        # and half the memory. Predictions matched bf16 autocast on 99.9% of SST-2 rows.
        dtype = amp_dtype(amp, self.device) or torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, use_safetensors=True, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        self.attention = AttentionSwitch(self.model, INFERENCE_EAGER_MAX_WIDTH)
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.names = pa.array([id2label[i] for i in range(len(id2label))], pa.string())
        self.batch_size = batch_size
        self.pad_id = pad_id
        # Rows are length-sorted, so a micro-batch's rows are nearly equal in length anyway.
        self.pad_multiple = pad_multiple(self.device.type)
        self.top_k = min(top_k, len(id2label)) if top_k else None
        self.all_scores = all_scores

    def probabilities(self, ids: pa.ListArray) -> np.ndarray:
        """Softmax probabilities ``(rows, labels)`` in the rows' own order."""
        from bertray.tokenization import pad_flat

        torch = self.torch
        n = len(ids)
        probs = np.empty((n, len(self.names)), dtype=np.float32)
        if n == 0:
            return probs
        lengths = np.diff(ids.offsets.to_numpy())
        order = np.argsort(lengths, kind="stable")
        ordered = ids.take(pa.array(order))  # contiguous, offsets from 0
        values = ordered.values.to_numpy()
        offsets = ordered.offsets.to_numpy()
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                input_ids, mask = pad_flat(values, offsets[start:stop + 1], self.pad_id, self.pad_multiple)
                self.attention(input_ids.shape[1])
                logits = self.model(input_ids=torch.from_numpy(input_ids).to(self.device, non_blocking=True),
                                    attention_mask=torch.from_numpy(mask).to(self.device, non_blocking=True)).logits
                probs[order[start:stop]] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return probs

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(IDS).combine_chunks()
        probs = self.probabilities(ids)
        n = len(probs)
        best = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
        out = batch.drop_columns([IDS])
        out = out.append_column("prediction", self.names.take(pa.array(best)))
        out = out.append_column("score", pa.array(probs[np.arange(n), best], pa.float32()))
        if self.top_k:
            k = self.top_k
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            list_offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
            out = out.append_column("top_k_labels", pa.ListArray.from_arrays(
                list_offsets, self.names.take(pa.array(top.ravel()))))
            out = out.append_column("top_k_scores", pa.ListArray.from_arrays(
                list_offsets, pa.array(np.take_along_axis(probs, top, axis=1).ravel(), pa.float32())))
        if self.all_scores:
            for i, name in enumerate(self.names.to_pylist()):
                out = out.append_column(f"score_{name}", pa.array(probs[:, i], pa.float32()))
        return out


def _text_stats(col: pa.ChunkedArray | pa.Array) -> tuple[int, int]:
    """(null texts, empty or whitespace-only texts)."""
    if pa.types.is_null(col.type):
        return len(col), 0
    empty = pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)).as_py() or 0
    return col.null_count, int(empty)


def _scan_file(row: dict, text_column: str, label_column: str | None) -> dict:
    """One input file: rows, null/empty texts, label counts; an unreadable file is reported, not raised."""
    path = row["file"]
    rec = {"file": path, "rows": 0, "null": 0, "empty": 0, "labels": "[]", "error": ""}
    labels: dict = {}
    try:
        fs, fs_path = _filesystem(path)
        with fs.open_input_file(fs_path) as fh:
            # Every column is decoded (not only text and label) so that any damaged page is found
            # here, named, before prediction starts; decoding costs far less than the model.
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                nulls, empty = _text_stats(batch.column(text_column))
                rec["rows"] += batch.num_rows
                rec["null"] += nulls
                rec["empty"] += empty
                if label_column:
                    for c in pc.value_counts(batch.column(label_column)).to_pylist():
                        key = None if c["values"] is None else label_key(c["values"])
                        labels[key] = labels.get(key, 0) + c["counts"]
    except Exception as e:  # a damaged page: report it with the file name
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["labels"] = json.dumps(list(labels.items()))
    return rec


def _confusion_batch(batch: pa.Table, label_column: str, label2id: dict[str, int], num_labels: int) -> pa.Table:
    from bertray.metrics import confusion_matrix

    truth = np.fromiter((label2id[label_key(v)] for v in batch.column(label_column).to_pylist()),
                        dtype=np.int64, count=batch.num_rows)
    pred = np.fromiter((label2id[v] for v in batch.column("prediction").to_pylist()),
                       dtype=np.int64, count=batch.num_rows)
    return pa.table({"cm": [confusion_matrix(truth, pred, num_labels).ravel().tolist()]})


# ----------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    output: str
    date: str
    fs: pafs.FileSystem
    final: str  # output on ``fs`` (no scheme)
    files: list[str]
    rows_in: int  # from the Parquet footers
    model_path: str
    id2label: dict[int, str]
    label2id: dict[str, int]
    pad_id: int


def _check_model(cfg: PredictConfig) -> tuple[str, dict[int, str], dict[str, int], int]:
    from transformers import AutoConfig

    from bertray.modeling import check_is_classifier, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    if "://" in path:
        raise PredictError(f"model.path={path}: give a local or shared-filesystem directory (from_pretrained "
                           "cannot read object stores); copy the model next to the job first")
    try:
        check_is_classifier(path)
    except BertrayError as e:  # not a classifier / not a model directory
        raise PredictError(str(e)) from e
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    id2label = {int(k): str(v) for k, v in config.id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise PredictError(f"model {path}: id2label keys {sorted(id2label)} are not 0..{len(id2label) - 1}")
    label2id = {name: i for i, name in id2label.items()}
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    return path, id2label, label2id, int(tokenizer.pad_token_id or 0)


def preflight(cfg: PredictConfig) -> _Plan:
    """Every check that needs no Ray and reads no data pages: output rule, model, input files and columns.

    Raises:
        OutputExistsError, PredictError, DataError, ValueError: before any work is done.
    """
    output, date = resolve_output(cfg)
    fs, final = _filesystem(output)
    if "{" in output:
        raise PredictError(f"output={cfg.output}: only {{date}} can be filled in; got {output}")
    if cfg.on_existing == "error" and _exists(fs, final):
        raise OutputExistsError(f"output {output} already exists and on_existing=error; pass on_existing=overwrite "
                                "to replace it, or another output/date. The existing output was not touched.")
    model_path, id2label, label2id, pad_id = _check_model(cfg)
    source_fs, source = _filesystem(cfg.input)
    if (source_fs.type_name == fs.type_name and source_fs.get_file_info(source).type == pafs.FileType.Directory
            and (final + "/").startswith(source.rstrip("/") + "/")):
        raise PredictError(f"output {output} is inside the input directory {cfg.input}: a rerun would read the "
                           "predictions back as input; write them somewhere else")
    files = expand_paths(cfg.input)
    if detect_format(files, "auto") != "parquet":
        raise PredictError(f"input={cfg.input}: predict reads Parquet (.parquet files); got {files[:3]}")
    footers = parquet_footers(files)
    required = {"text_column": cfg.text_column, **({"label_column": cfg.label_column} if cfg.label_column else {})}
    for f, md in footers.items():
        schema = md.schema.to_arrow_schema()
        for key, col in required.items():
            if col not in schema.names:
                raise DataError(f"{f}: column {col!r} (from {key}) not found; columns in the data: {schema.names}. "
                                f"Set {key}=<one of those>.")
        t = schema.field(cfg.text_column).type
        if not _is_text_type(t):
            raise DataError(f"{f}: column {cfg.text_column!r} (text_column) has type {t}; it must hold strings")
    rows_in = sum(md.num_rows for md in footers.values())
    return _Plan(output, date, fs, final, files, rows_in, model_path, id2label, label2id, pad_id)


def check_input(ds, cfg: PredictConfig) -> None:
    """Columns of the Ray Dataset (hive partition keys included) don't clash with the added ones."""
    required = {"text_column": cfg.text_column, **({"label_column": cfg.label_column} if cfg.label_column else {})}
    check_columns(ds, cfg.input, required)
    names = ds.schema().names
    reserved = [c for c in names if c in RESERVED_COLUMNS or (cfg.all_scores and c.startswith("score_"))]
    if reserved:
        raise DataError(f"{cfg.input}: input column(s) {reserved} clash with the columns predict adds "
                        f"({', '.join(RESERVED_COLUMNS[1:])}, score_<label>); rename or drop them first")


def check_resources(cfg: PredictConfig) -> None:
    """Refuse a plan whose actors cannot all be scheduled (Ray Data would wait forever)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    # The actors hold their CPUs for the whole run; read and write tasks need room for one more task.
    need = cfg.num_predictors * cfg.predictor_cpus + cfg.num_tokenizer_actors * TASK_CPUS + TASK_CPUS
    if need > total + 1e-9:
        raise PredictError(
            f"the cluster has {total:g} CPUs but predict needs {need:g}: {cfg.num_predictors} predictor(s) x "
            f"predictor_cpus={cfg.predictor_cpus:g} + {cfg.num_tokenizer_actors} tokenizer actor(s) x {TASK_CPUS} "
            f"+ {TASK_CPUS} for read/write tasks; lower predictor_cpus or num_predictors")
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0.0) < cfg.num_predictors:
        raise PredictError(f"use_gpu=true with num_predictors={cfg.num_predictors} needs that many GPUs; "
                           f"the cluster has {ray.cluster_resources().get('GPU', 0.0):g}")


# ----------------------------------------------------------------------------- passes


def scan_input(cfg: PredictConfig, plan: _Plan) -> dict:
    """One streaming pass, a Ray task per file, that decodes every page but keeps nothing.

    Counts rows, null and empty texts and labels, and finds damaged data pages before any
    prediction work, naming the file (Ray's reader would fail mid-run without the name).

    Raises:
        DataError: an unreadable file; in evaluate mode null labels or labels unknown to the model.
    """
    import ray.data

    scans = ray.data.from_items([{"file": f} for f in plan.files]).map(
        _scan_file, num_cpus=TASK_CPUS, fn_kwargs={"text_column": cfg.text_column, "label_column": cfg.label_column})
    total = {"rows": 0, "null": 0, "empty": 0}
    labels: dict = {}
    errors = []
    for rec in scans.iter_rows():
        if rec["error"]:
            errors.append(_unreadable(rec["file"], rec["error"]))
        for k in total:
            total[k] += rec[k]
        for key, n in json.loads(rec["labels"]):
            labels[key] = labels.get(key, 0) + n
    if errors:
        raise DataError("; ".join(sorted(errors)))
    if cfg.label_column:
        if labels.get(None):
            raise DataError(f"{cfg.input}: {labels[None]} row(s) have a null label in column {cfg.label_column!r}; "
                            "evaluation needs a label on every row (or unset label_column to only predict)")
        unknown = {k: n for k, n in labels.items() if k not in plan.label2id}
        if unknown:
            detail = ", ".join(f"{k!r} ({n} rows)" for k, n in sorted(unknown.items()))
            raise DataError(f"{cfg.input}: label(s) in column {cfg.label_column!r} unknown to the model: {detail}. "
                            f"The model's labels (label2id): {list(plan.label2id)}.")
    total["labels"] = labels
    return total


def build_predictions(cfg: PredictConfig, plan: _Plan, ds):
    """The lazy Ray Dataset of ``ds`` (the checked input) + predictions; nothing runs until it is consumed."""
    from ray.data import ActorPoolStrategy

    opts = ds.context.execution_options
    opts.preserve_order = True  # ds.context is this read's own copy of the DataContext
    ds = ds.map_batches(
        PredictTokenize,
        fn_constructor_kwargs={"model_name": plan.model_path, "max_length": cfg.max_length, "label2id": None,
                               "text_column": cfg.text_column,
                               "truncation": cfg.truncation, "trust_remote_code": cfg.model.trust_remote_code,
                               "keep_columns": True},
        batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS,
        compute=ActorPoolStrategy(size=cfg.num_tokenizer_actors), num_cpus=TASK_CPUS)
    gpu = {"num_gpus": 1} if cfg.use_gpu else {}
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": plan.model_path, "amp": cfg.amp, "batch_size": cfg.batch_size,
                               "pad_id": plan.pad_id, "top_k": cfg.top_k, "all_scores": cfg.all_scores,
                               "threads": cfg.torch_threads, "num_predictors": cfg.num_predictors,
                               "use_gpu": cfg.use_gpu, "trust_remote_code": cfg.model.trust_remote_code},
        batch_format="pyarrow", batch_size=PREDICT_BATCH_ROWS,
        compute=ActorPoolStrategy(size=cfg.num_predictors), num_cpus=cfg.predictor_cpus, **gpu)


def evaluate_output(cfg: PredictConfig, plan: _Plan, tmp_uri: str, rows: int) -> dict:
    """Metrics from the written predictions: per-batch confusion matrices summed on the driver."""
    from bertray.metrics import classification_metrics

    n = len(plan.id2label)
    cm = np.zeros((n, n), dtype=np.int64)
    if rows:  # an empty input writes no files
        ds = read_table(tmp_uri, columns=[cfg.label_column, "prediction"])
        cms = ds.map_batches(_confusion_batch, batch_format="pyarrow", batch_size=8192, num_cpus=TASK_CPUS,
                             fn_kwargs={"label_column": cfg.label_column, "label2id": plan.label2id, "num_labels": n})
        for row in cms.iter_rows():
            cm += np.asarray(row["cm"], dtype=np.int64).reshape(n, n)
    metrics = classification_metrics(cm, plan.id2label)
    metrics["labels"] = [plan.id2label[i] for i in range(n)]
    metrics["label_column"] = cfg.label_column
    return metrics


# ----------------------------------------------------------------------------- commit


def commit(fs: pafs.FileSystem, tmp: str, final: str, on_existing: str) -> None:
    """Move a complete ``tmp`` to ``final`` (see the module docstring for the guarantees)."""
    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.exists(final):
            if on_existing == "error":
                raise OutputExistsError(f"output {final} appeared while this run was writing and on_existing=error; "
                                        "the new predictions were discarded and the existing output left untouched")
            old = _sibling(final, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:12]}")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)  # put the previous output back
                raise
            try:
                fs.delete_dir(old)
            except OSError as e:  # committed; the old copy is only garbage now
                log.warning("could not delete the previous output %s: %s", old, e)
        else:
            os.rename(tmp, final)
        return
    # Object stores: no rename. Copy everything but _SUCCESS, then _SUCCESS, then drop tmp.
    if _exists(fs, final):
        if on_existing == "error":
            raise OutputExistsError(f"output {final} appeared while this run was writing and on_existing=error")
        fs.delete_dir(final)
    fs.create_dir(final, recursive=True)  # a no-op on object stores, needed on filesystems with directories
    for info in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)):
        if info.type == pafs.FileType.File and os.path.basename(info.path) != SUCCESS_FILE:
            fs.copy_file(info.path, final + info.path[len(tmp):])
    fs.copy_file(f"{tmp}/{SUCCESS_FILE}", f"{final}/{SUCCESS_FILE}")
    fs.delete_dir(tmp)


# ----------------------------------------------------------------------------- run


def run(cfg: PredictConfig) -> dict:
    """Predict (and evaluate when ``label_column`` is set); returns the summary written to ``_SUCCESS``.

    Raises:
        OutputExistsError: the output exists and ``on_existing=error`` (checked before any work).
        DataError: missing column, unreadable Parquet file, unknown labels.
        PredictError / ValueError: the model directory is not a sequence classifier, resources don't fit.
        RuntimeError: the written row count differs from the input's (nothing is committed).
    """
    started = time.perf_counter()
    plan = preflight(cfg)
    from bertray.cluster import init_ray

    init_ray()
    check_resources(cfg)
    stale = _stale_leftovers(plan.fs, plan.final)
    if stale:
        log.warning("leftovers of earlier killed runs (delete them when no run writes %s): %s", plan.output, stale)
        print(f"[bertray] warning: leftovers of killed runs next to the output: {stale}", flush=True)
    stats = scan_input(cfg, plan)
    rows_in = plan.rows_in
    if stats["rows"] != rows_in:
        raise RuntimeError(f"{cfg.input}: Parquet footers say {rows_in} rows but reading gives {stats['rows']}; "
                           "the input changed during the run")
    source = read_table(cfg.input, files=plan.files)  # the files whose footers gave rows_in, not a new listing
    check_input(source, cfg)
    predictions = build_predictions(cfg, plan, source)
    print(f"[bertray] predicting {rows_in} rows from {len(plan.files)} file(s) with {plan.model_path} "
          f"-> {plan.output}", flush=True)

    tmp_name = f".{plan.final.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:12]}"
    tmp, tmp_uri = _sibling(plan.final, tmp_name), _sibling(plan.output, tmp_name)
    plan.fs.create_dir(tmp, recursive=True)
    try:
        # try_create_dir=False: a write task still running after a failure must not recreate the
        # temp dir we delete, and Ray must not delete it when no rows were written.
        if rows_in:
            predictions.write_parquet(tmp_uri, try_create_dir=False, ray_remote_args={"num_cpus": TASK_CPUS})
        written = parquet_files(plan.fs, tmp)
        if not written:  # no input rows: still leave one (empty) file with the output schema for readers
            written = [_write_empty(cfg, plan, tmp)]
        rows_out = sum(pq.read_metadata(f, filesystem=plan.fs).num_rows for f in written)
        if rows_out != rows_in:
            raise RuntimeError(f"wrote {rows_out} rows but the input has {rows_in}; nothing was committed to "
                               f"{plan.output}")
        metrics = None
        if cfg.label_column:
            metrics = evaluate_output(cfg, plan, tmp_uri, rows_out)
            _write_text(plan.fs, f"{tmp}/{METRICS_FILE}", json.dumps(metrics, indent=2))
            _plot(plan, metrics, tmp)
        seconds = time.perf_counter() - started
        summary = {
            "rows_in": rows_in, "rows_out": rows_out, "null_texts": stats["null"],
            "empty_texts": stats["null"] + stats["empty"], "files_in": len(plan.files), "files_out": len(written),
            "model": plan.model_path, "input": cfg.input, "output": plan.output, "date": plan.date,
            "amp": cfg.amp, "amp_dtype": _amp_name(cfg), "max_length": cfg.max_length, "truncation": cfg.truncation,
            "seconds": round(seconds, 3), "rows_per_s": round(rows_in / seconds, 2) if seconds else None,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        if metrics is not None:
            summary["metrics"] = {k: metrics[k] for k in ("accuracy", "f1_macro", "f1_weighted")}
        _write_text(plan.fs, f"{tmp}/{SUCCESS_FILE}", json.dumps(summary, indent=2))
        commit(plan.fs, tmp, plan.final, cfg.on_existing)
    except BaseException:
        try:
            _delete(plan.fs, tmp)
        except Exception as cleanup:  # keep the original error
            log.warning("could not delete %s: %s", tmp, cleanup)
        raise
    print(f"[bertray] wrote {rows_out} rows to {plan.output} in {summary['seconds']:.1f}s "
          f"({summary['rows_per_s']} rows/s; empty texts: {summary['empty_texts']})"
          + (f"; accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f}" if metrics else ""),
          flush=True)
    return summary


def evaluate(cfg: PredictConfig) -> dict:
    """:func:`run` in evaluate mode (``label_column`` defaults to ``label``); the summary gets the full metrics."""
    import dataclasses

    if not cfg.label_column:
        cfg = dataclasses.replace(cfg, label_column="label")
    summary = run(cfg)
    fs, final = _filesystem(summary["output"])
    with fs.open_input_stream(f"{final}/{METRICS_FILE}") as f:
        summary["metrics"] = json.loads(f.read())
    return summary


def _write_empty(cfg: PredictConfig, plan: _Plan, tmp: str) -> str:
    source_fs, source = _filesystem(plan.files[0])
    schema = pq.read_schema(source, filesystem=source_fs)
    fields = [pa.field("prediction", pa.string()), pa.field("score", pa.float32())]
    if cfg.top_k:
        fields += [pa.field("top_k_labels", pa.list_(pa.string())), pa.field("top_k_scores", pa.list_(pa.float32()))]
    if cfg.all_scores:
        fields += [pa.field(f"score_{plan.id2label[i]}", pa.float32()) for i in range(len(plan.id2label))]
    path = f"{tmp}/part-empty.parquet"
    with plan.fs.open_output_stream(path) as f:
        pq.write_table(pa.schema([*schema.remove_metadata(), *fields]).empty_table(), f)
    return path


def _amp_name(cfg: PredictConfig) -> str:
    """The compute dtype the predictors use (CPU flags read on the driver; GPU: as configured)."""
    if cfg.use_gpu:
        return cfg.amp
    import torch

    from bertray.modeling import amp_dtype

    return {None: "fp32", torch.bfloat16: "bf16"}.get(amp_dtype(cfg.amp, torch.device("cpu")), cfg.amp)


def _plot(plan: _Plan, metrics: dict, tmp: str) -> None:
    import tempfile

    from bertray.metrics import plot_confusion_matrix

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, CONFUSION_PNG)
        plot_confusion_matrix(metrics["confusion_matrix"], plan.id2label, local)
        with open(local, "rb") as f:
            _write_text(plan.fs, f"{tmp}/{CONFUSION_PNG}", f.read())

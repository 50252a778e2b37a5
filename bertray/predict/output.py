"""What predict writes into its staging directory: the predictions, and in evaluate mode the metrics.

Output columns: every input column unchanged and in input order, plus ``prediction`` (the
label name from the model's ``id2label``) and ``score`` (its softmax probability, float32);
with ``top_k`` also ``top_k_labels`` / ``top_k_scores`` (lists, best first) and with
``all_scores`` one ``score_<label>`` column per class.

Files beside the data, committed with it: ``_SUCCESS`` (the run summary, JSON; written
last) and, in evaluate mode, ``_metrics.json`` and ``_confusion_matrix.png``. The leading
underscore keeps Parquet readers (pyarrow, pandas, Spark, Ray, bertray) from taking them for
data. Metrics are computed from the written predictions (a read of two columns), per-batch
confusion matrices summed on the driver.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertray.config import PredictConfig
from bertray.data import TASK_CPUS, read_table
from bertray.labels import label_key
from bertray.predict.preflight import Plan
from bertray.predict.scan import ScanStats, parquet_files, read_schema
from bertray.storage import SUCCESS_FILE, Stage, write_bytes

METRICS_FILE = "_metrics.json"
CONFUSION_PNG = "_confusion_matrix.png"


def added_fields(cfg: PredictConfig, id2label: dict[int, str]) -> list[pa.Field]:
    """The columns predict appends to the input's, in order (the predictor writes the same)."""
    fields = [pa.field("prediction", pa.string()), pa.field("score", pa.float32())]
    if cfg.top_k:
        fields += [pa.field("top_k_labels", pa.list_(pa.string())), pa.field("top_k_scores", pa.list_(pa.float32()))]
    if cfg.all_scores:
        fields += [pa.field(f"score_{id2label[i]}", pa.float32()) for i in range(len(id2label))]
    return fields


def write_predictions(cfg: PredictConfig, plan: Plan, predictions, stage: Stage, rows_in: int) -> tuple[int, int]:
    """Write the lazy ``predictions`` into ``stage`` and check rows out = rows in.

    Returns ``(rows written, files written)``.

    Raises:
        RuntimeError: the written row count differs from the input's (nothing will be committed).
    """
    # try_create_dir=False: a write task still running after a failure must not recreate the
    # staging dir we delete, and Ray must not delete it when no rows were written.
    if rows_in:
        predictions.write_parquet(stage.uri, try_create_dir=False, ray_remote_args={"num_cpus": TASK_CPUS})
    written = parquet_files(stage.fs, stage.path)
    if not written:  # no input rows: still leave one (empty) file with the output schema for readers
        written = [_write_empty(cfg, plan, stage)]
    rows_out = sum(pq.read_metadata(f, filesystem=stage.fs).num_rows for f in written)
    if rows_out != rows_in:
        raise RuntimeError(f"wrote {rows_out} rows but the input has {rows_in}; nothing was committed to "
                           f"{plan.output}")
    return rows_out, len(written)


def _write_empty(cfg: PredictConfig, plan: Plan, stage: Stage) -> str:
    schema = read_schema(plan.files[0], plan.fmt)
    path = f"{stage.path}/part-empty.parquet"
    with stage.fs.open_output_stream(path) as f:
        pq.write_table(pa.schema([*schema.remove_metadata(), *added_fields(cfg, plan.model.id2label)]).empty_table(), f)
    return path


def summarize(cfg: PredictConfig, plan: Plan, stats: ScanStats, rows_out: int, files_out: int,
              metrics: dict | None, seconds: float, amp: str) -> dict:
    """The run summary: returned by ``run``, written to ``_SUCCESS``, printed by the CLI."""
    summary = {
        "rows_in": stats.rows, "rows_out": rows_out, "null_texts": stats.null,
        "empty_texts": stats.null + stats.empty, "files_in": len(plan.files), "files_out": files_out,
        "model": plan.model.path, "input": cfg.input, "output": plan.output, "date": plan.date,
        "amp": cfg.amp, "amp_dtype": amp, "max_length": plan.model.max_length, "truncation": cfg.truncation,
        "seconds": round(seconds, 3), "rows_per_s": round(stats.rows / seconds, 2) if seconds else None,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if metrics is not None:
        summary["metrics"] = {k: metrics[k] for k in ("accuracy", "f1_macro", "f1_weighted")}
    return summary


def write_summary(stage: Stage, summary: dict) -> None:
    """``_SUCCESS``, the last file of a complete output: what marks it as bertray's (see bertray.storage)."""
    write_bytes(stage.fs, f"{stage.path}/{SUCCESS_FILE}", json.dumps(summary, indent=2))


# ----------------------------------------------------------------------------- evaluate mode


def write_metrics(cfg: PredictConfig, plan: Plan, stage: Stage, rows: int) -> dict:
    """``_metrics.json`` and ``_confusion_matrix.png`` from the written predictions; returns the metrics."""
    metrics = evaluate_output(cfg, plan, stage.uri, rows)
    write_bytes(stage.fs, f"{stage.path}/{METRICS_FILE}", json.dumps(metrics, indent=2))
    _plot(plan, metrics, stage)
    return metrics


def evaluate_output(cfg: PredictConfig, plan: Plan, written_uri: str, rows: int) -> dict:
    """Metrics from the written predictions: per-batch confusion matrices summed on the driver."""
    from bertray.metrics import classification_metrics

    id2label, label2id = plan.model.id2label, plan.model.label2id
    n = len(id2label)
    cm = np.zeros((n, n), dtype=np.int64)
    if rows:  # an empty input writes no files
        ds = read_table(written_uri, columns=[cfg.label_column, "prediction"])
        cms = ds.map_batches(_confusion_batch, batch_format="pyarrow", batch_size=8192, num_cpus=TASK_CPUS,
                             fn_kwargs={"label_column": cfg.label_column, "label2id": label2id, "num_labels": n})
        for row in cms.iter_rows():
            cm += np.asarray(row["cm"], dtype=np.int64).reshape(n, n)
    metrics = classification_metrics(cm, id2label)
    metrics["labels"] = [id2label[i] for i in range(n)]
    metrics["label_column"] = cfg.label_column
    return metrics


def _confusion_batch(batch: pa.Table, label_column: str, label2id: dict[str, int], num_labels: int) -> pa.Table:
    from bertray.metrics import confusion_matrix

    truth = np.fromiter((label2id[label_key(v)] for v in batch.column(label_column).to_pylist()),
                        dtype=np.int64, count=batch.num_rows)
    pred = np.fromiter((label2id[v] for v in batch.column("prediction").to_pylist()),
                       dtype=np.int64, count=batch.num_rows)
    return pa.table({"cm": [confusion_matrix(truth, pred, num_labels).ravel().tolist()]})


def _plot(plan: Plan, metrics: dict, stage: Stage) -> None:
    import tempfile

    from bertray.metrics import plot_confusion_matrix

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, CONFUSION_PNG)
        plot_confusion_matrix(metrics["confusion_matrix"], plan.model.id2label, local)
        with open(local, "rb") as f:
            write_bytes(stage.fs, f"{stage.path}/{CONFUSION_PNG}", f.read())

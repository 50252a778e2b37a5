"""What predict writes into its staging directory: the predictions, and in evaluate mode the metrics.

Output columns: every input column unchanged and in input order, plus the model's problem
type's (``Problem.output_columns``): single-label ``prediction`` (the label name from the
model's ``id2label``) and ``score`` (its softmax probability, float32), with ``top_k`` also
``top_k_labels`` / ``top_k_scores`` (lists, best first); multi-label ``prediction`` (the
labels at or above the threshold, a list of strings) and ``score`` (their sigmoid
probabilities, same order); regression ``prediction`` (float64, raw units) only. With
``all_scores`` one ``score_<label>`` column per class.

Files beside the data, committed with it: ``_SUCCESS`` (the run summary, JSON; written
last) and, in evaluate mode, ``_metrics.json`` and a plot: ``_confusion_matrix.png``
(single-label), ``_label_f1.png`` (multi-label) or ``_scatter.png`` (regression). The leading
underscore keeps Parquet readers (pyarrow, pandas, Spark, Ray, bertray) from taking them for
data. Metrics are computed from the written predictions (a read of two columns), by the
problem type's evaluation state filled batch by batch on the driver.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertray import calibration, report
from bertray.config import PredictConfig
from bertray.data import read_table
from bertray.pieces import Resume, Source, collect
from bertray.predict.preflight import Plan
from bertray.predict.scan import ScanStats, parquet_files, read_schema
from bertray.problem import MULTI, REGRESSION, SINGLE, EvalState, Problem
from bertray.storage import SUCCESS_FILE, Stage, write_bytes

METRICS_FILE = "_metrics.json"
CONFUSION_PNG = "_confusion_matrix.png"
PLOT_FILES = {SINGLE: CONFUSION_PNG, MULTI: "_label_f1.png", REGRESSION: "_scatter.png"}
SUMMARY_METRICS = ("accuracy", "f1_macro", "f1_weighted", "f1_micro", "f1_samples", "threshold", "ece",
                   "mse", "rmse", "mae", "pearson", "spearman", "r2")
"""The figures ``_SUCCESS`` repeats (those the run's problem type has); ``_metrics.json`` has them all."""


def added_fields(cfg: PredictConfig, problem: Problem) -> list[pa.Field]:
    """The columns predict appends to the input's, in order (the predictor writes the same)."""
    return problem.output_fields(cfg.all_scores, cfg.top_k)


def collect_predictions(cfg: PredictConfig, plan: Plan, resume: Resume, inputs: list[Source], stage: Stage,
                        rows_in: int) -> tuple[int, int]:
    """Move every input file's finished piece into ``stage`` in input order and check rows out =
    rows in. Returns ``(rows written, files written)``.

    Raises:
        RuntimeError: an input has no finished piece, or the written row count differs from
            the input's (nothing will be committed).
    """
    collect(resume, inputs, stage.path)
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
        pq.write_table(pa.schema([*schema.remove_metadata(), *added_fields(cfg, plan.model.problem)]).empty_table(), f)
    return path


def summarize(cfg: PredictConfig, plan: Plan, stats: ScanStats, rows_out: int, files_out: int,
              metrics: dict | None, seconds: float, run_report: dict) -> dict:
    """The run summary: returned by ``run``, written to ``_SUCCESS``, printed by the CLI."""
    summary = {
        "rows_in": stats.rows, "rows_out": rows_out, "null_texts": stats.null,
        "empty_texts": stats.null + stats.empty, "files_in": len(plan.files), "files_out": files_out,
        "model": plan.model.path, "input": cfg.input, "output": plan.output, "date": plan.date,
        "amp": cfg.amp, "backend": plan.model.backend.to_dict(), "max_length": plan.model.max_length,
        "truncation": cfg.truncation,
        "seconds": round(seconds, 3), "rows_per_s": round(stats.rows / seconds, 2) if seconds else None,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if metrics is not None:
        summary["metrics"] = {k: metrics[k] for k in SUMMARY_METRICS if k in metrics}
    if plan.registered:
        summary["model_registry"] = plan.registered
    summary["psi"] = run_report["psi"]
    summary["alerts"] = run_report["alerts"]
    return summary


def write_summary(stage: Stage, summary: dict) -> None:
    """``_SUCCESS``, the last file of a complete output: what marks it as bertray's (see bertray.storage)."""
    write_bytes(stage.fs, f"{stage.path}/{SUCCESS_FILE}", json.dumps(summary, indent=2))


# ----------------------------------------------------------------------------- evaluate mode


def write_metrics(cfg: PredictConfig, plan: Plan, stage: Stage, rows: int) -> dict:
    """``_metrics.json`` and the problem type's plot from the written predictions; returns the metrics."""
    metrics, state = evaluate_output(cfg, plan, stage.uri, rows)
    write_bytes(stage.fs, f"{stage.path}/{METRICS_FILE}", json.dumps(metrics, indent=2))
    _plot(plan, metrics, state, stage)
    return metrics


def evaluate_output(cfg: PredictConfig, plan: Plan, written_uri: str, rows: int) -> tuple[dict, EvalState]:
    """Metrics from the written predictions (two columns read back), by the model's problem
    type at the threshold predict used; returns (metrics, the evaluation state).

    Raises:
        LabelError: null, NaN or unknown labels, with their count (nothing is committed).
    """
    problem = plan.model.problem.for_output()
    state, sums = problem.new_state(), np.zeros((3, calibration.BINS))
    calibration_columns = problem.calibration_columns(cfg.all_scores)
    if rows:  # an empty input writes no files
        ds = read_table(written_uri, columns=[cfg.label_column, "prediction", *calibration_columns])
        for batch in ds.iter_batches(batch_size=8192, batch_format="pyarrow"):
            problem.update_from_output(state, batch.column(cfg.label_column), batch.column("prediction"),
                                       cfg.input, cfg.label_column)
            events = problem.output_events(batch, cfg.label_column, cfg.input) if calibration_columns else None
            if events is not None:
                sums += calibration.bin_sums(*events)
    metrics = problem.metrics(state)
    metrics.pop("loss", None)
    if sums[0].sum():
        metrics["ece"] = calibration.ece(calibration.table(sums))
    id2label = plan.model.id2label
    metrics["labels"] = [id2label[i] for i in range(len(id2label))]
    metrics["label_column"] = cfg.label_column
    return metrics, state


def write_report(cfg: PredictConfig, plan: Plan, stage: Stage, rows: int) -> dict:
    """``_report.json`` and ``_report.png`` from the written predictions (:mod:`bertray.report`)."""
    problem = plan.model.problem
    base = plan.baselines
    edges = (base.training or {}).get("edges", []) if problem.name == REGRESSION else []
    tally = report.OutputTally(problem.name, cfg.report.low_confidence, edges)
    columns = ["prediction"] if problem.name == REGRESSION else ["prediction", "score"]
    for path in parquet_files(stage.fs, stage.path):  # two columns, streamed on the driver
        with stage.fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
                tally.add(batch)
    limits = report.Limits(cfg.report.low_confidence, cfg.report.max_psi, cfg.report.max_low_confidence)
    content = report.build(tally, limits, base.training, base.previous, list(base.notes))
    content["model"] = {"path": plan.model.path, **({"registry": plan.registered} if plan.registered else {})}
    write_bytes(stage.fs, f"{stage.path}/{report.REPORT_FILE}", json.dumps(content, indent=2))
    with _local_file(stage, report.REPORT_PNG) as local:
        report.plot(content, base.training, base.previous, local)
    return content


def plot_file(problem: Problem) -> str:
    """The plot evaluate writes beside ``_metrics.json`` for a problem type."""
    return PLOT_FILES[problem.name]


def _plot(plan: Plan, metrics: dict, state: EvalState, stage: Stage) -> None:
    from bertray.metrics import plot_confusion_matrix

    with _local_file(stage, plot_file(plan.model.problem)) as local:
        if plan.model.problem.name == SINGLE:
            plot_confusion_matrix(metrics["confusion_matrix"], plan.model.id2label, local)
        elif plan.model.problem.name == MULTI:
            _plot_label_f1(metrics["per_class"], local)
        else:
            _plot_scatter(state.gathered().cpu().numpy(), local)


@contextlib.contextmanager
def _local_file(stage: Stage, name: str) -> Iterator[str]:
    """A local path to write ``name`` to; copied into the stage (any filesystem) on exit."""
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, name)
        yield local
        with open(local, "rb") as f:
            write_bytes(stage.fs, f"{stage.path}/{name}", f.read())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_label_f1(per_class: dict, path: str) -> None:
    """Horizontal bars: each label's F1 at the threshold, with its support."""
    plt = _pyplot()
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(6, 1.0 + 0.3 * len(names)))
    ax.barh(range(len(names)), [per_class[n]["f1"] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), [f"{n} ({per_class[n]['support']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (support)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_scatter(pairs: np.ndarray, path: str) -> None:
    """Predicted against true values, with the diagonal of perfect predictions."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    pred, true = pairs[:, 0], pairs[:, 1]
    ax.scatter(true, pred, s=6, alpha=0.4)
    if len(pairs):
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

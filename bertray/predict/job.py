"""The predict and evaluate jobs: preflight, scan, predict the pieces, commit (see :mod:`bertray.predict`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from bertray import pieces, storage, tracking
from bertray.config import PredictConfig
from bertray.data import read_table
from bertray.predict.output import (
    CONFUSION_PNG,
    METRICS_FILE,
    collect_predictions,
    summarize,
    write_metrics,
    write_report,
    write_summary,
)
from bertray.predict.predictor import build_predictions, tagged_source, write_pieces
from bertray.predict.preflight import PredictError, check_input, check_resources, preflight, required_columns
from bertray.predict.scan import check_labels, scan_input
from bertray.problem import SINGLE, headline
from bertray.storage import SUCCESS_FILE, OutputError, OutputExistsError

__all__ = ["CONFUSION_PNG", "METRICS_FILE", "SUCCESS_FILE", "OutputError", "OutputExistsError", "PredictError",
           "evaluate", "run"]

log = logging.getLogger(__name__)
PREDICT_FORMATS = ("parquet",)
PIECE_SETTINGS = ("text_column", "text_pair_column", "truncation", "batch_size", "top_k", "all_scores",
                  "threshold", "use_gpu")
"""Settings that change an output row: a finished piece is reused only when they are the same."""
EVALUATE_FORMATS = ("parquet", "csv", "json")


def run(cfg: PredictConfig, formats: tuple[str, ...] = PREDICT_FORMATS) -> dict:
    """Predict (and evaluate when ``label_column`` is set); returns the summary written to ``_SUCCESS``.

    Raises:
        OutputExistsError, OutputError: the output exists and may not be replaced (checked before any work).
        DataError: missing column, unreadable file, unknown labels.
        PredictError: the model folder is not a safetensors sequence classifier, resources don't fit.
        ConfigError: ``max_length`` above the model's positions.
        RuntimeError: the written row count differs from the input's (nothing is committed).
    """
    from bertray.cluster import init_ray

    started = time.perf_counter()
    clock = _Laps(started)
    cfg, registered = _registered_model(cfg)
    plan = preflight(cfg, formats, registered)
    print(f"[bertray] backend: {plan.model.backend.backend.label} ({plan.model.backend.reason})", flush=True)
    init_ray()
    check_resources(cfg)
    _warn_stale(plan)
    clock.lap("preflight")
    stats = scan_input(cfg.input, plan.files, plan.fmt, required_columns(cfg), plan.file_rows)
    if cfg.label_column and plan.model.problem.name == SINGLE:  # the others' labels are checked as they are scored
        check_labels(cfg.input, cfg.label_column, stats.labels, plan.model.label2id)
    clock.lap("scan")
    inputs, resume = _predict_pieces(cfg, plan, stats.rows)
    clock.lap("predict")
    with storage.staged(plan.fs, plan.final, plan.output) as stage:
        rows_out, files_out = collect_predictions(cfg, plan, resume, inputs, stage, stats.rows)
        clock.lap("collect")
        metrics = write_metrics(cfg, plan, stage, rows_out) if cfg.label_column else None
        if metrics is not None:
            clock.lap("evaluate")
        run_report = write_report(cfg, plan, stage, rows_out)
        clock.lap("report")
        summary = summarize(cfg, plan, stats, rows_out, files_out, metrics,
                            time.perf_counter() - started, run_report)
        summary["stage_seconds"] = clock.laps
        write_summary(stage, summary)
        storage.commit(plan.fs, stage.path, plan.final, cfg.on_existing)
    pieces.discard(resume)
    print(f"[bertray] wrote {rows_out} rows to {plan.output} in {summary['seconds']:.1f}s "
          f"({summary['rows_per_s']} rows/s; empty texts: {summary['empty_texts']})"
          + (f"; {headline(metrics)}" if metrics else ""),
          flush=True)
    for note in run_report["notes"]:
        print(f"[bertray] report: {note}", flush=True)
    for alert in summary["alerts"]:
        print(f"[bertray] ALERT: {alert}", flush=True)
    return summary


@dataclass
class _Laps:
    """Seconds per stage of a run, for ``_SUCCESS``'s ``stage_seconds`` (where a night's time went)."""

    last: float
    laps: dict[str, float] = field(default_factory=dict)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self.last, 3)
        self.last = now


def _registered_model(cfg: PredictConfig) -> tuple[PredictConfig, dict | None]:
    """``model.path=models:/<name>@<alias>`` (or ``/<version>``) resolved through the MLflow
    registry to its cached local copy; returns the config on that copy and what was resolved."""
    if not tracking.is_registry_uri(cfg.model.path):
        return cfg, None
    found = tracking.resolve_model(cfg.model.path, cfg.tracking.mlflow_uri)
    print(f"[bertray] {found.uri} is version {found.version} of {found.name} ({found.tracking_uri})", flush=True)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=found.path)), found.to_dict()


def _predict_pieces(cfg: PredictConfig, plan, rows: int) -> tuple[list[pieces.Source], pieces.Resume]:
    """Predict the input files that have no finished piece from an earlier run of the same
    command (:mod:`bertray.pieces`); returns every input and where its piece is."""
    names = read_table(cfg.input, files=plan.files)
    check_input(names, cfg, plan.model.problem)  # before anything is written
    inputs = pieces.sources(plan.files, plan.file_rows)
    per_file = "path" not in names.schema().names  # Ray's per-file path column would overwrite the input's own
    if not per_file:
        print("[bertray] note: the input has a column named 'path', so a rerun after a failure redoes the whole "
              "input instead of only the unfinished files", flush=True)
        inputs = [pieces.whole(cfg.input, inputs)]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in PIECE_SETTINGS}
    command = pieces.command(plan.model.path, {**settings, "max_length": plan.model.max_length,
                                               "backend": plan.model.backend.backend.label})
    resume = pieces.prepare(pieces.directory(plan.output), command, inputs)
    todo = [s for s in inputs if s.path not in resume.done]
    if len(todo) < len(inputs):
        print(f"[bertray] reused {len(inputs) - len(todo)} of {len(inputs)} input files (finished in an earlier "
              f"run of this command)", flush=True)
    if rows and any(s.rows != 0 for s in todo):
        print(f"[bertray] predicting {len(todo)} file(s) with {plan.model.path} -> {plan.output}", flush=True)
        source = tagged_source(cfg.input, [s.path for s in todo] if per_file else plan.files,
                               None if per_file else todo[0].path)
        write_pieces(build_predictions(cfg, plan.model, source), resume.attempt_uri, todo)
    return inputs, resume


def evaluate(cfg: PredictConfig) -> dict:
    """:func:`run` in evaluate mode (``label_column`` defaults to ``label``) on Parquet, CSV or JSONL;
    the summary gets the full metrics."""
    if not cfg.label_column:
        cfg = dataclasses.replace(cfg, label_column="label")
    summary = run(cfg, EVALUATE_FORMATS)
    fs, final = storage.filesystem(summary["output"])
    with fs.open_input_stream(f"{final}/{METRICS_FILE}") as f:
        summary["metrics"] = json.loads(f.read())
    return summary


def _warn_stale(plan) -> None:
    stale = storage.stale_leftovers(plan.fs, plan.final)
    if stale:
        log.warning("leftovers of earlier killed runs (delete them when no run writes %s): %s", plan.output, stale)
        print(f"[bertray] warning: leftovers of killed runs next to the output: {stale}", flush=True)

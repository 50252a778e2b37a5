"""The run report of a predict run, and its drift alerts.

Every predict run writes ``_report.json`` (and ``_report.png``) beside ``_SUCCESS``: rows,
the distribution of the predictions, scores and the share of low-confidence rows, and the
population stability index (PSI) of the prediction distribution against the training labels
(saved with the model as ``training_distribution.json``) and against a previous run's report.

Distributions are shares over named bins:

- single-label: one bin per label (the predicted label);
- multi-label: one bin per label plus ``(none)``, each row counted once per predicted label
  (rows with no label in ``(none)``), normalised to shares; per-label row shares are listed too;
- regression: the deciles of the training labels cut the line into ten bins.

``PSI = sum((a - e) * ln(a / e))`` over the bins, with shares floored at 1e-4 so that an
empty bin stays finite; the usual reading is < 0.1 stable, 0.1-0.25 a shift, > 0.25 a
large shift.

Pure: numpy and pyarrow, no ``ray``.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertray.errors import BertrayError
from bertray.problem import MULTI, REGRESSION, LabelStats, Problem

TRAINING_FILE = "training_distribution.json"
REPORT_FILE = "_report.json"
REPORT_PNG = "_report.png"
NO_LABEL = "(none)"
PSI_FLOOR = 1e-4
SCORE_BINS = 20
DECILES = tuple(i / 10 for i in range(1, 10))


class ReportError(BertrayError):
    """A previous report that exists but cannot be read, or a report setting that cannot work."""


# ----------------------------------------------------------------------------- distributions


def psi(actual: Mapping[str, float], expected: Mapping[str, float]) -> float:
    """Population stability index of two share distributions over the same named bins."""
    total = 0.0
    for name in set(actual) | set(expected):
        a = max(float(actual.get(name, 0.0)), PSI_FLOOR)
        e = max(float(expected.get(name, 0.0)), PSI_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(counts.values()))
    return {k: (float(v) / total if total else 0.0) for k, v in counts.items()}


def bin_names(edges: list[float]) -> list[str]:
    """Names of the bins that ``edges`` cut the line into: ``<1.2``, ``1.2-2.5``, ``>=4.1``."""
    if not edges:
        return ["all"]
    inner = [f"{lo:.6g}-{hi:.6g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [f"<{edges[0]:.6g}", *inner, f">={edges[-1]:.6g}"]


def histogram(values: np.ndarray, edges: list[float], weights: np.ndarray | None = None) -> dict[str, float]:
    """Rows (or ``weights``) per bin of :func:`bin_names`; a value equal to an edge goes above it."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    counts = np.bincount(index, weights, minlength=len(edges) + 1)
    return dict(zip(bin_names(edges), (c.item() for c in counts), strict=True))


def training_distribution(problem: Problem, stats: LabelStats) -> dict:
    """What ``training_distribution.json`` holds: the training labels as shares over the
    report's bins (regression: over the training deciles, with the edges)."""
    if problem.name == REGRESSION:
        values = np.array([float(v) for v in stats.counts], dtype=np.float64)
        weights = np.array(list(stats.counts.values()), dtype=np.float64)
        edges = _weighted_quantiles(values, weights, DECILES) if len(values) else []
        edges = sorted(set(edges))
        counts = histogram(values, edges, weights)
        return {"problem_type": problem.name, "rows": stats.rows, "edges": edges, "shares": shares(counts)}
    counts = {problem.id2label[i]: float(n) for i, n in problem.label_counts(stats).items()}
    out = {"problem_type": problem.name, "rows": stats.rows}
    if problem.name == MULTI:
        out["label_row_shares"] = {k: v / stats.rows if stats.rows else 0.0 for k, v in counts.items()}
        counts[NO_LABEL] = float(stats.empty)
    return out | {"shares": shares(counts)}


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> list[float]:
    order = np.argsort(values)
    values, cum = values[order], np.cumsum(weights[order])
    # the first value with more than q of the weight at or below it: bins [edge, next) hold q each
    return [float(values[min(np.searchsorted(cum, q * cum[-1], side="right"), len(values) - 1)]) for q in qs]


# ----------------------------------------------------------------------------- accumulating the output


@dataclass
class OutputTally:
    """What the report needs from the written predictions, summed over batches."""

    problem: str
    low_confidence: float
    edges: list[float] = field(default_factory=list)
    rows: int = 0
    counts: dict[str, float] = field(default_factory=dict)
    label_rows: dict[str, float] = field(default_factory=dict)
    score_sum: float = 0.0
    low_rows: int = 0
    score_hist: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    values: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        prediction = batch.column("prediction")
        if self.problem == REGRESSION:
            values = prediction.to_numpy(zero_copy_only=False).astype(np.float64)
            self.values.append(values)
            for name, n in histogram(values, self.edges).items():
                self.counts[name] = self.counts.get(name, 0) + n
            return
        if self.problem == MULTI:
            best = self._add_lists(prediction, batch.column("score"))
        else:
            best = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
            self._count(pc.value_counts(prediction), self.counts)
        self.score_sum += float(best.sum())
        self.low_rows += int((best < self.low_confidence).sum())
        index = np.clip((best * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
        self.score_hist += np.bincount(index, minlength=SCORE_BINS)

    def _add_lists(self, prediction, score) -> np.ndarray:
        """Count predicted labels; returns each row's best score (0 for a row with no label)."""
        self._count(pc.value_counts(pc.list_flatten(prediction)), self.label_rows)
        lengths = pc.list_value_length(prediction).to_numpy(zero_copy_only=False)
        self.counts[NO_LABEL] = self.counts.get(NO_LABEL, 0) + int((lengths == 0).sum())
        first = pc.list_element(pc.if_else(pc.equal(pc.list_value_length(score), 0), pa.scalar([0.0], score.type),
                                           score), 0)
        return first.to_numpy(zero_copy_only=False).astype(np.float64)

    @staticmethod
    def _count(value_counts, into: dict) -> None:
        for item in value_counts.to_pylist():
            into[str(item["values"])] = into.get(str(item["values"]), 0) + item["counts"]


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Limits:
    """``report.*`` settings the report is judged by."""

    low_confidence: float = 0.5
    max_psi: float | None = None
    max_low_confidence: float | None = None


def distribution(tally: OutputTally) -> dict[str, float]:
    """The predictions as shares over the report's bins."""
    if tally.problem == MULTI:
        return shares({**tally.label_rows, NO_LABEL: tally.counts.get(NO_LABEL, 0)})
    return shares(tally.counts)


def build(tally: OutputTally, limits: Limits, training: Mapping | None, previous: Mapping | None,
          notes: list[str]) -> dict:
    """``_report.json``'s content, alerts included."""
    current = distribution(tally)
    report = {"rows": tally.rows, "problem_type": tally.problem, "distribution": current}
    if tally.problem == MULTI:
        report["label_row_shares"] = {k: v / tally.rows if tally.rows else 0.0 for k, v in tally.label_rows.items()}
    if tally.problem == REGRESSION:
        values = np.concatenate(tally.values) if tally.values else np.zeros(0)
        report["quantiles"] = ({f"p{int(q * 100)}": float(np.quantile(values, q))
                                for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)} if len(values) else {})
        report["mean_prediction"] = float(values.mean()) if len(values) else None
    else:
        report["mean_score"] = tally.score_sum / tally.rows if tally.rows else None
        report["low_confidence"] = {"below": limits.low_confidence, "rows": tally.low_rows,
                                    "share": tally.low_rows / tally.rows if tally.rows else 0.0}
        report["score_histogram"] = {"edges": [i / SCORE_BINS for i in range(SCORE_BINS + 1)],
                                     "counts": tally.score_hist.tolist()}
    report["psi"] = {"training": psi(current, training["shares"]) if training and tally.rows else None,
                     "previous": _psi_previous(current, previous, notes) if tally.rows else None}
    report["notes"] = notes
    report["alerts"] = alerts(report, limits)
    return report


def _psi_previous(current: Mapping, previous: Mapping | None, notes: list[str]) -> float | None:
    if previous is None:
        return None
    before = previous.get("distribution") or {}
    if set(before) != set(current):
        notes.append(f"the previous report's bins differ ({sorted(before)[:5]}...): another model? No PSI against it")
        return None
    return psi(current, before)


def alerts(report: Mapping, limits: Limits) -> list[str]:
    """The thresholds the report exceeds, each with its figures."""
    out = []
    for against, value in report["psi"].items():
        if limits.max_psi is not None and value is not None and value > limits.max_psi:
            out.append(f"PSI of the predictions against the {against} distribution is {value:.3f} "
                       f"> report.max_psi={limits.max_psi}")
    low = report.get("low_confidence")
    if limits.max_low_confidence is not None and low and low["share"] > limits.max_low_confidence:
        out.append(f"{low['share']:.1%} of rows ({low['rows']} of {report['rows']}) score below "
                   f"{low['below']} > report.max_low_confidence={limits.max_low_confidence}")
    return out


# ----------------------------------------------------------------------------- the previous report


def previous_path(template: str, date: str) -> str:
    """``report.previous`` with ``{yesterday}`` (the day before ``date``) and ``{date}`` filled;
    a directory means its ``_report.json``."""
    yesterday = (datetime.date.fromisoformat(date) - datetime.timedelta(days=1)).isoformat()
    path = template.replace("{yesterday}", yesterday).replace("{date}", date)
    return path if path.endswith(".json") else f"{path.rstrip('/')}/{REPORT_FILE}"


def parse_previous(text: str, where: str) -> dict:
    """A previous ``_report.json``'s content.

    Raises:
        ReportError: not JSON, or not a bertray report (no ``distribution``).
    """
    try:
        found = json.loads(text)
    except ValueError as e:
        raise ReportError(f"report.previous: {where} is not valid JSON ({e}); point report.previous at a "
                          "_report.json written by jobs/predict.py, or unset it") from None
    if not isinstance(found, dict) or not isinstance(found.get("distribution"), dict):
        raise ReportError(f"report.previous: {where} is not a bertray _report.json (no 'distribution'); point "
                          "report.previous at a predict output or its _report.json, or unset it")
    return found


def plot(report: Mapping, training: Mapping | None, previous: Mapping | None, path: str) -> None:
    """``_report.png``: the prediction distribution beside the training one (and the previous
    run's), and for classifiers the histogram of scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = "score_histogram" in report
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(12 if scored else 7, 4.5), squeeze=False)
    names = list(report["distribution"])
    series = [("this run", report["distribution"]), ("training", (training or {}).get("shares")),
              ("previous", (previous or {}).get("distribution"))]
    series = [(label, d) for label, d in series if d]
    x, width = np.arange(len(names)), 0.8 / len(series)
    ax = axes[0][0]
    for i, (label, d) in enumerate(series):
        ax.bar(x + i * width, [d.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks(x + width * (len(series) - 1) / 2, names, rotation=60, ha="right", fontsize=7)
    psi_text = ", ".join(f"{k} {v:.3f}" for k, v in report["psi"].items() if v is not None)
    ax.set(ylabel="share", title=f"predictions, {report['rows']} rows" + (f" (PSI {psi_text})" if psi_text else ""))
    ax.legend()
    if scored:
        hist = report["score_histogram"]
        edges = np.asarray(hist["edges"])
        axes[0][1].bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
        axes[0][1].axvline(report["low_confidence"]["below"], color="red", linestyle=":")
        mean = report["mean_score"]
        axes[0][1].set(xlabel="score", ylabel="rows", title="scores" + (f" (mean {mean:.3f})" if mean is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The problem type: one object owns everything that differs between single-label,
multi-label and regression models, so train, evaluate and predict never branch on it.

A :class:`Problem` knows its head size, how raw labels are checked, counted and encoded,
the loss, the evaluation state that workers all-reduce and the metrics made from it, how
logits become output columns, and what goes into the model's ``config.json``. The names are
Hugging Face's (``config.problem_type``), so an exported model also loads in
``transformers.pipeline("text-classification")`` and gives the same answers.

Lifecycle: :func:`detect`/:func:`resolve` pick the type from the label column's Arrow type
(before Ray starts), :func:`make` builds a problem without a label map (enough to find bad
rows and count labels), :meth:`Problem.with_labels` adds the map built from the counts, and
:func:`from_model_config` rebuilds it from an exported model.

Sharded evaluation: every worker fills a :class:`EvalState` from its batches; ``sums``
(counts, loss sums) are all-reduced and ``values`` (regression's predictions, which
Spearman needs to rank) are all-gathered, so every rank computes the same metrics from
the whole validation set. Definitions match scikit-learn/scipy (checked in the tests).

Pure module: numpy, torch, pyarrow, scikit-learn, scipy; no ``ray``, no work at import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from bertray.errors import BertrayError, DataError
from bertray.labels import build_label_map, encode_labels
from bertray.labels import class_weights as balanced_class_weights
from bertray.metrics import (
    classification_metrics,
    scalar_metrics,  # noqa: F401 - part of the problem API (one definition, in metrics)
)

SINGLE = "single_label_classification"
MULTI = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)
AUTO = "auto"

THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))
"""Thresholds searched for multi-label: one global threshold maximising micro-F1."""
DEFAULT_THRESHOLD = 0.5


class LabelError(DataError):
    """Labels that do not fit the problem type: the message names file, column, count and fix."""


# ----------------------------------------------------------------------------- choosing the type


def detect(label_type: pa.DataType, label_separator: str | None) -> str:
    """``model.problem_type: auto``: a list column (or a separator) → multi-label; a float
    column → regression; anything else (ints, strings, bools) → single-label."""
    if _is_list(label_type) or label_separator is not None:
        return MULTI
    if pa.types.is_floating(label_type) or pa.types.is_decimal(label_type):
        return REGRESSION
    return SINGLE


def resolve(problem_type: str, label_type: pa.DataType, label_separator: str | None, where: str,
            column: str) -> str:
    """The problem type for ``problem_type`` (``auto`` or a name) and the label column's type.

    Raises:
        LabelError: the column's type cannot hold labels of that problem type.
    """
    name = detect(label_type, label_separator) if problem_type == AUTO else problem_type
    if name not in PROBLEM_TYPES:
        raise ValueError(f"problem_type={problem_type!r}: use auto or one of {PROBLEM_TYPES}")
    fix = f"set model.problem_type to match the column (allowed: {AUTO}, {', '.join(PROBLEM_TYPES)})"
    if name == MULTI:
        if not _is_list(label_type) and not (label_separator is not None and _is_string(label_type)):
            how = ("data.label_separator applies to string columns" if label_separator is not None
                   else "set data.label_separator to split strings, or store a list column")
            raise LabelError(f"{where}: column {column!r} holds {label_type}, not label lists; {how}, or {fix}")
    elif _is_list(label_type):
        raise LabelError(f"{where}: column {column!r} holds lists ({label_type}), which only "
                         f"{MULTI} takes; {fix}")
    elif name == REGRESSION and not (_is_numeric(label_type) or pa.types.is_null(label_type)):
        raise LabelError(f"{where}: column {column!r} holds {label_type}; regression needs numbers; {fix}")
    return name


def make(problem_type: str, label2id: Mapping[str, int] | None = None, *, label_separator: str | None = None,
         threshold: float = DEFAULT_THRESHOLD, label_name: str = "label") -> Problem:
    """The problem object for a resolved ``problem_type`` (not ``auto``)."""
    if problem_type == SINGLE:
        return SingleLabel(label2id)
    if problem_type == MULTI:
        return MultiLabel(label2id, separator=label_separator, threshold=threshold)
    if problem_type == REGRESSION:
        return Regression(label_name=label_name)
    raise ValueError(f"problem_type={problem_type!r}: use one of {PROBLEM_TYPES}")


def from_model_config(config, label_separator: str | None = None, threshold: float | None = None) -> Problem:
    """The problem of an exported model (a ``transformers`` config); models saved before
    problem types existed are single-label. ``threshold`` overrides the stored one."""
    name = getattr(config, "problem_type", None) or SINGLE
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    label2id = {v: k for k, v in id2label.items()}
    stored = getattr(config, "threshold", None)
    t = threshold if threshold is not None else (stored if stored is not None else DEFAULT_THRESHOLD)
    return make(name, None if name == REGRESSION else label2id, label_separator=label_separator,
                threshold=float(t), label_name=id2label.get(0, "label"))


def metric_modes(problem_type: str) -> dict[str, str]:
    """``{metric: "min" | "max"}``: the names ``checkpoint.metric`` and Tune accept for a problem type."""
    return _CLASSES[problem_type].metric_modes


def check_metric(problem_type: str, metric: str, key: str = "checkpoint.metric") -> str | None:
    """A config problem (key, bad value, allowed names) when ``metric`` does not fit, else None."""
    modes = metric_modes(problem_type)
    if metric in modes:
        return None
    return f"{key}={metric!r} is not a {problem_type} metric; use one of {sorted(modes)}"


def metric_mode(metric: str) -> str:
    """``"min"`` or ``"max"`` for a metric of any problem type (a name means the same everywhere)."""
    for cls in _CLASSES.values():
        if metric in cls.metric_modes:
            return cls.metric_modes[metric]
    raise ValueError(f"unknown metric {metric!r}")


def headline(metrics: Mapping) -> str:
    """A progress line's metrics: loss and the problem type's main figures, in a fixed order."""
    shown = [k for k in _HEADLINE if k in metrics]
    return " ".join(f"{k}={metrics[k]:.4f}" for k in shown)


_HEADLINE = ("loss", "accuracy", "f1_macro", "f1_micro", "threshold", "rmse", "pearson", "spearman")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


# ----------------------------------------------------------------------------- label statistics


@dataclass
class LabelStats:
    """Label counts from a scan, summed over batches and files (``+``).

    ``counts`` maps a raw label value to the rows carrying it (multi-label: the rows whose
    list holds it); ``empty`` counts multi-label rows with no label, a real answer in tagging.
    Rows with a bad label (null; regression NaN/inf) are not in ``rows``: the caller counts
    them per file with :meth:`Problem.bad_labels`.
    """

    rows: int = 0
    empty: int = 0
    counts: dict = field(default_factory=dict)

    def __add__(self, other: LabelStats) -> LabelStats:
        counts = dict(self.counts)
        for k, n in other.counts.items():
            counts[k] = counts.get(k, 0) + n
        return LabelStats(self.rows + other.rows, self.empty + other.empty, counts)

    def to_json(self) -> str:
        """JSON that keeps the raw keys' types (``1`` and ``"1"`` stay apart until the label map)."""
        return json.dumps({"rows": self.rows, "empty": self.empty,
                           "counts": [[k, n] for k, n in self.counts.items()]})

    @classmethod
    def from_json(cls, text: str) -> LabelStats:
        d = json.loads(text)
        return cls(d["rows"], d["empty"], {k: n for k, n in d["counts"]})


def _count(values: list) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ----------------------------------------------------------------------------- evaluation state


@dataclass
class EvalState:
    """What a worker accumulates over its validation batches.

    ``sums`` is one float64 vector (counts and loss sums), all-reduced in one call;
    ``values`` holds rows that must be seen together (regression: prediction and truth, for
    Spearman's ranks), all-gathered. :meth:`merge` is the same sum/concatenation on one
    process (tests, and any caller that already holds every shard's state).
    """

    sums: torch.Tensor
    values: list[torch.Tensor] = field(default_factory=list)

    def merge(self, other: EvalState) -> EvalState:
        return EvalState(self.sums + other.sums.to(self.sums.device), [*self.values, *other.values])

    def all_reduce(self) -> EvalState:
        """Sum ``sums`` and gather ``values`` over the default process group (no-op without one)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        sums = self.sums.clone()
        dist.all_reduce(sums)
        if not self.values:
            return EvalState(sums)
        return EvalState(sums, [all_gather_rows(torch.cat(self.values))])

    def gathered(self) -> torch.Tensor:
        return torch.cat(self.values) if self.values else torch.zeros((0, 2), dtype=torch.float64)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order (ranks hold different row counts: pad to the largest)."""
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes, strict=True)])


# ----------------------------------------------------------------------------- the problem types


class Problem:
    """What differs between problem types. Subclasses: :class:`SingleLabel`,
    :class:`MultiLabel`, :class:`Regression`."""

    name: ClassVar[str]
    metric_modes: ClassVar[dict[str, str]]
    """Rankable metrics (``checkpoint.metric``, Tune) and whether lower or higher is better."""
    default_metric: ClassVar[str]
    calibrates: ClassVar[bool] = True
    """Scores are probabilities that a temperature can calibrate (:mod:`bertray.calibration`)."""

    def __init__(self, label2id: Mapping[str, int] | None = None):
        self.label2id = {str(k): int(v) for k, v in label2id.items()} if label2id is not None else None
        self.id2label = {i: k for k, i in self.label2id.items()} if self.label2id is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label2id})"

    # --- head and model config
    @property
    def num_labels(self) -> int:
        """The classifier head's width."""
        self._need_labels()
        return len(self.label2id)

    def config_fields(self) -> dict:
        """Keyword arguments for ``AutoConfig.from_pretrained`` (or ``config.update``): they go
        into ``config.json`` so the model describes itself to bertray and to ``pipeline``."""
        return {"problem_type": self.name, "num_labels": self.num_labels, "label2id": dict(self.label2id),
                "id2label": {i: self.id2label[i] for i in range(self.num_labels)}}

    def apply_to(self, config):
        """Set :meth:`config_fields` on a ``transformers`` config (before the model is built
        from it) and return it. ``AutoConfig.from_pretrained(**fields)`` would drop the keys
        the config class does not declare, such as multi-label's ``threshold``."""
        for key, value in self.config_fields().items():  # num_labels first: it resets the label maps
            setattr(config, key, value)
        return config

    def with_metrics(self, metrics: Mapping) -> Problem:
        """The problem as an evaluation left it: multi-label takes the tuned ``threshold``
        (written into each checkpoint's config), the others are unchanged."""
        return self

    def for_output(self) -> Problem:
        """The problem that evaluates written output (:meth:`update_from_output`): multi-label
        at its one threshold, the others as they are."""
        return self

    def mode(self, metric: str) -> str:
        return self.metric_modes[metric]

    # --- labels
    def with_labels(self, stats: LabelStats) -> Problem:
        """The same problem with the label map built from scanned ``stats`` (sorted as
        ``bertray.labels.build_label_map``: numbers numerically, strings lexically)."""
        label2id, _ = build_label_map(stats.counts)
        return type(self)(label2id)

    def label_counts(self, stats: LabelStats) -> dict[int, int]:
        """Rows per label id (1, 1.0 and True are one label, as in the label map)."""
        keys = list(stats.counts)
        ids = encode_labels(keys, self.label2id, "label counts") if keys else []
        out: dict[int, int] = {}
        for k, i in zip(keys, ids, strict=True):
            out[int(i)] = out.get(int(i), 0) + stats.counts[k]
        return out

    def unknown_labels(self, stats: LabelStats) -> dict:
        """Raw labels of ``stats`` (validation data) that the label map lacks, with their rows."""
        known = self.label2id or {}
        out = {}
        for k, n in stats.counts.items():
            try:
                encode_labels([k], known, "")
            except BertrayError:
                out[k] = n
        return out

    def check_known(self, stats: LabelStats, where: str, column: str) -> None:
        """Raise naming every validation label missing from the training label map."""
        unknown = self.unknown_labels(stats)
        if unknown:
            detail = ", ".join(f"{k!r} ({n} rows)" for k, n in sorted(unknown.items(), key=str))
            raise LabelError(f"{where}: column {column!r}: label(s) not in the training label map: {detail}. "
                             f"Training labels: {list(self.label2id)}. Fix the labels or add rows with them "
                             "to the training data.")

    def bad_labels(self, values: pa.Array) -> np.ndarray:
        """Rows whose label is unusable (null): bad rows, dropped or reported like null text."""
        return np.asarray(_combined(values).is_null().to_numpy(zero_copy_only=False), dtype=bool)

    def _check_no_bad(self, values: pa.Array, where: str, column: str) -> None:
        bad = int(self.bad_labels(values).sum())
        if bad:
            raise LabelError(f"{where}: column {column!r}: {bad} row(s) with a null{self._bad_kind} label; "
                             "fix them, or set data.drop_bad_rows=true to drop them (the count is reported)")

    _bad_kind: ClassVar[str] = ""

    def _names(self) -> pa.Array:
        return pa.array([self.id2label[i] for i in range(self.num_labels)], pa.string())

    def _score_fields(self, all_scores: bool) -> list[pa.Field]:
        if not all_scores:
            return []
        return [pa.field(f"score_{self.id2label[i]}", pa.float32()) for i in range(self.num_labels)]

    def calibration_columns(self, all_scores: bool) -> list[str]:
        """Output columns :meth:`output_events` needs (none: evaluate reports no ECE)."""
        return []

    def output_events(self, batch: pa.RecordBatch, column: str, where: str = "data"):
        """(probability, happened) pairs of written predictions for ECE, or None."""
        return None

    def _need_labels(self) -> None:
        if self.label2id is None:
            raise ValueError(f"{type(self).__name__} has no label map yet: build it with with_labels(stats)")

    # --- evaluation
    def update(self, state: EvalState, logits: torch.Tensor, labels: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """Add one batch to ``state`` (in place, on the batch's device: no host sync)."""
        self._add_predictions(state, logits.float(), labels)
        loss_sum = self.loss(logits, labels, weight, reduction="sum")
        state.sums[-2:] += torch.stack([loss_sum.double(), torch.tensor(float(labels.numel()),
                                                                         dtype=torch.float64, device=labels.device)])

    def _loss_of(self, state: EvalState) -> float | None:
        s, n = state.sums[-2:].tolist()
        return s / n if n else None

    # subclasses: name, metric_modes, default_metric, scores, loss, label_stats, encode,
    # batch_labels, class_weights, new_state, _add_predictions, metrics, output_columns, output_fields


def _combined(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _probability(scores: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(scores, dtype=np.float32), pa.float32())


def _check_shape(scores: np.ndarray, width: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != width:
        raise ValueError(f"expected scores of shape (rows, {width}), got {scores.shape}")
    return scores


class SingleLabel(Problem):
    """One label out of N: softmax, cross-entropy, a confusion matrix."""

    name = SINGLE
    metric_modes = {"accuracy": "max", "f1_macro": "max", "f1_weighted": "max", "precision_macro": "max",
                    "recall_macro": "max", "precision_weighted": "max", "recall_weighted": "max", "loss": "min"}
    default_metric = "accuracy"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (``pipeline``'s softmax)."""
        return torch.softmax(logits.float(), dim=-1)

    def loss(self, logits, labels, weight=None, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=weight, reduction=reduction)

    def label_stats(self, values: pa.Array) -> LabelStats:
        """Counts of the usable rows' labels (null rows are left out: see :meth:`bad_labels`)."""
        v = _combined(values).drop_null()
        return LabelStats(rows=len(v), counts=_count(v.to_pylist()))

    def encode(self, values: pa.Array, where: str = "data", column: str = "label") -> pa.Array:
        """Label ids (int64), the ``labels`` column a batch carries.

        Raises:
            LabelError: null labels, or labels unknown to the label map (each with its row count).
        """
        self._need_labels()
        self._check_no_bad(values, where, column)
        try:
            return pa.array(encode_labels(_combined(values).to_pylist(), self.label2id,
                                          f"{where}: column {column!r}"), pa.int64())
        except BertrayError as e:
            raise LabelError(str(e)) from None

    def batch_labels(self, column) -> torch.Tensor:
        return torch.tensor(_combined(column).to_numpy())  # a copy: Arrow's buffers are read-only

    def class_weights(self, setting, label_counts: Mapping[int, int], rows: int) -> list[float] | None:
        """Cross-entropy's ``weight``: ``balanced`` (scikit-learn's rule), a list, or None."""
        if setting == "balanced":
            return balanced_class_weights(label_counts, self.num_labels)
        return _explicit_weights(setting, self.label2id)

    def new_state(self, device="cpu") -> EvalState:
        # confusion matrix (rows true, columns predicted), then loss sum and loss terms
        return EvalState(torch.zeros(self.num_labels ** 2 + 2, dtype=torch.float64, device=device))

    def _add_predictions(self, state: EvalState, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = self.num_labels
        idx = labels.long() * n + logits.argmax(-1)
        state.sums[:n * n] += torch.bincount(idx, minlength=n * n).double()

    def update_from_output(self, state: EvalState, truth, prediction, where: str = "data",
                           column: str = "label") -> None:
        """Add written predictions (label names) against true labels (raw values): evaluating output."""
        want = torch.from_numpy(self.encode(truth, where, column).to_numpy(zero_copy_only=False).copy())
        got = pc.index_in(_combined(prediction), value_set=self._names())
        if got.null_count:
            raise ValueError("prediction column holds names outside the model's labels")
        n = self.num_labels
        state.sums[:n * n] += torch.bincount(want * n + torch.tensor(got.to_numpy(), dtype=torch.int64),
                                             minlength=n * n).double().to(state.sums.device)

    def metrics(self, state: EvalState) -> dict:
        n = self.num_labels
        cm = state.sums[:n * n].cpu().numpy().round().astype(np.int64).reshape(n, n)
        return classification_metrics(cm, self.id2label, loss=self._loss_of(state))

    def output_columns(self, scores: np.ndarray, all_scores: bool = False, top_k: int | None = None
                       ) -> dict[str, pa.Array]:
        """``prediction`` (label name) and ``score`` (its probability); with ``top_k`` the
        best labels and scores as lists; with ``all_scores`` one ``score_<label>`` per label."""
        scores = _check_shape(scores, self.num_labels)
        names = self._names()
        rows = len(scores)
        best = scores.argmax(axis=1) if rows else np.zeros(0, dtype=np.int64)
        out = {"prediction": names.take(pa.array(best)), "score": _probability(scores[np.arange(rows), best])}
        if top_k:
            k = min(top_k, self.num_labels)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
            out["top_k_labels"] = pa.ListArray.from_arrays(offsets, names.take(pa.array(top.ravel())))
            out["top_k_scores"] = pa.ListArray.from_arrays(
                offsets, _probability(np.take_along_axis(scores, top, axis=1).ravel()))
        if all_scores:
            out.update(_per_label_scores(scores, names))
        return out

    def output_fields(self, all_scores: bool = False, top_k: int | None = None) -> list[pa.Field]:
        fields = [pa.field("prediction", pa.string()), pa.field("score", pa.float32())]
        if top_k:
            fields += [pa.field("top_k_labels", pa.list_(pa.string())),
                       pa.field("top_k_scores", pa.list_(pa.float32()))]
        return fields + self._score_fields(all_scores)

    def calibration_columns(self, all_scores: bool) -> list[str]:
        return ["score"]

    def output_events(self, batch: pa.RecordBatch, column: str, where: str = "data"):
        """The predicted label's probability, and whether it was the true label."""
        want = self.encode(batch.column(column), where, column).to_numpy(zero_copy_only=False)
        got = pc.index_in(_combined(batch.column("prediction")), value_set=self._names()).to_numpy(zero_copy_only=False)
        return batch.column("score").to_numpy(zero_copy_only=False), want == got

    def check_output_options(self, all_scores: bool, top_k: int | None) -> list[str]:
        return []


def _per_label_scores(scores: np.ndarray, names: pa.Array) -> dict[str, pa.Array]:
    return {f"score_{name}": _probability(scores[:, i]) for i, name in enumerate(names.to_pylist())}


def _explicit_weights(setting, label2id: Mapping[str, int]) -> list[float] | None:
    if setting is None:
        return None
    if isinstance(setting, str):
        raise ValueError(f"train.class_weights={setting!r}: use 'balanced', a list of floats, or null")
    if len(setting) != len(label2id):
        raise LabelError(f"train.class_weights has {len(setting)} values but there are {len(label2id)} labels "
                         f"{list(label2id)}; give one weight per label, in label-id order")
    return [float(w) for w in setting]


class MultiLabel(Problem):
    """Any subset of N labels: sigmoid per label, BCE-with-logits, one global threshold.

    Evaluation counts true/false positives and false negatives per label at every threshold
    of :data:`THRESHOLD_GRID` (plus per-row F1 and exact-match sums), so after the
    all-reduce the threshold that maximises micro-F1 is searched once, over all shards.
    """

    name = MULTI
    metric_modes = {"f1_micro": "max", "f1_macro": "max", "f1_samples": "max", "precision_micro": "max",
                    "recall_micro": "max", "subset_accuracy": "max", "hamming_loss": "min", "loss": "min"}
    default_metric = "f1_micro"
    _bad_kind = " (or null element in the list)"

    def __init__(self, label2id: Mapping[str, int] | None = None, separator: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD, grid: tuple[float, ...] = THRESHOLD_GRID):
        super().__init__(label2id)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold}: use a probability strictly between 0 and 1")
        self.separator = separator
        self.threshold = float(threshold)
        self.grid = tuple(float(t) for t in grid)

    def with_labels(self, stats: LabelStats) -> MultiLabel:
        label2id, _ = build_label_map(stats.counts)
        return MultiLabel(label2id, self.separator, self.threshold, self.grid)

    def with_metrics(self, metrics: Mapping) -> MultiLabel:
        return MultiLabel(self.label2id, self.separator, metrics.get("threshold", self.threshold), self.grid)

    def with_threshold(self, threshold: float) -> MultiLabel:
        """Evaluation at one fixed ``threshold`` (predict's evaluate): no search."""
        return MultiLabel(self.label2id, self.separator, threshold, (threshold,))

    def for_output(self) -> MultiLabel:
        return self.with_threshold(self.threshold)

    def config_fields(self) -> dict:
        return {**super().config_fields(), "threshold": self.threshold}

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-label probabilities (``pipeline``'s sigmoid)."""
        return torch.sigmoid(logits.float())

    def loss(self, logits, labels, weight=None, reduction: str = "mean") -> torch.Tensor:
        """BCE with logits; ``weight`` is ``pos_weight`` (one per label)."""
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weight,
                                                  reduction=reduction)

    # --- labels
    def _lists(self, values) -> tuple[pa.Array, np.ndarray, int]:
        """(flat label values, each value's row, rows) of usable rows; strings are split on
        the separator, trimmed, and empty pieces dropped (``""`` is a row with no label)."""
        values = _combined(values)
        if _is_string(values.type) and self.separator is not None:
            values = pc.split_pattern(values, self.separator)
            flat = pc.utf8_trim_whitespace(values.flatten())
            parents = pc.list_parent_indices(values)
            keep = pc.not_equal(flat, "")
            flat, parents = flat.filter(keep), parents.filter(keep)
        elif _is_list(values.type):
            flat, parents = values.flatten(), pc.list_parent_indices(values)
        else:
            raise self._not_lists(values)
        return flat, np.asarray(parents.to_numpy(zero_copy_only=False), dtype=np.int64), len(values)

    def _not_lists(self, values, where: str = "data", column: str = "label") -> LabelError:
        how = ("set data.label_separator to split them" if _is_string(values.type)
               else "store a list<string> or list<int> column")
        return LabelError(f"{where}: column {column!r}: {len(values) - values.null_count} row(s) hold "
                          f"{values.type} values, not label lists; {how}")

    def bad_labels(self, values) -> np.ndarray:
        """Null lists, and lists with a null element."""
        values = _combined(values)
        bad = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if _is_list(values.type) and len(values):
            null_items = values.flatten().is_null().to_numpy(zero_copy_only=False)
            rows = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
            bad[rows[null_items]] = True
        return bad

    def label_stats(self, values) -> LabelStats:
        """Rows per label (a label twice in one row counts once) and rows with no label."""
        values = _combined(values)
        values = values.filter(pa.array(~self.bad_labels(values)))
        flat, parents, rows = self._lists(values)
        pairs = pa.table({"row": parents, "label": flat}).group_by(["row", "label"]).aggregate([])
        counts = _count(pairs.column("label").to_pylist())
        labelled = len(np.unique(parents))
        return LabelStats(rows=rows, empty=rows - labelled, counts=counts)

    def encode(self, values, where: str = "data", column: str = "label") -> pa.Array:
        """Each row's sorted, distinct label ids (``list<int32>``; empty lists allowed).

        Raises:
            LabelError: non-list values, null lists or elements, labels unknown to the map.
        """
        self._need_labels()
        values = _combined(values)
        if not (_is_list(values.type) or (_is_string(values.type) and self.separator is not None)):
            raise self._not_lists(values, where, column)
        self._check_no_bad(values, where, column)
        flat, parents, rows = self._lists(values)
        try:
            ids = encode_labels(flat.to_pylist(), self.label2id, f"{where}: column {column!r}")
        except BertrayError as e:
            raise LabelError(str(e)) from None
        hot = np.zeros((rows, self.num_labels), dtype=bool)
        hot[parents, ids] = True
        return _sparse(hot)

    def batch_labels(self, column) -> torch.Tensor:
        """Multi-hot float32 ``(rows, num_labels)``, BCE's target."""
        column = _combined(column)
        hot = np.zeros((len(column), self.num_labels), dtype=np.float32)
        rows = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        hot[rows, column.flatten().to_numpy(zero_copy_only=False)] = 1.0
        return torch.from_numpy(hot)

    def class_weights(self, setting, label_counts: Mapping[int, int], rows: int) -> list[float] | None:
        """BCE's ``pos_weight``: ``balanced`` gives negatives/positives per label (1 for a label
        no row carries, so it is neither boosted nor silenced); a list is used as given."""
        if setting == "balanced":
            return [(rows - label_counts.get(i, 0)) / label_counts[i] if label_counts.get(i) else 1.0
                    for i in range(self.num_labels)]
        return _explicit_weights(setting, self.label2id)

    # --- evaluation
    def new_state(self, device="cpu") -> EvalState:
        # [grid, label, (tp, fp, fn)], then per threshold the sum of row F1s and exact rows,
        # then rows, loss sum and loss terms.
        g, n = len(self.grid), self.num_labels
        return EvalState(torch.zeros(g * n * 3 + 2 * g + 3, dtype=torch.float64, device=device))

    def _add_predictions(self, state: EvalState, logits: torch.Tensor, labels: torch.Tensor) -> None:
        grid = torch.tensor(self.grid, dtype=torch.float32, device=logits.device)
        self._add_hits(state, torch.sigmoid(logits)[None] >= grid[:, None, None], labels.bool())

    def _add_hits(self, state: EvalState, pred: torch.Tensor, truth: torch.Tensor) -> None:
        """``pred``: (grid, rows, labels) bool; ``truth``: (rows, labels) bool."""
        g, n = len(self.grid), self.num_labels
        hit, wrong, missed = pred & truth, pred & ~truth, ~pred & truth
        counts = torch.stack([hit.sum(1), wrong.sum(1), missed.sum(1)], dim=-1)  # (grid, labels, 3)
        tp, fp, fn = hit.sum(2), wrong.sum(2), missed.sum(2)  # (grid, rows)
        denom = (2 * tp + fp + fn).double()
        # A row with no true and no predicted label is answered right: F1 1 (scikit-learn's
        # f1_score(average="samples", zero_division=1)).
        row_f1 = torch.where(denom > 0, 2 * tp.double() / denom.clamp(min=1), torch.ones_like(denom))
        exact = (fp + fn == 0).sum(1)
        s = state.sums
        s[:g * n * 3] += counts.reshape(-1).double()
        s[g * n * 3:g * n * 3 + 2 * g] += torch.cat([row_f1.sum(1), exact.double()])
        s[-3] += truth.shape[0]

    def update_from_output(self, state: EvalState, truth, prediction, where: str = "data",
                           column: str = "label") -> None:
        """Add predicted label lists (``prediction`` column) against true labels (raw values),
        for evaluating written output; ``state`` must come from :meth:`with_threshold`."""
        want = self.batch_labels(self.encode(truth, where, column)).bool()
        got = self.batch_labels(self._ids_of_names(prediction)).bool()
        self._add_hits(state, got[None], want)

    def _ids_of_names(self, prediction) -> pa.Array:
        prediction = _combined(prediction)
        offsets = prediction.offsets.to_numpy()
        ids = pc.index_in(prediction.flatten(), value_set=self._names())
        return pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), ids.cast(pa.int32()))

    def metrics(self, state: EvalState) -> dict:
        g, n = len(self.grid), self.num_labels
        s = state.sums.cpu().numpy()
        counts = s[:g * n * 3].reshape(g, n, 3)
        row_f1, exact = s[g * n * 3:g * n * 3 + g], s[g * n * 3 + g:g * n * 3 + 2 * g]
        rows = s[-3]
        best = search_threshold(counts, self.grid)
        tp, fp, fn = counts[best].T
        out = _multilabel_scores(tp, fp, fn, self.id2label)
        out.update({
            "f1_samples": float(row_f1[best] / rows) if rows else 0.0,
            "subset_accuracy": float(exact[best] / rows) if rows else 0.0,
            "hamming_loss": float((fp.sum() + fn.sum()) / (rows * n)) if rows else 0.0,
            "threshold": self.grid[best],
            "num_examples": int(round(rows)),
        })
        loss = self._loss_of(state)
        if loss is not None:
            out["loss"] = loss
        return out

    # --- output
    def output_columns(self, scores: np.ndarray, all_scores: bool = False, top_k: int | None = None
                       ) -> dict[str, pa.Array]:
        """``prediction``: the labels scoring at least the threshold, best first (may be
        empty); ``score``: their probabilities, same order; ``all_scores``: ``score_<label>``."""
        scores = _check_shape(scores, self.num_labels).astype(np.float32, copy=False)
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked = np.take_along_axis(scores, order, axis=1)
        keep = ranked >= np.float32(self.threshold)
        offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32))
        out = {"prediction": pa.ListArray.from_arrays(offsets, self._names().take(pa.array(order[keep]))),
               "score": pa.ListArray.from_arrays(offsets, _probability(ranked[keep]))}
        if all_scores:
            out.update(_per_label_scores(scores, self._names()))
        return out

    def output_fields(self, all_scores: bool = False, top_k: int | None = None) -> list[pa.Field]:
        return [pa.field("prediction", pa.list_(pa.string())), pa.field("score", pa.list_(pa.float32())),
                *self._score_fields(all_scores)]

    def calibration_columns(self, all_scores: bool) -> list[str]:
        return [f.name for f in self._score_fields(all_scores)]

    def output_events(self, batch: pa.RecordBatch, column: str, where: str = "data"):
        """Every label's probability (``all_scores`` columns), and whether the label was true."""
        names = [f.name for f in self._score_fields(True)]
        if not set(names) <= set(batch.schema.names):
            return None
        truth = self.batch_labels(self.encode(batch.column(column), where, column)).numpy()
        scores = np.stack([batch.column(n).to_numpy(zero_copy_only=False) for n in names], axis=1)
        return scores.ravel(), truth.ravel() > 0

    def check_output_options(self, all_scores: bool, top_k: int | None) -> list[str]:
        return [f"top_k={top_k}: a multi-label prediction already lists every label at or above the "
                "threshold; unset top_k (all_scores=true gives every label's score)"] if top_k else []



def search_threshold(counts: np.ndarray, grid: tuple[float, ...]) -> int:
    """Index of the grid threshold with the best micro-F1 from ``counts[grid, label, (tp, fp, fn)]``;
    ties go to the threshold nearest 0.5 (the least surprising of equals)."""
    tp, fp, fn = counts.sum(axis=1).T
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp, dtype=np.float64), where=(2 * tp + fp + fn) > 0)
    distance = np.abs(np.asarray(grid) - DEFAULT_THRESHOLD)
    return int(np.lexsort((distance, -f1))[0])


def _multilabel_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, id2label: Mapping[int, str]) -> dict:
    """Micro and macro scores and per-label figures from per-label counts (zero_division=0)."""
    def div(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)

    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    f1 = div(2 * tp, 2 * tp + fp + fn)
    all_tp, all_fp, all_fn = np.array(tp.sum()), np.array(fp.sum()), np.array(fn.sum())
    return {
        "f1_micro": float(div(2 * all_tp, 2 * all_tp + all_fp + all_fn)),
        "f1_macro": float(f1.mean()),
        "precision_micro": float(div(all_tp, all_tp + all_fp)),
        "recall_micro": float(div(all_tp, all_tp + all_fn)),
        "per_class": {id2label[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                                    "f1": float(f1[i]), "support": int(round(tp[i] + fn[i]))}
                      for i in range(len(tp))},
    }


def _sparse(hot: np.ndarray) -> pa.Array:
    """Multi-hot rows as ``list<int32>`` of label ids: a row costs its labels, not the label count."""
    rows, ids = np.nonzero(hot)
    offsets = np.zeros(len(hot) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=len(hot)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32)))


class Regression(Problem):
    """One number per row: the raw value out of a width-1 head, MSE, and correlation metrics.

    Evaluation gathers every (prediction, truth) pair: Spearman ranks the whole set, which no
    sum of per-shard figures gives, and a validation set is small (16 bytes a row). Every rank
    gathers (not only rank 0), since each decides early stopping from the same metrics.
    """

    name = REGRESSION
    metric_modes = {"mse": "min", "rmse": "min", "mae": "min", "pearson": "max", "spearman": "max", "r2": "max",
                    "loss": "min"}
    default_metric = "mse"
    calibrates = False
    _bad_kind = ", NaN or infinite"

    def __init__(self, label2id=None, label_name: str = "label"):
        super().__init__(None)
        self.label_name = label_name

    def __repr__(self) -> str:
        return f"Regression(label_name={self.label_name!r})"

    @property
    def num_labels(self) -> int:
        return 1

    def config_fields(self) -> dict:
        # id2label names the one output: pipeline() reports it as the label of the raw value.
        return {"problem_type": self.name, "num_labels": 1, "label2id": {self.label_name: 0},
                "id2label": {0: self.label_name}}

    def with_labels(self, stats: LabelStats) -> Regression:
        return self

    def label_counts(self, stats: LabelStats) -> dict[int, int]:
        return {}

    def unknown_labels(self, stats: LabelStats) -> dict:
        return {}

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The raw value (``pipeline`` applies no function to regression)."""
        return logits.float()

    def loss(self, logits, labels, weight=None, reduction: str = "mean") -> torch.Tensor:
        if weight is not None:
            raise ValueError("regression takes no class weights")
        return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1), reduction=reduction)

    def bad_labels(self, values) -> np.ndarray:
        """Null, NaN and infinite values."""
        values = _combined(values)
        if not _is_numeric(values.type):
            return np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        x = values.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls become NaN
        return ~np.isfinite(x)

    def label_stats(self, values) -> LabelStats:
        return LabelStats(rows=int((~self.bad_labels(values)).sum()))

    def encode(self, values, where: str = "data", column: str = "label") -> pa.Array:
        """The values as float64 (raw units: no scaling).

        Raises:
            LabelError: a non-numeric column, or null/NaN/inf values (with their count).
        """
        values = _combined(values)
        if not _is_numeric(values.type):
            raise LabelError(f"{where}: column {column!r} holds {values.type}; regression needs numbers; "
                             "store the target as a float column, or set model.problem_type")
        self._check_no_bad(values, where, column)
        return values.cast(pa.float64())

    def batch_labels(self, column) -> torch.Tensor:
        return torch.tensor(_combined(column).to_numpy(), dtype=torch.float32)

    def class_weights(self, setting, label_counts: Mapping[int, int], rows: int) -> None:
        if setting is not None:
            raise LabelError(f"train.class_weights={setting!r}: class weights apply to classification; "
                             "unset train.class_weights for a regression run")
        return None

    def new_state(self, device="cpu") -> EvalState:
        return EvalState(torch.zeros(2, dtype=torch.float64, device=device))  # loss sum, loss terms

    def _add_predictions(self, state: EvalState, logits: torch.Tensor, labels: torch.Tensor) -> None:
        state.values.append(torch.stack([logits.reshape(-1).double(), labels.reshape(-1).double()], dim=1))

    def update_from_output(self, state: EvalState, truth, prediction, where: str = "data",
                           column: str = "label") -> None:
        """Add written predictions against true values (evaluating output)."""
        want = self.encode(truth, where, column).to_numpy()
        got = _combined(prediction).to_numpy(zero_copy_only=False)
        state.values.append(torch.from_numpy(np.stack([got, want], axis=1).astype(np.float64)))

    def metrics(self, state: EvalState) -> dict:
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

        pairs = state.gathered().cpu().numpy()
        pred, true = pairs[:, 0], pairs[:, 1]
        out = {"num_examples": len(pairs)}
        if len(pairs):
            mse = float(mean_squared_error(true, pred))
            out.update(mse=mse, rmse=math.sqrt(mse), mae=float(mean_absolute_error(true, pred)),
                       pearson=_correlation(pearsonr, pred, true), spearman=_correlation(spearmanr, pred, true),
                       r2=float(r2_score(true, pred)) if len(pairs) > 1 else 0.0)
        loss = self._loss_of(state)
        if loss is not None:
            out["loss"] = loss
        return out

    def output_columns(self, scores: np.ndarray, all_scores: bool = False, top_k: int | None = None
                       ) -> dict[str, pa.Array]:
        """``prediction``: the value, float64, raw units; no ``score``."""
        scores = _check_shape(scores, 1)
        return {"prediction": pa.array(scores[:, 0].astype(np.float64), pa.float64())}

    def output_fields(self, all_scores: bool = False, top_k: int | None = None) -> list[pa.Field]:
        return [pa.field("prediction", pa.float64())]

    def check_output_options(self, all_scores: bool, top_k: int | None) -> list[str]:
        out = []
        if top_k:
            out.append(f"top_k={top_k}: a regression model predicts a value, not labels; unset top_k")
        if all_scores:
            out.append("all_scores=true: a regression model has no per-label scores; unset all_scores")
        return out


def _correlation(fn, pred: np.ndarray, true: np.ndarray) -> float:
    """scipy's coefficient; 0 where it is undefined (fewer than 2 rows or a constant side),
    so a degenerate model ranks last instead of poisoning comparisons with NaN."""
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0:
        return 0.0
    return float(fn(pred, true)[0])


_CLASSES: dict[str, type[Problem]] = {SINGLE: SingleLabel, MULTI: MultiLabel, REGRESSION: Regression}

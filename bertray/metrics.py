"""Classification metrics from a confusion matrix. Pure: no ``ray``, no work at import.

Workers sum their confusion matrices (an all-reduce of counts), so metrics cover the
whole validation set exactly, never an average of per-shard numbers. Definitions match
scikit-learn's ``precision_recall_fscore_support`` with ``zero_division=0``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LOWER_IS_BETTER = frozenset({"loss", "hamming_loss", "mse", "rmse", "mae"})
"""Metrics for which a smaller value is better; every other metric is better larger
(the same rule as ``bertray.problem.metric_modes``, checked in the tests)."""


def scalar_metrics(metrics: Mapping) -> dict[str, float]:
    """The numbers of a metrics dict (for Tune, history, TensorBoard and MLflow): per-class
    tables and the confusion matrix left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def metric_mode(name: str) -> str:
    """``"min"`` or ``"max"``: how ``name`` ranks (Ray Tune's ``mode``, Ray Train's ``checkpoint_score_order``)."""
    return "min" if name in LOWER_IS_BETTER or name.endswith("loss") else "max"


def is_better(name: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of metric ``name`` beats ``best`` (None: nothing yet, so it does).

    Strictly better only: an equal value does not replace the earlier one. A NaN is never
    better (and any value beats a NaN best).
    """
    if value != value:  # NaN
        return False
    if best is None or best != best:
        return True
    return value < best if metric_mode(name) == "min" else value > best


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predictions (scikit-learn's layout)."""
    idx = np.asarray(labels, dtype=np.int64) * num_labels + np.asarray(preds, dtype=np.int64)
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def classification_metrics(cm: np.ndarray, id2label: Mapping[int, str], loss: float | None = None) -> dict:
    """Accuracy, precision/recall/F1 (macro and weighted), per class, and the matrix itself."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    total = cm.sum()
    precision = _div(tp, predicted)
    recall = _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    weights = support / total if total else np.zeros_like(support)
    out = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "num_examples": int(total),
        "per_class": {
            id2label[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])}
            for i in range(len(tp))
        },
        "confusion_matrix": cm.tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def plot_confusion_matrix(cm, id2label: Mapping[int, str], path) -> None:
    """Write a labelled confusion-matrix PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    names = [id2label[i] for i in range(len(cm))]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.7 * len(names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Temperature scaling: scores that mean probabilities.

One temperature ``T`` is fitted on the validation logits by minimising the negative
log-likelihood of ``logits / T`` (Guo et al., 2017), then folded into the classifier head
(its weight and bias divided by ``T``), so every consumer of the exported model, ``pipeline``
included, gets calibrated scores with no extra code. Dividing every logit by the same
positive number keeps each row's ranking, so argmax and accuracy do not change; a
multi-label threshold is mapped through the same change, so the predicted label sets do
not either.

Calibration is measured by the expected calibration error (ECE) over 15 equal-width bins:
single-label on the top label's probability against whether it was right, multi-label on
every label's probability against whether the label was true.

Pure: torch, numpy and scipy, no ``ray``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

BINS = 15
METRICS = ("temperature", "ece_before", "ece", "nll_before", "nll")
"""What :func:`calibrate` adds to a checkpoint's metrics (and training to ``metrics.json``)."""
LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def events(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(probability of an event, whether it happened) pairs that ECE bins."""
    if multi_label:
        return torch.sigmoid(logits.double()).flatten().numpy(), labels.flatten().bool().numpy()
    probs = torch.softmax(logits.double(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    return confidence.numpy(), (predicted == labels.long()).numpy()


def nll(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> float:
    """Mean negative log-likelihood (unweighted cross-entropy, or BCE over every label)."""
    if multi_label:
        return float(F.binary_cross_entropy_with_logits(logits.double(), labels.double()))
    return float(F.cross_entropy(logits.double(), labels.long()))


def bin_sums(probability: np.ndarray, happened: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Per equal-width probability bin: rows, sum of probabilities, events that happened
    (shape (3, bins); sums of batches add up)."""
    probability = np.asarray(probability, dtype=np.float64)
    index = np.clip((probability * bins).astype(np.int64), 0, bins - 1)
    return np.stack([np.bincount(index, minlength=bins).astype(np.float64),
                     np.bincount(index, probability, bins),
                     np.bincount(index, np.asarray(happened, dtype=np.float64), bins)])


def table(sums: np.ndarray) -> dict:
    """A reliability table from :func:`bin_sums`: per bin, rows, mean probability, observed
    frequency (empty bins: 0)."""
    count = sums[0]
    safe = np.maximum(count, 1)
    return {"count": count.astype(np.int64).tolist(), "confidence": (sums[1] / safe).tolist(),
            "accuracy": (sums[2] / safe).tolist()}


def reliability(probability: np.ndarray, happened: np.ndarray, bins: int = BINS) -> dict:
    """The reliability table of (probability, happened) pairs."""
    return table(bin_sums(probability, happened, bins))


def ece(table: Mapping) -> float:
    """Expected calibration error of a :func:`reliability` table."""
    count = np.asarray(table["count"], dtype=np.float64)
    if not count.sum():
        return 0.0
    gap = np.abs(np.asarray(table["confidence"]) - np.asarray(table["accuracy"]))
    return float((count * gap).sum() / count.sum())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> float:
    """The ``T`` in [0.05, 20] that minimises the NLL of ``logits / T`` (a bounded 1-D search
    on log T: the NLL is smooth and unimodal in it)."""
    z = logits.double()
    found = minimize_scalar(lambda log_t: nll(z / math.exp(log_t), labels, multi_label),
                            bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def calibrate(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> dict:
    """Fit a temperature on validation logits; the metrics before and after, and the bins."""
    if logits.shape[0] == 0:
        return {}
    t = fit_temperature(logits, labels, multi_label)
    before = reliability(*events(logits, labels, multi_label))
    after = reliability(*events(logits / t, labels, multi_label))
    return {"temperature": t, "ece_before": ece(before), "ece": ece(after),
            "nll_before": nll(logits, labels, multi_label), "nll": nll(logits / t, labels, multi_label),
            "reliability": {"before": before, "after": after}}


def scaled_threshold(threshold: float, temperature: float) -> float:
    """The threshold on calibrated scores that selects exactly what ``threshold`` did before:
    ``sigmoid(z) >= t``  ⇔  ``sigmoid(z / T) >= sigmoid(logit(t) / T)``."""
    return 1.0 / (1.0 + math.exp(-math.log(threshold / (1.0 - threshold)) / temperature))


def export_temperature(metrics: Mapping, enabled: bool) -> float | None:
    """The temperature to fold into an exported model: the checkpoint's, when calibration is on
    and the checkpoint has one (regression and older runs have none)."""
    t = metrics.get("temperature") if enabled else None
    return float(t) if t is not None and math.isfinite(float(t)) else None


def classifier_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that produces the logits: the last ``nn.Linear`` with ``num_labels``
    outputs (``classifier`` in BERT, ``classifier.out_proj`` in RoBERTa, ``score`` in others).

    Raises:
        ValueError: the model has no such layer (its head cannot take a temperature).
    """
    n = model.config.num_labels
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear layer with num_labels={n} outputs to scale; "
                         "set train.calibrate=false")
    return heads[-1]


def fold_temperature(model_dir: str | Path, temperature: float, trust_remote_code: bool = False) -> None:
    """Divide the classifier head's weight and bias in ``model_dir`` by ``temperature`` and map a
    multi-label threshold the same way; the temperature is recorded in ``config.json``."""
    _ensure_working_directory(Path(model_dir).parent)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    head = classifier_head(model)
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    threshold = getattr(model.config, "threshold", None)
    if threshold is not None:
        model.config.threshold = scaled_threshold(float(threshold), temperature)
    model.config.calibration_temperature = temperature
    for old in [*Path(model_dir).glob("*.safetensors"), *Path(model_dir).glob("*.safetensors.index.json")]:
        old.unlink()  # the model is in memory; save_pretrained may shard differently
    model.save_pretrained(str(model_dir), safe_serialization=True)


def _ensure_working_directory(fallback: Path) -> None:
    """transformers resolves paths against the working directory while it imports its model
    modules; a Ray job driver's working directory (its ``--working-dir`` copy) can be removed
    under it by the runtime-env cleanup, so move to ``fallback`` when it is gone (every path
    bertray uses is absolute)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(fallback)


def plot_reliability(table: Mapping, path: str | Path, title: str = "") -> None:
    """``reliability.png``: observed frequency against mean probability per bin, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for name in ("before", "after"):
        part = table[name]
        keep = np.asarray(part["count"]) > 0
        x, y = np.asarray(part["confidence"])[keep], np.asarray(part["accuracy"])[keep]
        ax.plot(x, y, marker="o", label=f"{name} (ECE {ece(part):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed frequency",
           title=title or "reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

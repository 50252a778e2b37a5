"""Label maps: built deterministically from training labels, saved with the model.

Like transformers' ``run_glue.py``, labels are sorted so the same data always gives
the same ``label2id``; the map is written into the model's ``config.json`` so a
checkpoint describes itself and predictions decode to real names. :func:`label_key` is
the one rule that turns a raw label into its key, for the map, the counts and every check.

Pure module: no ``ray``, no work at import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from bertray.errors import BertrayError, DataError


def label_value(value) -> int | float | str:
    """The canonical value of a raw label: numpy scalars unwrapped, bools and whole floats as ints.

    ``label_key(v) == str(label_value(v))``; the value (not the key) orders numeric labels.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def label_key(value) -> str:
    """The one normalisation of a raw label into its ``label2id`` key, used by the label map,
    the label counts and every check against the map.

    ``1``, ``1.0``, ``"1"``, ``True`` and ``np.int64(1)`` give ``"1"``; ``False`` gives ``"0"``;
    a float with a fraction keeps it (``0.5`` -> ``"0.5"``); strings are kept as they are.
    """
    return str(label_value(value))


def build_label_map(labels: Iterable) -> tuple[dict[str, int], dict[int, str]]:
    """Return ``(label2id, id2label)`` for the distinct values of ``labels``.

    Numeric labels keep their numeric order (0, 1, ..., 10), strings sort lexically. Keys of
    ``label2id`` are :func:`label_key` strings, as Hugging Face configs store them.

    Raises:
        BertrayError: no labels, or a mix of numbers and strings.
    """
    distinct = {label_value(v) for v in labels}
    if not distinct:
        raise BertrayError("no labels found: the label column is empty")
    if len({isinstance(v, str) for v in distinct}) > 1:
        raise BertrayError(f"labels mix numbers and strings ({sorted(map(str, distinct))[:10]}); make the label column one type")
    ordered = sorted(distinct)
    label2id = {label_key(v): i for i, v in enumerate(ordered)}
    id2label = {i: label_key(v) for i, v in enumerate(ordered)}
    return label2id, id2label


def check_classes(counts: Mapping, where: str) -> None:
    """A classifier needs two classes or more in its training data.

    Raises:
        DataError: naming ``where``, the rows per class and the fix.
    """
    if len(counts) >= 2:
        return
    found = ", ".join(f"{label_key(k)!r}: {n} rows" for k, n in counts.items()) or "no usable rows"
    raise DataError(f"{where}: training needs at least 2 classes, found {len(counts)} ({found}). Check "
                       "data.label_column and the data (data.max_train_rows keeps only the first rows).")


def similar_labels(keys: Iterable[str]) -> list[list[str]]:
    """Groups of distinct labels that differ only by surrounding whitespace or case (``"spam"``,
    ``"Spam "``): usually one class spelt two ways."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.strip().casefold(), []).append(k)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]


def encode_labels(values, label2id: Mapping[str, int], where: str = "data") -> np.ndarray:
    """Map raw labels to ids.

    Raises:
        BertrayError: naming every unknown label, how many rows carry it, and the known labels.
    """
    keys = [label_key(v) for v in values]
    try:
        return np.fromiter((label2id[k] for k in keys), dtype=np.int64, count=len(keys))
    except KeyError:
        unknown: dict[str, int] = {}
        for k in keys:
            if k not in label2id:
                unknown[k] = unknown.get(k, 0) + 1
        detail = ", ".join(f"{k!r} ({n} rows)" for k, n in sorted(unknown.items()))
        raise BertrayError(
            f"{where}: label(s) not in the training label map: {detail}. "
            f"Known labels: {sorted(label2id)}. Fix the labels, or add rows with them to the training data."
        ) from None


def class_weights(counts: Mapping[int, int], num_labels: int) -> list[float]:
    """scikit-learn's 'balanced' weights: n_samples / (n_classes * count)."""
    total = sum(counts.values())
    return [total / (num_labels * max(counts.get(i, 0), 1)) for i in range(num_labels)]

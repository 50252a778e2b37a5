import numpy as np
import pandas as pd
import pytest

from bertray.errors import BertrayError
from bertray.labels import build_label_map, class_weights, encode_labels


def test_string_labels_sorted_and_deterministic(data_root):
    labels = pd.read_parquet(data_root / "trec" / "train.parquet")["label"]
    label2id, id2label = build_label_map(labels)
    assert list(label2id) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert id2label == {i: k for k, i in label2id.items()}
    assert build_label_map(labels.sample(frac=1, random_state=1)) == (label2id, id2label)


def test_integer_labels_keep_numeric_order():
    label2id, id2label = build_label_map(np.array([10, 2, 1, 2]))
    assert label2id == {"1": 0, "2": 1, "10": 2}
    assert id2label[2] == "10"
    # floats that are whole numbers (pandas upcasts ints with nulls) map like ints
    assert list(encode_labels([1.0, 10.0], label2id)) == [0, 2]


def test_mixed_labels_rejected():
    with pytest.raises(BertrayError, match="mix numbers and strings"):
        build_label_map(["a", 1])


def test_unknown_label_names_label_and_count():
    label2id, _ = build_label_map(["ham", "spam"])
    with pytest.raises(BertrayError) as e:
        encode_labels(["ham", "eggs", "eggs", "spam"], label2id, "validation.csv")
    assert "'eggs' (2 rows)" in str(e.value) and "validation.csv" in str(e.value)


def test_balanced_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 90 + [1] * 10)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    assert np.allclose(class_weights({0: 90, 1: 10}, 2), expected)

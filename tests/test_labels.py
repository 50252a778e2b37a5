import numpy as np
import pandas as pd
import pytest

from bertray.errors import BertrayError, DataError
from bertray.labels import (
    build_label_map,
    check_classes,
    class_weights,
    encode_labels,
    label_key,
    similar_labels,
)


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


@pytest.mark.parametrize("value, key", [
    (1, "1"), (1.0, "1"), ("1", "1"), (True, "1"), (np.int64(1), "1"), (np.float32(1.0), "1"), (np.bool_(True), "1"),
    (False, "0"), (0.0, "0"), (0.5, "0.5"), ("spam", "spam"), (" spam", " spam"),
])
def test_label_key_is_one_rule_for_every_type(value, key):
    assert label_key(value) == key


@pytest.mark.parametrize("column", [[0.0, 1.0, 1.0], [False, True, True], [0, 1, 1], np.array([0.0, 1.0, 1.0])])
def test_float_and_bool_labels_map_like_ints(column):
    label2id, id2label = build_label_map(column)
    assert label2id == {"0": 0, "1": 1} and id2label == {0: "0", 1: "1"}
    assert list(encode_labels(column, label2id)) == [0, 1, 1]


def test_fractional_float_labels_sort_numerically():
    label2id, _ = build_label_map([2.5, 10, 0.5, 2.5])
    assert label2id == {"0.5": 0, "2.5": 1, "10": 2}


@pytest.mark.parametrize("counts, found", [({"spam": 40}, "'spam': 40 rows"), ({True: 7}, "'1': 7 rows"),
                                           ({}, "no usable rows")])
def test_one_class_is_an_error_with_counts(counts, found):
    with pytest.raises(DataError) as e:
        check_classes(counts, "data.train=t.csv")
    assert f"data.train=t.csv: training needs at least 2 classes, found {len(counts)} ({found})" in str(e.value)
    check_classes({"a": 1, "b": 1}, "x")  # two classes pass


def test_labels_differing_only_by_case_or_whitespace_are_grouped():
    assert similar_labels(["spam", "ham", "Spam ", "SPAM", "eggs", " ham"]) == [[" ham", "ham"], ["SPAM", "Spam ", "spam"]]
    assert similar_labels(["0", "1"]) == []

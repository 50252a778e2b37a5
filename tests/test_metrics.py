import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion

from bertray.metrics import classification_metrics, confusion_matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 5
    y = rng.integers(0, n, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, n - 1, 500))  # class 4 rarely predicted
    cm = confusion_matrix(y, p, n)
    assert np.array_equal(cm, sk_confusion(y, p, labels=range(n)))
    m = classification_metrics(cm, {i: f"c{i}" for i in range(n)})
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, p, average=avg, labels=range(n), zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(pr)
        assert m[f"recall_{avg}"] == pytest.approx(rc)
        assert m[f"f1_{avg}"] == pytest.approx(f1)
    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=range(n), zero_division=0)
    assert [m["per_class"][f"c{i}"]["f1"] for i in range(n)] == pytest.approx(f1)


def test_sharded_counts_sum_to_the_whole():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 3, 101), rng.integers(0, 3, 101)
    shards = [confusion_matrix(y[i::2], p[i::2], 3) for i in range(2)]
    assert np.array_equal(sum(shards), confusion_matrix(y, p, 3))


@pytest.mark.parametrize(("name", "mode"), [("loss", "min"), ("eval_loss", "min"), ("accuracy", "max"),
                                            ("f1_macro", "max"), ("f1_weighted", "max")])
def test_metric_mode(name, mode):
    from bertray.metrics import metric_mode

    assert metric_mode(name) == mode


def test_metric_mode_agrees_with_every_problem_type():
    from bertray import problem
    from bertray.metrics import metric_mode

    for t in problem.PROBLEM_TYPES:
        for name, mode in problem.metric_modes(t).items():
            assert metric_mode(name) == mode, (t, name)


def test_is_better_ranks_by_the_metric_and_never_prefers_nan():
    from bertray.metrics import is_better

    assert is_better("accuracy", 0.5, None) and is_better("loss", 9.0, None)
    assert is_better("accuracy", 0.6, 0.5) and not is_better("accuracy", 0.5, 0.6)
    assert is_better("loss", 0.4, 0.5) and not is_better("loss", 0.6, 0.5)
    assert not is_better("accuracy", 0.5, 0.5) and not is_better("loss", 0.5, 0.5)  # equal keeps the earlier
    assert not is_better("loss", float("nan"), 0.5) and not is_better("loss", float("nan"), None)
    assert is_better("loss", 0.5, float("nan"))

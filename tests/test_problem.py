"""The problem types without Ray: detection, labels, losses, sharded metrics against
scikit-learn/scipy, threshold search, output columns, and the exported model in
``transformers.pipeline``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn import metrics as skm

from bertray import problem as P
from bertray.problem import LabelError, LabelStats

# ----------------------------------------------------------------------------- choosing the type


@pytest.mark.parametrize(("label_type", "separator", "expected"), [
    (pa.float64(), None, P.REGRESSION),
    (pa.float32(), None, P.REGRESSION),
    (pa.int64(), None, P.SINGLE),
    (pa.string(), None, P.SINGLE),
    (pa.bool_(), None, P.SINGLE),
    (pa.list_(pa.string()), None, P.MULTI),
    (pa.large_list(pa.int32()), None, P.MULTI),
    (pa.string(), ",", P.MULTI),
])
def test_auto_detection(label_type, separator, expected):
    assert P.detect(label_type, separator) == expected
    assert P.resolve("auto", label_type, separator, "f.parquet", "label") == expected


@pytest.mark.parametrize(("problem_type", "label_type", "separator", "says"), [
    (P.MULTI, pa.string(), None, "set data.label_separator"),
    (P.MULTI, pa.int64(), ",", "data.label_separator applies to string columns"),
    (P.SINGLE, pa.list_(pa.string()), None, "only multi_label_classification takes"),
    (P.REGRESSION, pa.list_(pa.float64()), None, "only multi_label_classification takes"),
    (P.REGRESSION, pa.string(), None, "regression needs numbers"),
])
def test_a_forced_type_that_does_not_fit_the_column(problem_type, label_type, separator, says):
    with pytest.raises(LabelError, match="train.parquet: column 'y'") as e:
        P.resolve(problem_type, label_type, separator, "train.parquet", "y")
    assert says in str(e.value)
    assert "model.problem_type" in str(e.value) or "label_separator" in str(e.value)


def test_forced_types_that_fit():
    assert P.resolve(P.SINGLE, pa.float64(), None, "f", "y") == P.SINGLE  # 0.0/1.0 class labels
    assert P.resolve(P.REGRESSION, pa.int64(), None, "f", "y") == P.REGRESSION  # 1..5 ratings


def test_metric_names_and_directions():
    assert P.check_metric(P.SINGLE, "accuracy") is None
    msg = P.check_metric(P.REGRESSION, "accuracy")
    assert "checkpoint.metric='accuracy'" in msg and "'pearson'" in msg and "'spearman'" in msg
    assert P.check_metric(P.MULTI, "f1_samples", key="tune.metric") is None
    for name in P.PROBLEM_TYPES:
        problem_cls = P._CLASSES[name]
        assert problem_cls.default_metric in problem_cls.metric_modes
        assert problem_cls.metric_modes["loss"] == "min"
    assert P.metric_modes(P.REGRESSION)["mae"] == "min"
    assert P.metric_modes(P.MULTI)["hamming_loss"] == "min"
    assert P.metric_modes(P.MULTI)["f1_macro"] == "max"


def test_metric_mode_scalars_and_headline():
    assert P.metric_mode("loss") == "min" and P.metric_mode("spearman") == "max"
    assert P.metric_mode("hamming_loss") == "min" and P.metric_mode("f1_macro") == "max"
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        P.metric_mode("nope")
    m = {"loss": 0.5, "f1_micro": 0.75, "threshold": 0.4, "num_examples": 3, "per_class": {"a": {}},
         "confusion_matrix": [[1]]}
    assert P.scalar_metrics(m) == {"loss": 0.5, "f1_micro": 0.75, "threshold": 0.4, "num_examples": 3.0}
    assert P.headline(m) == "loss=0.5000 f1_micro=0.7500 threshold=0.4000"


# ----------------------------------------------------------------------------- labels


def test_single_label_map_and_encoding():
    p = P.make(P.SINGLE)
    stats = p.label_stats(pa.array([2, 10, 1, None, 2]))
    assert stats.rows == 4 and stats.counts == {2: 2, 10: 1, 1: 1}
    p = p.with_labels(stats)
    assert p.label2id == {"1": 0, "2": 1, "10": 2}  # numbers sort numerically, as labels.py does
    assert p.num_labels == 3
    assert p.encode(pa.array([10, 1, 2])).to_pylist() == [2, 0, 1]
    assert p.batch_labels(p.encode(pa.array([10, 1]))).dtype == torch.int64
    assert p.label_counts(LabelStats(3, 0, {1: 2, 10.0: 4, np.int64(2): 1})) == {0: 2, 1: 1, 2: 4}


def test_single_label_errors_name_file_column_count_and_fix():
    p = P.make(P.SINGLE, {"neg": 0, "pos": 1})
    with pytest.raises(LabelError) as e:
        p.encode(pa.array(["pos", "meh", "meh", "?"]), "val.parquet", "sentiment")
    msg = str(e.value)
    assert "val.parquet: column 'sentiment'" in msg and "'meh' (2 rows)" in msg and "'?' (1 rows)" in msg
    assert "add rows with them to the training data" in msg
    with pytest.raises(LabelError, match=r"val.parquet: column 'sentiment': 2 row\(s\) with a null label.*drop_bad_rows"):
        p.encode(pa.array(["pos", None, None]), "val.parquet", "sentiment")
    with pytest.raises(LabelError, match=r"v.csv: column 'y': label\(s\) not in the training label map: 'x' \(3 rows\)"):
        p.check_known(LabelStats(5, 0, {"pos": 2, "x": 3}), "v.csv", "y")
    p.check_known(LabelStats(2, 0, {"pos": 2}), "v.csv", "y")


@pytest.mark.parametrize("values", [
    pa.array([["joy", "anger"], [], ["joy"], ["joy", "joy"]]),
    pa.array(["joy,anger", "", " joy ", "joy,joy"]),
])
def test_multi_label_lists_and_separated_strings(values):
    p = P.make(P.MULTI, label_separator=",")
    stats = p.label_stats(values)
    assert (stats.rows, stats.empty) == (4, 1)  # the empty row is a real answer, counted
    assert stats.counts == {"joy": 3, "anger": 1}  # "joy" twice in a row counts once
    p = p.with_labels(stats)
    assert p.label2id == {"anger": 0, "joy": 1}
    encoded = p.encode(values)
    assert encoded.type == pa.list_(pa.int32())
    assert encoded.to_pylist() == [[0, 1], [], [1], [1]]
    assert p.batch_labels(encoded).tolist() == [[1, 1], [0, 0], [0, 1], [0, 1]]
    assert p.label_counts(stats) == {1: 3, 0: 1}


def test_multi_label_int_lists_sort_numerically():
    p = P.make(P.MULTI)
    p = p.with_labels(p.label_stats(pa.array([[10, 2], [1]])))
    assert p.label2id == {"1": 0, "2": 1, "10": 2}
    assert p.encode(pa.array([[2, 10], []])).to_pylist() == [[1, 2], []]


def test_multi_label_errors():
    p = P.make(P.MULTI, {"a": 0, "b": 1})
    with pytest.raises(LabelError, match=r"g.parquet: column 'tags': 3 row\(s\) hold string values, not label "
                                         r"lists; set data.label_separator"):
        p.encode(pa.array(["a", "b", None, "a"]), "g.parquet", "tags")
    with pytest.raises(LabelError, match=r"g.parquet: column 'tags': 2 row\(s\) hold int64 values"):
        p.encode(pa.array([1, 2]), "g.parquet", "tags")
    with pytest.raises(LabelError, match=r"column 'tags': label\(s\) not in the training label map: 'c' \(2 rows\)"):
        p.encode(pa.array([["a", "c"], ["c"]]), "g.parquet", "tags")
    bad = pa.array([["a"], None, ["b", None], []])
    assert p.bad_labels(bad).tolist() == [False, True, True, False]
    with pytest.raises(LabelError, match=r"2 row\(s\) with a null \(or null element in the list\) label"):
        p.encode(bad, "g.parquet", "tags")
    assert p.label_stats(bad).rows == 2


def test_regression_labels():
    p = P.make(P.REGRESSION, label_name="score")
    values = pa.array([1.5, float("nan"), None, float("inf"), -float("inf"), 4.0])
    assert p.bad_labels(values).tolist() == [False, True, True, True, True, False]
    assert p.label_stats(values).rows == 2
    assert p.with_labels(p.label_stats(values)) is p and p.num_labels == 1
    with pytest.raises(LabelError, match=r"s.parquet: column 'score': 4 row\(s\) with a null, NaN or infinite "
                                         r"label.*drop_bad_rows=true"):
        p.encode(values, "s.parquet", "score")
    with pytest.raises(LabelError, match="column 'score' holds string; regression needs numbers"):
        p.encode(pa.array(["1.0"]), "s.parquet", "score")
    encoded = p.encode(pa.array([1, 3], pa.int32()))
    assert encoded.type == pa.float64() and encoded.to_pylist() == [1.0, 3.0]
    assert p.batch_labels(encoded).dtype == torch.float32


def test_label_stats_add_and_survive_json():
    a = LabelStats(3, 1, {1: 2, "x": 1})
    b = LabelStats.from_json(LabelStats(2, 0, {1: 1, "1": 1}).to_json())
    total = a + b
    assert (total.rows, total.empty) == (5, 1)
    assert total.counts == {1: 3, "x": 1, "1": 1}  # 1 and "1" stay apart until the label map


# ----------------------------------------------------------------------------- losses and weights


def test_losses_equal_torch():
    torch.manual_seed(0)
    logits = torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    weight = torch.tensor([1.0, 2.0, 0.5])
    single = P.make(P.SINGLE, {"a": 0, "b": 1, "c": 2})
    assert torch.allclose(single.loss(logits, labels, weight), F.cross_entropy(logits, labels, weight=weight))
    hot = torch.randint(0, 2, (8, 3)).float()
    multi = P.make(P.MULTI, {"a": 0, "b": 1, "c": 2})
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=weight)(logits, hot)
    assert torch.allclose(multi.loss(logits, hot, weight), expected)
    target = torch.randn(8)
    reg = P.make(P.REGRESSION)
    assert torch.allclose(reg.loss(logits[:, :1], target), F.mse_loss(logits[:, 0], target))
    assert torch.allclose(reg.loss(logits[:, :1].bfloat16(), target), F.mse_loss(logits[:, 0].bfloat16().float(), target))


def test_class_weights():
    single = P.make(P.SINGLE, {"a": 0, "b": 1})
    assert single.class_weights("balanced", {0: 30, 1: 10}, 40) == pytest.approx([40 / 60, 40 / 20])
    assert single.class_weights(None, {}, 0) is None
    multi = P.make(P.MULTI, {"a": 0, "b": 1, "c": 2})
    # pos_weight = negatives / positives per label; a label no row carries keeps 1
    assert multi.class_weights("balanced", {0: 10, 1: 50}, 100) == pytest.approx([9.0, 1.0, 1.0])
    assert multi.class_weights([1, 2, 3], {}, 0) == [1.0, 2.0, 3.0]
    with pytest.raises(LabelError, match=r"train.class_weights has 2 values but there are 3 labels"):
        multi.class_weights([1, 2], {}, 0)
    with pytest.raises(LabelError, match="unset train.class_weights for a regression run"):
        P.make(P.REGRESSION).class_weights("balanced", {}, 10)


# ----------------------------------------------------------------------------- sharded metrics


def _sharded(problem, logits: torch.Tensor, labels: torch.Tensor, cut: int):
    """Two "workers" score the two halves; their states are summed (what all-reduce does)."""
    states = []
    for part in (slice(0, cut), slice(cut, None)):
        state = problem.new_state()
        for start in range(0, len(logits[part]), 16):  # several batches per worker
            problem.update(state, logits[part][start:start + 16], labels[part][start:start + 16])
        states.append(state)
    return problem.metrics(states[0].merge(states[1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_single_label_sharded_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 203, 4
    y = rng.integers(0, k, n)
    logits = torch.from_numpy(rng.normal(size=(n, k)) + 2 * np.eye(k)[y] * (rng.random((n, 1)) < 0.6))
    p = P.make(P.SINGLE, {f"c{i}": i for i in range(k)})
    m = _sharded(p, logits.float(), torch.from_numpy(y), cut=77)
    pred = logits.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    assert m["loss"] == pytest.approx(F.cross_entropy(logits.float(), torch.from_numpy(y)).item(), rel=1e-5)
    assert m["num_examples"] == n


def _multilabel_data(seed: int, n: int = 301, k: int = 5):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, k)) < np.array([0.4, 0.2, 0.1, 0.05, 0.0])[:k]  # a label no row carries
    truth[:20] = False  # rows with no label
    logits = rng.normal(size=(n, k)) + 2.5 * truth - 1.0
    return torch.from_numpy(logits).float(), torch.from_numpy(truth.astype(np.float32))


def _sk_multilabel(truth: np.ndarray, pred: np.ndarray) -> dict:
    return {
        "f1_micro": skm.f1_score(truth, pred, average="micro", zero_division=0),
        "f1_macro": skm.f1_score(truth, pred, average="macro", zero_division=0),
        "f1_samples": skm.f1_score(truth, pred, average="samples", zero_division=1),
        "precision_micro": skm.precision_score(truth, pred, average="micro", zero_division=0),
        "recall_micro": skm.recall_score(truth, pred, average="micro", zero_division=0),
        "subset_accuracy": skm.accuracy_score(truth, pred),
        "hamming_loss": skm.hamming_loss(truth, pred),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_label_sharded_metrics_equal_sklearn_at_the_searched_threshold(seed):
    logits, hot = _multilabel_data(seed)
    p = P.make(P.MULTI, {f"l{i}": i for i in range(5)})
    m = _sharded(p, logits, hot, cut=140)
    probs, truth = torch.sigmoid(logits).numpy(), hot.numpy().astype(bool)
    micro = [skm.f1_score(truth, probs >= np.float32(t), average="micro", zero_division=0) for t in P.THRESHOLD_GRID]
    assert m["f1_micro"] == pytest.approx(max(micro))  # the search found the best grid threshold
    assert m["threshold"] in P.THRESHOLD_GRID
    pred = probs >= np.float32(m["threshold"])
    for name, value in _sk_multilabel(truth, pred).items():
        assert m[name] == pytest.approx(value), name
    pr, rc, f1, support = skm.precision_recall_fscore_support(truth, pred, zero_division=0)
    assert [m["per_class"][f"l{i}"]["f1"] for i in range(5)] == pytest.approx(f1)
    assert [m["per_class"][f"l{i}"]["support"] for i in range(5)] == support.tolist()
    assert m["loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, hot).item(), rel=1e-5)
    assert m["num_examples"] == len(hot)


def test_threshold_search_picks_the_best_and_breaks_ties_toward_one_half():
    grid = (0.3, 0.5, 0.7)
    counts = np.array([[[5, 5, 0]], [[5, 1, 0]], [[4, 0, 1]]], dtype=float)  # micro-F1 .67, .91, .89
    assert P.search_threshold(counts, grid) == 1
    tied = np.array([[[4, 0, 1]], [[0, 0, 0]], [[4, 0, 1]]], dtype=float)
    assert P.search_threshold(tied, (0.1, 0.2, 0.6)) == 2  # 0.6 is nearer 0.5 than 0.1
    # a threshold that separates the classes perfectly is found
    p = P.MultiLabel({"a": 0}, grid=P.THRESHOLD_GRID)
    state = p.new_state()
    scores = torch.tensor([[0.10], [0.20], [0.25], [0.30], [0.90]])
    p.update(state, torch.logit(scores), torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0]]))
    m = p.metrics(state)
    assert m["f1_micro"] == 1.0 and 0.20 < m["threshold"] <= 0.25


def test_the_tuned_threshold_goes_into_the_model_config():
    from transformers import BertConfig

    p = P.make(P.MULTI, {"a": 0, "b": 1})
    config = p.with_metrics({"f1_micro": 0.8, "threshold": 0.31}).apply_to(BertConfig())
    assert (config.problem_type, config.num_labels, config.threshold) == (P.MULTI, 2, 0.31)
    assert config.id2label == {0: "a", 1: "b"}
    assert P.from_model_config(config).threshold == 0.31
    single = P.make(P.SINGLE, {"a": 0, "b": 1})
    assert single.with_metrics({"accuracy": 1.0}) is single


def test_fixed_threshold_evaluation_of_written_output():
    logits, hot = _multilabel_data(5, n=60, k=3)
    p = P.make(P.MULTI, {"a": 0, "b": 1, "c": 2}, threshold=0.37)
    cols = p.output_columns(p.scores(logits).numpy())
    truth = pa.array([[p.id2label[i] for i in np.flatnonzero(row)] for row in hot.numpy()])
    fixed = p.for_output()
    assert fixed.grid == (0.37,)
    state = fixed.new_state()
    fixed.update_from_output(state, truth, cols["prediction"])
    m = fixed.metrics(state)
    pred = torch.sigmoid(logits).numpy() >= np.float32(0.37)
    assert m["threshold"] == 0.37 and "loss" not in m
    for name, value in _sk_multilabel(hot.numpy().astype(bool), pred).items():
        assert m[name] == pytest.approx(value), name


def test_single_label_evaluation_of_written_output():
    p = P.make(P.SINGLE, {"neg": 0, "pos": 1}).for_output()
    state = p.new_state()
    p.update_from_output(state, pa.array(["pos", "neg", "pos"]), pa.array(["pos", "pos", "pos"]))
    m = p.metrics(state)
    assert m["confusion_matrix"] == [[0, 1], [0, 2]] and "loss" not in m


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_sharded_metrics_equal_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    true = rng.uniform(0, 5, 157)
    pred = true + rng.normal(0, 0.8, 157)
    pred[:5] = pred[5:10]  # ties, so Spearman's ranks matter
    p = P.make(P.REGRESSION)
    m = _sharded(p, torch.from_numpy(pred).float()[:, None], torch.from_numpy(true).float(), cut=61)
    pred32, true32 = pred.astype(np.float32), true.astype(np.float32)
    assert m["mse"] == pytest.approx(skm.mean_squared_error(true32, pred32), rel=1e-6)
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(true32, pred32)), rel=1e-6)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(true32, pred32), rel=1e-6)
    assert m["r2"] == pytest.approx(skm.r2_score(true32, pred32), rel=1e-6)
    assert m["pearson"] == pytest.approx(pearsonr(pred32, true32)[0], rel=1e-6)
    assert m["spearman"] == pytest.approx(spearmanr(pred32, true32)[0], rel=1e-6)
    assert m["loss"] == pytest.approx(m["mse"], rel=1e-5)
    assert m["num_examples"] == 157


def test_regression_constant_predictions_give_zero_correlation_not_nan():
    p = P.make(P.REGRESSION)
    state = p.new_state()
    p.update(state, torch.ones(4, 1), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    m = p.metrics(state)
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0


def _gloo_worker(rank: int, world: int, port: int, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        out = {}
        for name, problem in [("regression", P.make(P.REGRESSION)),
                              ("multi", P.make(P.MULTI, {"a": 0, "b": 1, "c": 2}))]:
            state = problem.new_state()
            g = torch.Generator().manual_seed(rank)
            n = 5 + 4 * rank  # ranks hold different row counts
            if name == "regression":
                problem.update(state, torch.randn(n, 1, generator=g), torch.randn(n, generator=g))
            else:
                problem.update(state, torch.randn(n, 3, generator=g), (torch.rand(n, 3, generator=g) < 0.3).float())
            # numpy, not tensors: a tensor in a queue is shared through a file descriptor that
            # dies with this process
            local = (state.sums.numpy().copy(), [v.numpy().copy() for v in state.values])
            out[name] = (local, problem.metrics(state.all_reduce()))
        queue.put((rank, out))
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_across_two_processes_equals_the_merged_states():
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for name, problem in [("regression", P.make(P.REGRESSION)), ("multi", P.make(P.MULTI, {"a": 0, "b": 1, "c": 2}))]:
        states = [P.EvalState(torch.from_numpy(sums), [torch.from_numpy(v) for v in values])
                  for sums, values in (results[rank][name][0] for rank in (0, 1))]
        merged = problem.metrics(states[0].merge(states[1]))
        for rank in (0, 1):
            got, want = dict(results[rank][name][1]), dict(merged)  # every rank: the merged states' metrics
            assert got.pop("per_class", None) == want.pop("per_class", None), (name, rank)
            assert got == pytest.approx(want), (name, rank)


# ----------------------------------------------------------------------------- output columns


def test_single_label_output_columns():
    p = P.make(P.SINGLE, {"neg": 0, "pos": 1, "mid": 2})
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)
    cols = p.output_columns(scores, all_scores=True, top_k=2)
    assert cols["prediction"].to_pylist() == ["pos", "neg"]
    assert cols["score"].to_pylist() == pytest.approx([0.7, 0.5])
    assert cols["top_k_labels"].to_pylist() == [["pos", "mid"], ["neg", "mid"]]
    assert cols["score_mid"].to_pylist() == pytest.approx([0.2, 0.3])
    assert [(f.name, f.type) for f in p.output_fields(True, 2)] == [(k, v.type) for k, v in cols.items()]


def test_multi_label_output_columns():
    p = P.make(P.MULTI, {"a": 0, "b": 1, "c": 2}, threshold=0.4)
    scores = np.array([[0.9, 0.1, 0.45], [0.1, 0.2, 0.3], [0.4, 0.8, 0.4]], dtype=np.float32)
    cols = p.output_columns(scores, all_scores=True)
    assert cols["prediction"].to_pylist() == [["a", "c"], [], ["b", "a", "c"]]  # best first; may be empty
    assert cols["score"].to_pylist() == [pytest.approx([0.9, 0.45]), [], pytest.approx([0.8, 0.4, 0.4])]
    assert cols["score_b"].to_pylist() == pytest.approx([0.1, 0.2, 0.8])
    assert [(f.name, f.type) for f in p.output_fields(True)] == [(k, v.type) for k, v in cols.items()]
    assert p.output_columns(np.zeros((0, 3)))["prediction"].to_pylist() == []
    assert p.check_output_options(False, 3) and not p.check_output_options(True, None)


def test_regression_output_columns():
    p = P.make(P.REGRESSION)
    cols = p.output_columns(np.array([[1.25], [-0.5]], dtype=np.float32))
    assert list(cols) == ["prediction"] and cols["prediction"].type == pa.float64()
    assert cols["prediction"].to_pylist() == [1.25, -0.5]
    assert [(f.name, f.type) for f in p.output_fields()] == [("prediction", pa.float64())]
    assert len(p.check_output_options(True, 2)) == 2


# ----------------------------------------------------------------------------- exported model in pipeline()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The embedded MiniLM cut to one layer, saved once per problem type with its config fields."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from bertray.modeling import load_tokenizer, resolve_model_path

    problems = {P.SINGLE: P.make(P.SINGLE, {"neg": 0, "pos": 1, "mid": 2}),
                P.MULTI: P.make(P.MULTI, {"anger": 0, "joy": 1, "sadness": 2}, threshold=0.47),
                P.REGRESSION: P.make(P.REGRESSION, label_name="score")}
    path = resolve_model_path("default")
    tokenizer = load_tokenizer("default")
    out = {}
    for name, problem in problems.items():
        torch.manual_seed(0)
        config = problem.apply_to(AutoConfig.from_pretrained(path, num_hidden_layers=1))
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config).eval()
        with torch.no_grad():  # a head that gives spread-out answers, not all near 0
            model.classifier.weight.normal_(0, 2.0)
            model.classifier.bias.fill_(2.0 if name == P.REGRESSION else 0.0)  # regression: beyond [0, 1]
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = (problem, str(d))
    return out


TEXTS = ["a quiet, lovely film", "I hated every minute of it", "the plot is thin but the cast is great"]
PAIRS = [("A man plays guitar.", "Someone is playing an instrument."), ("The cat sleeps.", "Stocks fell sharply.")]


def _logits(model_dir: str, texts=None, pairs=None) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt") if pairs else \
        tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _pipeline(model_dir: str):
    from transformers import pipeline

    return pipeline("text-classification", model=model_dir, device="cpu")


def test_exported_config_rebuilds_the_problem(tiny_models):
    from transformers import AutoConfig

    for problem, model_dir in tiny_models.values():
        again = P.from_model_config(AutoConfig.from_pretrained(model_dir))
        assert type(again) is type(problem) and again.num_labels == problem.num_labels
        assert again.config_fields() == problem.config_fields()
    _, multi_dir = tiny_models[P.MULTI]
    assert P.from_model_config(AutoConfig.from_pretrained(multi_dir), threshold=0.9).threshold == 0.9


def test_pipeline_single_label_gives_the_same_answers(tiny_models):
    problem, model_dir = tiny_models[P.SINGLE]
    cols = problem.output_columns(problem.scores(_logits(model_dir, TEXTS)).numpy())
    answers = _pipeline(model_dir)(TEXTS)
    assert [a["label"] for a in answers] == cols["prediction"].to_pylist()
    assert [a["score"] for a in answers] == pytest.approx(cols["score"].to_pylist(), abs=1e-5)


def test_pipeline_multi_label_gives_the_same_answers(tiny_models):
    problem, model_dir = tiny_models[P.MULTI]
    cols = problem.output_columns(problem.scores(_logits(model_dir, TEXTS)).numpy())
    answers = _pipeline(model_dir)(TEXTS, top_k=None)  # sigmoid scores of every label, best first
    above = [[a for a in row if a["score"] >= problem.threshold] for row in answers]
    assert [[a["label"] for a in row] for row in above] == cols["prediction"].to_pylist()
    assert [[a["score"] for a in row] for row in above] == [pytest.approx(s, abs=1e-5) for s in cols["score"].to_pylist()]
    assert any(len(row) not in (0, 3) for row in above)  # the threshold really splits some rows


def test_pipeline_regression_and_pairs_give_the_raw_value(tiny_models):
    problem, model_dir = tiny_models[P.REGRESSION]
    cols = problem.output_columns(problem.scores(_logits(model_dir, pairs=PAIRS)).numpy())
    answers = _pipeline(model_dir)([{"text": a, "text_pair": b} for a, b in PAIRS])
    assert [a["label"] for a in answers] == ["score", "score"]
    assert [a["score"] for a in answers] == pytest.approx(cols["prediction"].to_pylist(), abs=1e-5)
    assert any(v < 0 or v > 1 for v in cols["prediction"].to_pylist())  # raw, not squashed by a sigmoid

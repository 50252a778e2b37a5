"""Task types end to end: sentence pairs, regression and multi-label through train ->
evaluate on the shipped subsets (MRPC, STS-B, GoEmotions), with smoke-size runs; outputs
checked against a plain ``transformers`` pipeline on the exported model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray.cli import main
from bertray.config import PredictConfig, RunConfig
from bertray.config_loader import load_config

ROOT = Path(__file__).resolve().parents[1]
# A smoke-size run of a shipped config: 2 of MiniLM's 6 layers, one short epoch.
SMOKE = ["model.num_hidden_layers=2", "train.epochs=1", "train.max_length=48", "train.batch_size=16",
         "train.lr=3.0e-4", "data.max_train_rows=256", "data.max_validation_rows=64", "train.log_every_n_steps=8"]


def _train(name: str, out: Path, *overrides: str):
    from bertray.train import run

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [*SMOKE, f"output_dir={out}", *overrides], RunConfig)
    return run(cfg)


def _evaluate(model_dir: str, inp, out: Path, *overrides: str) -> tuple[dict, pd.DataFrame]:
    from bertray.predict import evaluate

    cfg = load_config(ROOT / "configs" / "predict.yaml",
                      [f"model.path={model_dir}", f"input={inp}", f"output={out}", "amp=fp32", *overrides],
                      PredictConfig)
    summary = evaluate(cfg)
    return summary, pq.read_table(out).to_pandas()


def _config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _pipeline(model_dir: str):
    from transformers import pipeline

    return pipeline("text-classification", model=model_dir, device="cpu")


def _subset(src: Path, dest: Path, rows: int, keep=None) -> Path:
    df = pd.read_parquet(src)
    if keep is not None:
        df = df[df.apply(keep, axis=1)]
    df.head(rows).to_parquet(dest)
    return dest


# ----------------------------------------------------------------------------- pairs


@pytest.fixture(scope="module")
def mrpc(ray_session, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mrpc")
    return _train("mrpc", out / "run"), out


def test_pairs_train_predict_evaluate(mrpc, data_root):
    result, out = mrpc
    assert _config(result.model_dir)["problem_type"] == "single_label_classification"
    assert {"accuracy", "f1_macro", "confusion_matrix"} <= set(result.metrics)
    inp = _subset(data_root / "mrpc" / "validation.parquet", out / "val.parquet", 24)
    summary, df = _evaluate(result.model_dir, inp, out / "eval", "text_column=sentence1",
                            "text_pair_column=sentence2", "label_column=label")
    assert summary["rows_out"] == 24 and set(summary["metrics"]) >= {"accuracy", "f1_macro"}
    assert list(df.columns) == ["sentence1", "sentence2", "label", "prediction", "score"]
    # The pair reaches the model as transformers tokenizes it: [CLS] a [SEP] b [SEP] with token_type_ids.
    clf = _pipeline(result.model_dir)
    ref = clf([{"text": a, "text_pair": b} for a, b in zip(df.sentence1, df.sentence2, strict=True)],
              truncation=True)  # longest_first to the max_length saved with the model, as predict does
    assert df.prediction.tolist() == [r["label"] for r in ref]
    # tight: leaving out token_type_ids moves this small model's scores by ~1e-4
    assert np.allclose(df.score, [r["score"] for r in ref], atol=1e-5)
    metrics = json.loads((out / "eval" / "_metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(np.mean(df.prediction.astype(int) == df.label))
    assert (out / "eval" / "_confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- regression


@pytest.fixture(scope="module")
def stsb(ray_session, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stsb")
    return _train("stsb", out / "run"), out


def test_regression_train_predict_evaluate(stsb, data_root):
    result, out = stsb
    config = _config(result.model_dir)
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "score"}
    assert {"mse", "rmse", "mae", "pearson", "spearman", "r2"} <= set(result.metrics)
    assert "accuracy" not in result.metrics and "confusion_matrix" not in result.metrics
    history = json.loads((out / "run" / "history.json").read_text())
    assert all("pearson" in h for h in history)
    inp = _subset(data_root / "stsb" / "train.parquet", out / "val.parquet", 24)
    summary, df = _evaluate(result.model_dir, inp, out / "eval", "text_column=sentence1",
                            "text_pair_column=sentence2", "label_column=score")
    assert list(df.columns) == ["sentence1", "sentence2", "score", "prediction"]  # no score column added
    assert pq.read_table(out / "eval").schema.field("prediction").type == pa.float64()
    pairs = [{"text": a, "text_pair": b} for a, b in zip(df.sentence1, df.sentence2, strict=True)]
    ref = _pipeline(result.model_dir)(pairs, truncation=True)
    assert np.allclose(df.prediction, [r["score"] for r in ref], atol=1e-5)  # the raw value, no sigmoid
    metrics = json.loads((out / "eval" / "_metrics.json").read_text())
    from scipy.stats import pearsonr

    assert metrics["mse"] == pytest.approx(np.mean((df.prediction - df.score) ** 2), rel=1e-5)
    assert metrics["pearson"] == pytest.approx(pearsonr(df.prediction, df.score)[0], rel=1e-5)
    assert summary["metrics"]["pearson"] == pytest.approx(metrics["pearson"])
    assert (out / "eval" / "_scatter.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- multi-label


@pytest.fixture(scope="module")
def goemotions(ray_session, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("goemotions")
    return _train("goemotions", out / "run", "data.max_train_rows=512"), out


def test_multilabel_train_predict_evaluate(goemotions, data_root):
    result, out = goemotions
    config = _config(result.model_dir)
    assert config["problem_type"] == "multi_label_classification"
    assert 0 < config["threshold"] < 1 and config["threshold"] == result.metrics["threshold"]
    assert {"f1_micro", "f1_macro", "f1_samples", "subset_accuracy", "hamming_loss", "per_class"} <= set(result.metrics)
    known = set(config["label2id"])
    inp = _subset(data_root / "goemotions" / "validation.parquet", out / "val.parquet", 32,
                  keep=lambda row: set(row["labels"]) <= known)
    summary, df = _evaluate(result.model_dir, inp, out / "eval", "label_column=labels", "threshold=0.1")
    schema = pq.read_table(out / "eval").schema
    assert schema.field("prediction").type == pa.list_(pa.string())
    assert schema.field("score").type == pa.list_(pa.float32())
    # The same sigmoid scores as pipeline(top_k=None); the labels at or above the threshold, best first.
    ref = _pipeline(result.model_dir)(df.text.tolist(), top_k=None, truncation=True)
    for labels, scores, r in zip(df.prediction, df.score, ref, strict=True):
        want = [(x["label"], x["score"]) for x in r if x["score"] >= 0.1]
        assert list(labels) == [w[0] for w in want]
        assert np.allclose(scores, [w[1] for w in want], atol=1e-5)
    metrics = json.loads((out / "eval" / "_metrics.json").read_text())
    assert metrics["threshold"] == 0.1 and summary["metrics"]["threshold"] == 0.1
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    mlb = MultiLabelBinarizer(classes=sorted(known))
    truth, pred = mlb.fit_transform(df.labels), mlb.transform(df.prediction)
    assert metrics["f1_micro"] == pytest.approx(f1_score(truth, pred, average="micro", zero_division=0))
    assert (out / "eval" / "_label_f1.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides", [["checkpoint.metric=accuracy"],  # problem_type: regression in the YAML
                                       ["model.problem_type=auto", "checkpoint.metric=accuracy"]])  # read from data
def test_a_metric_of_another_problem_type_exits_2_before_ray(tmp_path, overrides, capsys):
    out = tmp_path / "out"
    status = main("", RunConfig, "bertray.train:run",
                  ["--config", str(ROOT / "configs" / "stsb.yaml"), f"output_dir={out}", *overrides])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "checkpoint.metric='accuracy'" in err and "'pearson'" in err and "'mse'" in err
    assert not out.exists()


def test_labels_that_do_not_fit_the_problem_type_exit_1_naming_file_column_and_count(ray_session, data_root,
                                                                                     tmp_path, capsys):
    df = pd.read_parquet(data_root / "stsb" / "train.parquet").head(200)
    df.loc[df.index[[3, 7, 11]], "score"] = np.nan
    path = tmp_path / "scores.parquet"
    df.to_parquet(path)
    out = tmp_path / "out"
    status = main("", RunConfig, "bertray.train:run",
                  ["--config", str(ROOT / "configs" / "stsb.yaml"), f"data.train={path}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert f"{path}: 3 row(s) with null label in column 'score'" in err and "data.drop_bad_rows=true" in err
    assert not (out / "model").exists()


# ----------------------------------------------------------------------------- resume and Tune


def test_multilabel_resume_after_a_worker_is_killed(ray_session, tmp_path):
    """The resume path is the loop's for every type; multi-label also carries its threshold."""
    from conftest import kill_a_worker_after_the_first_checkpoint

    out = tmp_path / "run"
    killed, killer = kill_a_worker_after_the_first_checkpoint(out / "ray" / "run")
    # the first 48 validation rows hold only labels the first 192 training rows have
    result = _train("goemotions", out, "train.epochs=3", "data.max_train_rows=192", "data.max_validation_rows=48")
    killer.join()
    assert killed, "the worker was never killed"
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.history[-1]["restores"] >= 1
    assert all("f1_micro" in r and "threshold" in r for r in result.history)
    assert _config(result.model_dir)["threshold"] == result.metrics["threshold"]


@pytest.mark.slow
def test_tune_ranks_trials_by_a_regression_metric(ray_session, tmp_path):
    from bertray.tune import run

    space = '{"train.lr": {"grid": [3.0e-4, 1.0e-9]}}'
    cfg = load_config(ROOT / "configs" / "stsb.yaml",
                      [*SMOKE, f"output_dir={tmp_path / 'tune'}", "checkpoint.metric=spearman", "train.warmup_ratio=0",
                       f"tune.space={space}", "tune.num_samples=1", "checkpoint.num_to_keep=1"], RunConfig)
    table = run(cfg)
    assert list(table.columns)[-3:] == ["best_spearman", "epochs_run", "status"]
    assert table["best_spearman"].is_monotonic_decreasing  # max mode: best first
    best = json.loads((tmp_path / "tune" / "best_metrics.json").read_text())
    assert {"spearman", "pearson", "mse"} <= set(best) and "accuracy" not in best

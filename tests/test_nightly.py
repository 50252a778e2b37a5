"""Nightly operations with the real model trained by the `trained` fixture: calibrated scores
(temperature folded into the head), the run report with PSI and its exit status 3, and the
previous night's report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from bertray import calibration
from bertray.cli import ALERT_EXIT_STATUS, main
from bertray.config import PredictConfig
from bertray.report import REPORT_FILE, REPORT_PNG, TRAINING_FILE

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ROOT / "configs" / "predict.yaml"
MAX_LENGTH = 64  # the smoke model's train.max_length


@pytest.fixture(scope="module")
def model(trained):
    cfg, result = trained
    return cfg, result, Path(result.model_dir)


@pytest.fixture(scope="module")
def trec(data_root) -> pd.DataFrame:
    return pd.read_parquet(data_root / "trec" / "test.parquet")


def _logits(model_dir, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    clf = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    with torch.inference_mode():
        return clf(**tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")).logits


def test_training_folds_the_temperature_into_the_head_and_keeps_every_decision(model, trec):
    _, result, model_dir = model
    metrics = json.loads((model_dir.parent / "metrics.json").read_text())
    t = metrics["temperature"]
    assert t > 0 and t != 1.0
    assert metrics["nll"] <= metrics["nll_before"]
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_before"] <= 1
    assert (model_dir.parent / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((model_dir / "config.json").read_text())["calibration_temperature"] == pytest.approx(t)
    texts = trec.text.head(64).tolist()
    raw, folded = _logits(result.checkpoint_path, texts), _logits(model_dir, texts)  # the checkpoint is unfolded
    assert torch.equal(raw.argmax(-1), folded.argmax(-1))
    torch.testing.assert_close(folded.softmax(-1), (raw / t).softmax(-1), atol=1e-5, rtol=1e-4)


def test_the_temperature_lowers_calibration_error_on_the_validation_rows(model, trec):
    cfg, result, model_dir = model
    rows = trec.head(cfg.data.max_validation_rows)  # the smoke run's validation rows
    label2id = json.loads((model_dir / "config.json").read_text())["label2id"]
    labels = torch.tensor([label2id[v] for v in rows.label])
    raw, folded = _logits(result.checkpoint_path, rows.text.tolist()), _logits(model_dir, rows.text.tolist())
    before = calibration.ece(calibration.reliability(*calibration.events(raw, labels, False)))
    after = calibration.ece(calibration.reliability(*calibration.events(folded, labels, False)))
    assert after < before
    assert calibration.nll(folded, labels, False) < calibration.nll(raw, labels, False)


def test_training_saves_its_label_distribution_with_the_model(model, data_root):
    cfg, _, model_dir = model
    saved = json.loads((model_dir / TRAINING_FILE).read_text())
    train = pd.read_parquet(data_root / "trec" / "train.parquet").head(cfg.data.max_train_rows)
    want = train.label.value_counts(normalize=True).to_dict()
    assert saved["rows"] == len(train)
    assert saved["shares"] == pytest.approx(want)


def _predict(model_dir, inp, out, *overrides) -> int:
    return main("predict", PredictConfig, "bertray.predict:run",
                ["--config", str(PREDICT), f"model.path={model_dir}", f"input={inp}", f"output={out}",
                 f"max_length={MAX_LENGTH}", *overrides])


def test_a_one_class_night_is_committed_reported_and_exits_3(model, trec, data_root, tmp_path, capsys):
    _, _, model_dir = model
    mixed, one_class = tmp_path / "mixed.parquet", tmp_path / "one.parquet"
    # training rows the model did not train on: the training distribution, near enough
    pd.read_parquet(data_root / "trec" / "train.parquet").iloc[1000:1400].to_parquet(mixed)
    trec[trec.label == "HUM"].head(64).to_parquet(one_class)
    assert _predict(model_dir, mixed, tmp_path / "ok", "report.max_psi=0.25") == 0
    ok = json.loads((tmp_path / "ok" / REPORT_FILE).read_text())
    assert ok["psi"]["training"] < 0.25 and ok["alerts"] == []

    assert _predict(model_dir, one_class, tmp_path / "drift", "report.max_psi=0.25") == ALERT_EXIT_STATUS
    out = tmp_path / "drift"
    assert (out / "_SUCCESS").exists() and pq.read_table(out).num_rows == 64  # committed all the same
    rep = json.loads((out / REPORT_FILE).read_text())
    assert rep["psi"]["training"] > 0.25 and rep["rows"] == 64
    assert rep["distribution"].get("HUM", 0) > 0.5
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "_SUCCESS").read_text())["alerts"] == rep["alerts"]
    err = capsys.readouterr().err
    assert "report.max_psi=0.25" in err and f"{rep['psi']['training']:.3f}" in err
    # the counts behind the report are the written predictions'
    written = pq.read_table(out).to_pandas()
    assert rep["distribution"] == pytest.approx(written.prediction.value_counts(normalize=True).to_dict())
    assert rep["mean_score"] == pytest.approx(written.score.mean(), rel=1e-5)


def test_the_previous_night_is_compared_and_a_missing_one_is_a_note(model, trec, tmp_path, capsys):
    _, _, model_dir = model
    inp = tmp_path / "in.parquet"
    trec.head(64).to_parquet(inp)
    nights = tmp_path / "preds"
    template = f"report.previous={nights}/dt={{yesterday}}"
    assert _predict(model_dir, inp, f"{nights}/dt={{date}}", "date=2024-03-01", template) == 0
    first = json.loads((nights / "dt=2024-03-01" / REPORT_FILE).read_text())
    assert first["psi"]["previous"] is None and "no previous report" in " ".join(first["notes"])
    assert _predict(model_dir, inp, f"{nights}/dt={{date}}", "date=2024-03-02", template) == 0
    second = json.loads((nights / "dt=2024-03-02" / REPORT_FILE).read_text())
    assert second["psi"]["previous"] == pytest.approx(0.0, abs=1e-9)  # the same rows, the same model
    assert "report:" in capsys.readouterr().out


def test_an_unreadable_previous_report_fails_before_any_work(model, trec, tmp_path, capsys):
    _, _, model_dir = model
    inp = tmp_path / "in.parquet"
    trec.head(8).to_parquet(inp)
    bad = tmp_path / "yesterday"
    bad.mkdir()
    (bad / REPORT_FILE).write_text("{truncated")
    assert _predict(model_dir, inp, tmp_path / "out", f"report.previous={bad}") == 1
    assert "report.previous" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_evaluate_reports_the_calibration_error_of_the_written_scores(model, trec, tmp_path):
    from bertray.config_loader import load_config
    from bertray.predict import evaluate

    _, _, model_dir = model
    inp = tmp_path / "test.parquet"
    trec.head(128).to_parquet(inp)
    cfg = load_config(PREDICT, [f"model.path={model_dir}", f"input={inp}", f"output={tmp_path / 'eval'}",
                                f"max_length={MAX_LENGTH}", "label_column=label"], PredictConfig)
    summary = evaluate(cfg)
    df = pq.read_table(tmp_path / "eval").to_pandas()
    want = calibration.ece(calibration.reliability(df.score.to_numpy(), (df.prediction == df.label).to_numpy()))
    assert summary["metrics"]["ece"] == pytest.approx(want, rel=1e-6)
    assert np.isfinite(summary["metrics"]["ece"])

"""Temperature scaling (bertray.calibration) without Ray: the fit, ECE against scikit-learn,
the multi-label threshold mapping, and folding into a real MiniLM head saved and reloaded
with transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bertray import calibration as C
from bertray import problem as P
from bertray.modeling import load_classifier, load_tokenizer

TEXTS = ["a fine film", "dull and far too long", "not bad at all", "I would not watch it again", "great cast"]


def _sharpened(rows: int, classes: int, factor: float, multi: bool, seed: int = 0):
    """Labels drawn from the probabilities of ``z``, returned with logits ``z * factor``:
    a model over-confident by exactly ``factor``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2
    if multi:
        labels = (torch.rand(rows, classes, generator=g, dtype=torch.float64) < torch.sigmoid(z)).double()
    else:
        labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z * factor, labels


@pytest.mark.parametrize("multi", [False, True])
def test_the_fitted_temperature_undoes_a_known_overconfidence_and_lowers_nll_and_ece(multi):
    logits, labels = _sharpened(20_000, 4, 2.5, multi)
    found = C.calibrate(logits, labels, multi)
    assert found["temperature"] == pytest.approx(2.5, rel=0.05)
    assert found["nll"] < found["nll_before"]
    assert found["ece"] < found["ece_before"] and found["ece"] < 0.02 < found["ece_before"]


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = _sharpened(20_000, 3, 1.0, False, seed=1)
    assert C.fit_temperature(logits, labels, False) == pytest.approx(1.0, rel=0.05)


def test_ece_and_bins_agree_with_scikit_learn():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    p = rng.uniform(size=5_000)
    y = rng.uniform(size=5_000) < p ** 1.5
    table = C.reliability(p, y)
    counts = np.asarray(table["count"])
    frequency, mean_p = calibration_curve(y, p, n_bins=C.BINS, strategy="uniform")
    assert np.allclose(np.asarray(table["accuracy"])[counts > 0], frequency)
    assert np.allclose(np.asarray(table["confidence"])[counts > 0], mean_p)
    want = np.sum(counts[counts > 0] / len(p) * np.abs(frequency - mean_p))
    assert C.ece(table) == pytest.approx(want)
    # bin sums of batches add up to the table of the whole
    halves = C.bin_sums(p[:2_000], y[:2_000]) + C.bin_sums(p[2_000:], y[2_000:])
    for key, whole in table.items():
        assert np.allclose(C.table(halves)[key], whole)


def test_the_scaled_threshold_selects_exactly_the_same_labels():
    z = torch.linspace(-8, 8, 10_001, dtype=torch.float64)
    for t in (0.05, 0.3, 0.5, 0.85):
        for temperature in (0.4, 1.7, 6.0):
            before = torch.sigmoid(z) >= t
            after = torch.sigmoid(z / temperature) >= C.scaled_threshold(t, temperature)
            assert int((before != after).sum()) <= 1  # at most the grid point on the boundary itself


def test_no_temperature_to_export_when_off_missing_or_not_finite():
    assert C.export_temperature({"temperature": 1.7}, True) == 1.7
    assert C.export_temperature({"temperature": 1.7}, False) is None
    assert C.export_temperature({}, True) is None
    assert C.export_temperature({"temperature": float("nan")}, True) is None


def _logits(model_dir, texts=TEXTS) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    batch = load_tokenizer("default")(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.double()


@pytest.mark.parametrize("problem_type", [P.SINGLE, P.MULTI])
def test_folding_into_a_real_head_divides_every_logit_and_keeps_the_decisions(tmp_path, problem_type):
    labels = {"anger": 0, "joy": 1, "neutral": 2}
    problem = P.make(problem_type, labels, threshold=0.4)
    torch.manual_seed(0)
    model = load_classifier("default", num_hidden_layers=2, problem=problem)
    with torch.no_grad():  # a confident head, so the temperature has something to change
        C.classifier_head(model).weight.mul_(40)
    model.save_pretrained(tmp_path, safe_serialization=True)
    before = _logits(tmp_path)
    C.fold_temperature(tmp_path, 2.5)
    after = _logits(tmp_path)
    torch.testing.assert_close(after, before / 2.5, atol=1e-5, rtol=1e-4)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["calibration_temperature"] == 2.5
    if problem_type == P.MULTI:
        assert config["threshold"] == pytest.approx(C.scaled_threshold(0.4, 2.5))
        assert torch.equal(torch.sigmoid(after) >= config["threshold"], torch.sigmoid(before) >= 0.4)
    else:
        assert "threshold" not in config
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]


def test_the_head_is_found_in_other_architectures():
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=5)
    model = AutoModelForSequenceClassification.from_config(cfg)
    assert C.classifier_head(model) is model.classifier.out_proj  # not the dense layer before it

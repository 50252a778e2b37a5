"""ONNX export (jobs/export.py), its exactness record, and predict's choice of backend.

Unit tier: no Ray. The round trip exports the real MiniLM with a seeded 2-label head and scores
real SST-2 rows with torch and ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import export
from bertray.cli import main
from bertray.config import ConfigError, ExportConfig, PredictConfig
from bertray.config_loader import load_config
from bertray.errors import BertrayError
from bertray.export import BUDGET, FP32, INT8, TORCH_BF16, TORCH_FP32, ExportError, Measured, choose
from bertray.predict.preflight import check_model
from bertray.scoring import Backend, OnnxRunner, Scorer, TorchRunner

ROOT = Path(__file__).resolve().parents[1]
ROWS = 96


# ----------------------------------------------------------------------------- choosing (records only)


def record(int8_agreement=0.999, int8_metric=0.90, digest="abc", bf16=True) -> dict:
    ways = [Measured(TORCH_FP32, 400, 1.0, 0.0, 0.90), Measured(FP32, 450, 1.0, 1e-6, 0.90),
            Measured(INT8, 1200, int8_agreement, 0.05, int8_metric)]
    if bf16:
        ways.insert(1, Measured(TORCH_BF16, 800, 0.999, 0.01, 0.90))
    return {"source_sha256": digest, "cpu": export.cpu_name(), "check": {"rows": 4096},
            "variants": [m.to_dict() for m in ways]}


@pytest.fixture
def folder(tmp_path) -> str:
    """A model folder holding the files the records below list (contents unused by ``choose``)."""
    for way in (FP32, INT8):
        (tmp_path / way.file).parent.mkdir(exist_ok=True)
        (tmp_path / way.file).write_bytes(b"")
    return str(tmp_path)


@pytest.mark.parametrize("requested, amp, rec, expected", [
    ("auto", "bf16", record(), INT8),                                  # fastest within the budget
    ("auto", "bf16", record(int8_agreement=0.99), TORCH_BF16),         # int8 changes 1% of labels
    ("auto", "bf16", record(int8_metric=0.895), TORCH_BF16),           # int8 loses 0.5 points
    ("auto", "fp32", record(), FP32),                                  # amp=fp32: exact ways only
    ("auto", "fp32", record(bf16=False), FP32),
    ("onnx", "bf16", record(int8_agreement=0.99), FP32),               # onnx: the fastest ONNX way that meets it
    ("torch", "bf16", record(), TORCH_BF16),
    ("auto", "bf16", None, TORCH_BF16),                                # never exported
    ("auto", "bf16", record(digest="other"), TORCH_BF16),              # exported from other weights
])
def test_choose_picks_the_fastest_way_within_the_budget(requested, amp, rec, expected, folder):
    choice = choose(requested, amp, False, folder, rec, "abc")
    assert choice.backend == expected
    if rec is None or rec["source_sha256"] != "abc":
        assert "jobs/export.py" in choice.reason
    elif requested != "torch":
        assert choice.measured.agreement >= BUDGET.min_agreement and "held-out rows" in choice.reason


def test_choose_for_a_lower_is_better_metric_and_on_gpu(folder):
    rec = record(int8_metric=0.904)  # mse up by 0.004: over the budget when lower is better
    assert choose("auto", "bf16", False, folder, rec, "abc", mode="min").backend == TORCH_BF16
    assert choose("auto", "bf16", False, folder, rec, "abc", mode="max").backend == INT8
    assert choose("auto", "auto", True, folder, rec, "abc").backend == Backend("torch", "auto")


def test_a_listed_onnx_file_that_is_gone_fails_before_any_work(folder):
    Path(folder, INT8.file).unlink()
    with pytest.raises(ExportError, match="model_quantized.onnx is missing but onnx/export.json lists it"):
        choose("auto", "bf16", False, folder, record(), "abc")


@pytest.mark.parametrize("rec, error, message", [
    (None, ExportError, "has no ONNX export"),
    (record(digest="other"), ExportError, "made from other weights"),
])
def test_backend_onnx_without_a_matching_export_fails(rec, error, message):
    with pytest.raises(error, match=message) as e:
        choose("onnx", "bf16", False, "/m", rec, "abc")
    assert "python jobs/export.py --config configs/export.yaml model.path=/m" in str(e.value)


def test_backend_onnx_on_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="backend=onnx runs on CPU"):
        choose("onnx", "auto", True, "/m", record(), "abc")


def test_same_prediction_follows_the_problem_type():
    from bertray.problem import MULTI, REGRESSION, SINGLE, make

    single = make(SINGLE, {"a": 0, "b": 1})
    assert export.same_prediction(single, np.array([[2.0, 1.0], [0.0, 0.1]]),
                                  np.array([[1.5, 1.0], [0.2, 0.1]])).tolist() == [True, False]
    multi = make(MULTI, {"a": 0, "b": 1}, threshold=0.5)  # probabilities; 0.5 itself is a label
    assert export.same_prediction(multi, np.array([[0.7, 0.3], [0.5, 0.1]]),
                                  np.array([[0.6, 0.4], [0.49, 0.1]])).tolist() == [True, False]
    reg = make(REGRESSION)  # within 1% of the reference's range (0..5 here: 0.05)
    assert export.same_prediction(reg, np.array([[0.0], [5.0], [2.0]]),
                                  np.array([[0.04], [5.0], [2.1]])).tolist() == [True, True, False]


# ----------------------------------------------------------------------------- the real export


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """The shipped MiniLM with a seeded 2-label head, saved as jobs/train.py saves a model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bertray.modeling import resolve_model_path

    base = resolve_model_path("default")
    out = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, use_safetensors=True)
    model.config.id2label, model.config.label2id = {0: "0", 1: "1"}, {"0": 0, "1": 1}  # SST-2 labels, as training names them
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(base)
    tok.model_max_length = 64
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, data_root) -> Path:
    table = pq.read_table(data_root / "sst2" / "validation.parquet").slice(0, ROWS)
    path = tmp_path_factory.mktemp("held_out") / "validation.parquet"
    pq.write_table(table, path)
    return path


def export_config(model: Path, inp: Path, *overrides: str) -> ExportConfig:
    return load_config(ROOT / "configs" / "export.yaml",
                       [f"model.path={model}", f"input={inp}", "check_rows=64", "batch_size=16", *overrides],
                       ExportConfig)


@pytest.fixture(scope="module")
def exported(classifier, held_out) -> dict:
    return export.run(export_config(classifier, held_out))


def test_export_writes_both_graphs_and_a_record_of_each_way(exported, classifier):
    onnx_dir = classifier / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["export.json", "model.onnx", "model_quantized.onnx"]
    assert json.loads((onnx_dir / "export.json").read_text()) == exported
    assert exported["source_sha256"] == export.weights_digest(str(classifier))
    assert exported["fused_operators"].get("Attention") == 6  # ONNX Runtime fused every layer's attention
    ways = {(v["name"], v["dtype"]): v for v in exported["variants"]}
    assert {("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")} <= set(ways)
    assert exported["check"] == {"input": exported["check"]["input"], "rows": 64, "label_column": "label",
                                 "metric": "accuracy", "batch_size": 16}
    fp32 = ways["onnx", "fp32"]
    assert fp32["agreement"] == 1.0 and fp32["max_score_diff"] < 1e-4 and fp32["meets_budget"]
    assert fp32["metric"] == ways["torch", "fp32"]["metric"]
    assert all(v["rows_per_s"] > 0 for v in ways.values())
    assert not list(classifier.glob(".onnx.*"))  # the staging folder is gone


def test_onnx_scores_real_rows_like_torch(exported, classifier, held_out):
    """Independently of the record: the fp32 graph gives torch's labels and scores on real rows."""
    from transformers import AutoTokenizer

    from bertray.tokenization import token_columns

    texts = pq.read_table(held_out).column("text").to_pylist()
    tokens = pa.table(token_columns(AutoTokenizer.from_pretrained(classifier), texts, 64))
    torch_logits = Scorer(TorchRunner(str(classifier), "fp32", 2), 16, 0).logits(tokens)
    onnx_logits = Scorer(OnnxRunner(str(classifier / FP32.file), 2), 7, 0).logits(tokens)  # other batches too
    int8_logits = Scorer(OnnxRunner(str(classifier / INT8.file), 2), 16, 0).logits(tokens)
    assert torch_logits.shape == onnx_logits.shape == int8_logits.shape == (ROWS, 2)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    assert np.abs(int8_logits - torch_logits).max() < 0.5  # quantized: close, not equal


def test_predict_preflight_reads_the_record_and_notices_other_weights(exported, classifier, held_out, tmp_path):
    def model(*overrides):
        cfg = load_config(ROOT / "configs" / "predict.yaml", [f"model.path={classifier}", f"input={held_out}",
                                                              f"output={tmp_path}/out", *overrides], PredictConfig)
        return check_model(cfg)

    exact = model("amp=fp32", "backend=onnx").backend
    assert exact.backend == FP32 and exact.measured.agreement == 1.0
    assert model("backend=torch").backend.backend.name == "torch"
    record_file = classifier / export.RECORD_FILE
    saved = record_file.read_text()
    try:
        record_file.write_text(saved.replace(exported["source_sha256"], "0" * 64))
        with pytest.raises(ExportError, match="made from other weights"):
            model("backend=onnx")
        assert model("backend=auto").backend.backend.name == "torch"
        record_file.write_text("{not json")
        with pytest.raises(ExportError, match="export.json is unreadable"):
            model("backend=auto")
    finally:
        record_file.write_text(saved)


def test_a_missing_or_damaged_onnx_file_fails_naming_it(exported, classifier, tmp_path):
    with pytest.raises(BertrayError, match="does not exist; write it with python jobs/export.py"):
        OnnxRunner(str(tmp_path / "model.onnx"), 1)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes((classifier / FP32.file).read_bytes()[:4096])
    with pytest.raises(BertrayError, match=f"ONNX model {damaged} cannot be loaded"):
        OnnxRunner(str(damaged), 1)


def test_export_refuses_bad_inputs_before_writing(classifier, held_out, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(classifier, bare, ignore=shutil.ignore_patterns("onnx"))
    status = main(__doc__, ExportConfig, "bertray.export:run",
                  ["--config", str(ROOT / "configs" / "export.yaml"), f"model.path={bare}", f"input={held_out}",
                   "label_column=sentiment"])
    assert status == 1
    assert "sentiment" in capsys.readouterr().err
    with pytest.raises(ExportError, match="give one Parquet, CSV or JSONL file"):
        export.run(export_config(bare, tmp_path / "nothing.parquet"))
    with pytest.raises(ExportError, match="holds no model.safetensors"):
        export.run(export_config(tmp_path, held_out))
    assert not (bare / "onnx").exists() and not list(bare.glob(".onnx*"))

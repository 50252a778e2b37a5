"""The training job end to end on a real local Ray cluster, real MiniLM (2 layers), real TREC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, RayCluster, kill_a_worker_after_the_first_checkpoint, smoke_config
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def test_ddp_run_learns(trained):
    cfg, result = trained
    epochs = [r["epoch"] for r in result.history]
    assert epochs == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # 6 classes; the most frequent class of these 128 rows is ~0.25
    assert max(r["accuracy"] for r in result.history) > 0.5
    assert result.metrics["accuracy"] == max(r["accuracy"] for r in result.history)
    assert set(result.metrics) >= {"accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                                   "per_class", "confusion_matrix", "epoch"}
    assert (Path(cfg.output_dir) / "tensorboard").is_dir()
    assert any(p.name.startswith("events.out.tfevents") for p in (Path(cfg.output_dir) / "tensorboard").iterdir())


def test_checkpoints_hf_format_and_best_k(trained):
    cfg, result = trained
    ckpts = sorted(p for p in (Path(cfg.storage_path) / cfg.name).glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == cfg.checkpoint.num_to_keep == 2  # 3 epochs, best 2 kept
    kept_epochs = sorted(json.loads((c / "trainer_state.json").read_text())["epoch"] for c in ckpts)
    by_acc = sorted(result.history, key=lambda r: (-r["accuracy"], -r["epoch"]))
    assert by_acc[0]["epoch"] in kept_epochs
    for c in ckpts:
        names = {p.name for p in c.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                "trainer_state.json"} <= names
        assert not names & {"pytorch_model.bin", "model.pt"}
        config = json.loads((c / "config.json").read_text())
        assert config["id2label"] == {str(i): n for i, n in enumerate(TREC_LABELS)}
        torch.load(c / "optimizer.pt", weights_only=True)  # loads without unpickling code
    exported = {p.name for p in Path(result.model_dir).iterdir()}
    assert "model.safetensors" in exported and "optimizer.pt" not in exported


def test_exported_model_loads_in_pipeline_with_label_names(trained):
    _, result = trained
    clf = pipeline("text-classification", model=result.model_dir, device="cpu")
    out = clf(["Who wrote Hamlet?", "How far is the moon?"])
    assert all(o["label"] in TREC_LABELS for o in out)


def test_metrics_equal_sklearn_on_the_same_predictions(trained, data_root):
    cfg, result = trained
    val = pd.read_parquet(data_root / "trec" / "test.parquet").head(cfg.data.max_validation_rows)
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    preds = []
    with torch.inference_mode():
        for text in val["text"]:  # one row at a time: no padding at all
            enc = tok(text, truncation=True, max_length=cfg.train.max_length, return_tensors="pt")
            preds.append(int(model(**enc).logits.argmax(-1)))
    y = val["label"].map(model.config.label2id).to_numpy()
    m = result.metrics
    assert m["accuracy"] == pytest.approx(accuracy_score(y, preds), abs=1e-9)
    labels = list(range(len(TREC_LABELS)))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, preds, average=avg, labels=labels, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((p, r, f), abs=1e-9)
    assert np.array_equal(np.array(m["confusion_matrix"]), sk_confusion(y, preds, labels=labels))


def test_resume_after_a_worker_is_killed(ray_session, tmp_path):

    from bertray.train import run

    cfg = smoke_config(tmp_path / "run", "data.max_train_rows=384")
    killed, killer = kill_a_worker_after_the_first_checkpoint(Path(cfg.storage_path) / cfg.name)
    result = run(cfg)
    killer.join()
    assert killed, "the worker was never killed"
    history = result.history
    assert [r["epoch"] for r in history] == [1, 2, 3]  # each epoch trained once: no restart from 0
    assert history[-1]["restores"] >= 1
    resumed = [r for r in history if r["resumed_at_epoch"] is not None]
    assert resumed and min(r["resumed_at_epoch"] for r in resumed) >= 1
    assert (Path(result.model_dir) / "model.safetensors").exists()


def test_early_stopping(ray_session, tmp_path):
    from bertray.train import run

    # a learning rate this small cannot improve accuracy, so patience 1 stops after epoch 2
    cfg = smoke_config(tmp_path / "es", "train.lr=1e-12", "train.epochs=5", "train.early_stopping_patience=1",
                       "data.max_train_rows=64", "train.warmup_ratio=0")
    result = run(cfg)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_bad_input_exits_non_zero_and_writes_nothing(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "BERTRAY_DATA_ROOT": str(tmp_path / "nowhere")}
    out = tmp_path / "bad"
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/smoke.yaml", f"output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no data files found at" in proc.stderr and "nowhere/trec/train.parquet" in proc.stderr
    assert not (out / "model").exists()


def test_wrong_column_is_a_clear_error(ray_session, tmp_path):
    from bertray.data import DataError
    from bertray.train import run

    cfg = smoke_config(tmp_path / "wc", "data.label_column=fine")
    with pytest.raises(DataError, match=r"column 'fine' \(from data.label_column\) not found; columns in the data: "):
        run(cfg)
    assert not (tmp_path / "wc" / "model").exists()


@pytest.mark.slow
def test_ray_job_submit_on_a_started_head(tmp_path):
    """`ray start --head` (token auth on), `ray job submit` the smoke config, the job writes the model.

    No data.root: ``{data_root}`` resolves inside the copy of the repository that Ray unpacks for the job."""
    out = tmp_path / "job"
    with RayCluster(port=6479, dashboard_port=8366) as cluster:
        proc = cluster.submit("jobs/train.py", "--config", "configs/smoke.yaml", f"output_dir={out}",
                              "train.epochs=1", "data.max_train_rows=128")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower()
    assert (out / "model" / "model.safetensors").exists() and (out / "metrics.json").exists()

"""ASHA search on a real data subset; the best config reproduces with the training job."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import smoke_config

from bertray.config import RunConfig
from bertray.config_loader import load_config


@pytest.mark.slow
def test_asha_stops_the_bad_trial_and_exports_the_best(ray_session, tmp_path):
    from bertray.train import run as train
    from bertray.tune import run

    space = '{"train.lr": {"grid": [1.0e-3, 1.0e-9, 1.0e-9]}}'  # two deliberately useless learning rates
    cfg = smoke_config(tmp_path / "tune", "data.max_train_rows=256", "train.epochs=3", "train.warmup_ratio=0",
                       "checkpoint.metric=loss", "checkpoint.num_to_keep=1", f"tune.space={space}",
                       "tune.num_samples=1", "tune.grace_period=1", "tune.reduction_factor=2")
    table = run(cfg)
    out = Path(cfg.output_dir)
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 3 and set(results.columns) >= {"trial", "train.lr", "best_loss", "epochs_run", "status"}
    assert results.iloc[0]["train.lr"] == pytest.approx(1e-3)  # best first
    assert results.iloc[0]["status"] == "completed" and results.iloc[0]["epochs_run"] == 3
    stopped = results[results["status"] == "stopped_early"]
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 3).all()
    assert (stopped["train.lr"] == 1e-9).all()
    assert list(table["trial"]) == list(results["trial"])
    assert (out / "tune_curves.png").stat().st_size > 0
    assert json.loads((Path(cfg.storage_path) / f"{cfg.name}-tune" / "bertray_run.json").read_text())["status"] == "finished"
    assert (out / "best_model" / "model.safetensors").exists()
    assert json.loads((out / "best_metrics.json").read_text())["overrides"]["train.lr"] == pytest.approx(1e-3)

    best = load_config(out / "best_config.yaml", [f"output_dir={tmp_path / 'repro'}", "train.epochs=1"], RunConfig)
    assert best.train.lr == pytest.approx(1e-3) and not best.tune.space
    assert best.data.max_train_rows == 256
    result = train(best)
    assert (Path(result.model_dir) / "model.safetensors").exists()

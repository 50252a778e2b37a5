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
                       "tune.num_samples=1", "tune.grace_period=1", "tune.reduction_factor=2",
                       f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}")
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

    _check_mlflow(cfg)

    best = load_config(out / "best_config.yaml", [f"output_dir={tmp_path / 'repro'}", "train.epochs=1"], RunConfig)
    assert best.train.lr == pytest.approx(1e-3) and not best.tune.space
    assert best.data.max_train_rows == 256
    result = train(best)
    assert (Path(result.model_dir) / "model.safetensors").exists()


def _check_mlflow(cfg):
    """One MLflow run for the search, a child per trial named by its values, the best tagged."""
    from bertray import tracking

    client = tracking.Tracker.connect(cfg.tracking.mlflow_uri).client
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 3 and len(runs) == 4
    assert parents[0].info.status == "FINISHED"
    assert "model" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    best = [r for r in children if r.data.tags.get(tracking.BEST_TRIAL_TAG) == "true"]
    assert len(best) == 1 and float(best[0].data.params["train.lr"]) == pytest.approx(1e-3)
    assert best[0].info.run_name.startswith("lr=0.001")
    assert all(client.get_metric_history(r.info.run_id, "eval_loss") for r in children)
    assert {r.info.status for r in children} == {"FINISHED"}  # the ones ASHA stopped too

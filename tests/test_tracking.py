"""MLflow tracking and the model registry against real MLflow stores: a SQLite file, and a
real `mlflow server` over HTTP; real training runs and real predict jobs load models by alias."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import smoke_config

from bertray import tracking
from bertray.cli import main
from bertray.config import RunConfig, TrackingConfig
from bertray.config_loader import load_config, to_dict
from bertray.tracking import Tracker, TrackingError

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ROOT / "configs" / "predict.yaml"


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _model_folder(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    (path / "weights.txt").write_text("w")
    return path


def _logged_run(tracker: Tracker, tmp_path: Path, key: str, config: dict | None = None) -> tracking.Target:
    out = tmp_path / key
    model = _model_folder(out / "model", config)
    (out / "metrics.json").write_text('{"accuracy": 0.9}')
    target, created = tracker.start("exp", key, key, fresh=False)
    assert created
    tracker.finish(target, out, str(model), {"accuracy": 0.9, "per_class": {"a": 1}}, step=7)
    return target


# ----------------------------------------------------------------------------- unit: no Ray


def test_tracking_is_off_unless_configured(monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    assert not tracking.enabled(TrackingConfig())
    assert tracking.enabled(TrackingConfig(experiment="e"))
    monkeypatch.setenv(tracking.ENV_URI, "http://mlflow:5000")
    assert tracking.enabled(TrackingConfig())
    assert tracking.tracking_uri(None) == "http://mlflow:5000"
    assert tracking.tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_a_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"


def test_params_are_the_dotted_config():
    cfg = load_config(ROOT / "configs" / "tune_sst2.yaml", ["train.lr=3e-5"], RunConfig)
    params = tracking.flat_params(to_dict(cfg))
    assert params["train.lr"] == "3e-05" and params["data.text_column"] == "text"
    assert json.loads(params["tune.space"]) == cfg.tune.space  # one param, not one per distribution
    assert all(len(v) <= 500 for v in params.values())


def test_a_run_is_found_again_by_its_key_and_a_fresh_start_opens_a_new_one(store):
    tracker = Tracker.connect(store)
    first, created = tracker.start("exp", "/runs/a", "a", fresh=False)
    again, created_again = tracker.start("exp", "/runs/a", "a", fresh=False)
    other, _ = tracker.start("exp", "/runs/b", "b", fresh=False)
    fresh, created_fresh = tracker.start("exp", "/runs/a", "a", fresh=True)
    assert created and not created_again and again == first
    assert other != first and created_fresh and fresh != first
    assert tracker.find("exp", tracking.RUN_DIR_TAG, "/runs/a") == fresh  # the latest


def test_register_is_idempotent_and_an_alias_resolves_to_a_cached_copy(store, tmp_path):
    tracker = Tracker.connect(store)
    target = _logged_run(tracker, tmp_path, "r1", {"architectures": ["BertForSequenceClassification"]})
    version = tracker.register(target, "clf", {"accuracy": 0.9, "per_class": {"a": 1}})
    assert tracker.register(target, "clf", {"accuracy": 0.9}) == version == 1
    assert tracker.client.get_model_version("clf", "1").tags == {"accuracy": "0.9"}
    tracker.client.set_registered_model_alias("clf", "champion", "1")
    found = tracking.resolve_model("models:/clf@champion", store)
    assert (found.name, found.version, found.alias, found.run_id) == ("clf", 1, "champion", target.run_id)
    assert (Path(found.path) / "weights.txt").read_text() == "w"
    (Path(found.path) / "weights.txt").write_text("cached")  # a second resolve reads the cache
    assert (Path(tracking.resolve_model("models:/clf/1", store).path) / "weights.txt").read_text() == "cached"


def test_a_model_registered_again_under_an_old_version_number_is_not_served_from_the_cache(store, tmp_path):
    tracker = Tracker.connect(store)
    tracker.register(_logged_run(tracker, tmp_path, "r1", {}), "clf", {})
    first = tracking.resolve_model("models:/clf/1", store)
    tracker.client.delete_registered_model("clf")
    second_run = _logged_run(tracker, tmp_path, "r2", {})
    (tmp_path / "r2" / "model" / "weights.txt").write_text("w2")
    tracker.client.log_artifacts(second_run.run_id, str(tmp_path / "r2" / "model"), "model")
    assert tracker.register(second_run, "clf", {}) == 1
    second = tracking.resolve_model("models:/clf/1", store)
    assert second.run_id == second_run.run_id and second.path != first.path
    assert (Path(second.path) / "weights.txt").read_text() == "w2"


@pytest.mark.parametrize("uri, message", [
    ("models:/clf@prod", "has no alias @prod (aliases: @champion)"),
    ("models:/clf/9", "has no version 9"),
    ("models:/nope@champion", "no registered model 'nope'"),
    ("models:/clf", "write models:/<name>@<alias> or models:/<name>/<version>"),
])
def test_unknown_names_aliases_and_versions_name_the_uri_and_the_fix(store, tmp_path, uri, message):
    tracker = Tracker.connect(store)
    target = _logged_run(tracker, tmp_path, "r1", {})
    tracker.register(target, "clf", {})
    tracker.client.set_registered_model_alias("clf", "champion", "1")
    with pytest.raises(TrackingError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        tracking.resolve_model(uri, store)
    assert uri in str(e.value)


def test_a_registry_uri_without_a_store_fails_and_creates_none(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingError, match=f"no MLflow database at {tmp_path / 'mlflow.db'}"):
        tracking.resolve_model("models:/clf@champion", None)
    assert not list(tmp_path.iterdir())


def test_a_registered_folder_that_is_no_model_is_refused(store, tmp_path):
    tracker = Tracker.connect(store)
    tracker.register(_logged_run(tracker, tmp_path, "r1", None), "files", {})
    with pytest.raises(TrackingError, match="holds no Hugging Face model"):
        tracking.resolve_model("models:/files/1", store)
    assert not list((tmp_path / "cache").rglob("weights.txt"))  # nothing half-cached


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_fast_naming_the_uri():
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"cannot reach the MLflow tracking store {uri}"):
        Tracker.connect(uri)
    assert time.monotonic() - started < 60


# ----------------------------------------------------------------------------- jobs


def _predict_args(model: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(PREDICT), f"model.path={model}", f"input={data_root}/trec/test.parquet",
            f"output={out}", "max_length=64", *extra]


@pytest.mark.slow
def test_training_logs_every_evaluation_registers_and_predict_loads_by_alias(ray_session, data_root, store,
                                                                           tmp_path, capsys):
    from bertray.train import run

    cfg = smoke_config(tmp_path / "run", "data.max_train_rows=256", "train.epochs=2", f"tracking.mlflow_uri={store}",
                       "tracking.experiment=trec", "tracking.register_as=trec-clf")
    result = run(cfg)
    run(cfg)  # a rerun of the finished run continues its MLflow run and registers nothing new
    tracker = Tracker.connect(store)
    runs = tracker.client.search_runs([tracker.client.get_experiment_by_name("trec").experiment_id])
    assert len(runs) == 1
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["train.epochs"] == "2"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    evals = [h for h in history if "accuracy" in h]
    logged = tracker.client.get_metric_history(mlrun.info.run_id, "eval_accuracy")
    assert sorted({(m.step, round(m.value, 6)) for m in logged}) == [(h["global_step"], round(h["accuracy"], 6))
                                                                      for h in evals]
    assert mlrun.data.metrics["best_accuracy"] == pytest.approx(result.metrics["accuracy"])
    artifacts = {a.path for a in tracker.client.list_artifacts(mlrun.info.run_id)}
    assert {"metrics.json", "history.json", "reliability.png", "model"} <= artifacts
    versions = tracker.client.search_model_versions("name='trec-clf'")
    assert [v.version for v in versions] == [1] and versions[0].run_id == mlrun.info.run_id
    assert float(versions[0].tags["accuracy"]) == pytest.approx(result.metrics["accuracy"], abs=1e-5)

    tracker.client.set_registered_model_alias("trec-clf", "champion", "1")
    out = tmp_path / "pred"
    assert main("predict", _config_cls(), "bertray.predict:run",
                _predict_args("models:/trec-clf@champion", data_root, out, f"tracking.mlflow_uri={store}")) == 0
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["model_registry"] == {"uri": "models:/trec-clf@champion", "name": "trec-clf", "version": 1,
                                         "alias": "champion", "run_id": mlrun.info.run_id, "tracking_uri": store}
    assert json.loads((out / "_report.json").read_text())["model"]["registry"]["version"] == 1
    assert success["rows_out"] == len(pd.read_parquet(data_root / "trec" / "test.parquet"))

    capsys.readouterr()
    missing = tmp_path / "missing"
    assert main("predict", _config_cls(), "bertray.predict:run",
                _predict_args("models:/trec-clf@prod", data_root, missing, f"tracking.mlflow_uri={store}")) == 1
    assert "models:/trec-clf@prod" in capsys.readouterr().err and not missing.exists()


def _config_cls():
    from bertray.config import PredictConfig

    return PredictConfig


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start on {url}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_a_tracking_server_over_http_records_the_run_and_serves_the_model(trained, data_root, mlflow_server,
                                                                          tmp_path, monkeypatch):
    from bertray.train import run

    cfg, result = trained
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    # The fixture's finished run, exported again elsewhere: its MLflow run is created and filled over HTTP.
    tracked = dataclasses.replace(cfg, output_dir=str(tmp_path / "export"),
                                  tracking=TrackingConfig(mlflow_uri=mlflow_server, register_as="served"))
    run(tracked)
    tracker = Tracker.connect(mlflow_server)
    version = tracker.client.get_model_version("served", "1")
    assert version.source.startswith("mlflow-artifacts:")  # uploaded to the server, not a local path
    tracker.client.set_registered_model_alias("served", "champion", "1")

    monkeypatch.setenv(tracking.ENV_URI, mlflow_server)  # the standard variable instead of tracking.mlflow_uri
    out = tmp_path / "pred"
    assert main("predict", _config_cls(), "bertray.predict:run",
                _predict_args("models:/served@champion", data_root, out)) == 0
    assert json.loads((out / "_SUCCESS").read_text())["model_registry"]["tracking_uri"] == mlflow_server
    cached = Path(json.loads((out / "_SUCCESS").read_text())["model"])
    assert (cached / "model.safetensors").read_bytes() == (Path(result.model_dir) / "model.safetensors").read_bytes()

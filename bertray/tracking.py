"""MLflow experiment tracking and model registry (``pip install 'bertray[mlflow]'``).

Off unless configured: a ``tracking.*`` key or ``$MLFLOW_TRACKING_URI``. A training run is one
MLflow run, found again by its run directory (tag ``bertray.run_dir``), so a resumed or re-run
job continues it instead of starting a duplicate. The driver creates the run and logs the
config, the final metrics, files and the exported model; rank 0 of the workers logs every
evaluation (:class:`MetricLogger`). ``models:/<name>@<alias>`` and ``models:/<name>/<version>``
resolve through the registry to a cached download (:func:`resolve_model`).

Pure: no ``ray``; ``mlflow`` is imported only when tracking is on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertray.errors import BertrayError, Interrupted
from bertray.metrics import scalar_metrics

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
DEFAULT_URI = "sqlite:///mlflow.db"
"""MLflow's own default store: a SQLite file in the working directory (made absolute here)."""
RUN_DIR_TAG = "bertray.run_dir"
TRIAL_TAG = "bertray.trial_id"
BEST_TRIAL_TAG = "bertray.best_trial"
PARENT_TAG = "mlflow.parentRunId"
MODEL_ARTIFACT = "model"
REGISTRY_PREFIX = "models:/"
INSTALL = "pip install 'bertray[mlflow]'"
_PARAM_CHARS = 500
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class TrackingError(BertrayError):
    """MLflow is missing or unreachable, or a registry name, alias or version does not exist."""


@dataclass(frozen=True)
class Target:
    """Where a run's records go: picklable, so it travels to the training workers."""

    uri: str
    run_id: str

    def to_dict(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id}

    @classmethod
    def from_dict(cls, d: dict | None) -> Target | None:
        return cls(d["uri"], d["run_id"]) if d else None


# ----------------------------------------------------------------------------- connection


def enabled(tracking) -> bool:
    """A ``tracking.*`` key or ``$MLFLOW_TRACKING_URI`` is set."""
    keys = [getattr(tracking, k, None) for k in ("mlflow_uri", "experiment", "register_as")]
    return any(keys) or bool(os.environ.get(ENV_URI))


def tracking_uri(configured: str | None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a SQLite
    or file store given relative to the working directory is made absolute, so that the
    workers (and a ``ray job submit`` copy) write the same store."""
    uri = configured or os.environ.get(ENV_URI) or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri).expanduser().absolute().as_uri()  # a local folder: MLflow's file store
    return uri


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise TrackingError(f"tracking is configured (tracking.* or ${ENV_URI}) but MLflow is not installed: "
                            f"{INSTALL}, or unset them to run without tracking") from None
    return mlflow


@contextmanager
def _quick_failure():
    # MLflow retries an unreachable server for minutes by default; a check should fail in seconds.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] or "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = saved["MLFLOW_HTTP_REQUEST_TIMEOUT"] or "10"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class Tracker:
    """The driver's side: a checked ``MlflowClient`` and its store's URI."""

    client: Any
    uri: str

    @classmethod
    def connect(cls, configured: str | None) -> Tracker:
        """A client of :func:`tracking_uri` (tracking and registry), checked with one request.

        Raises:
            TrackingError: MLflow not installed, or the store unreachable: naming the URI and the fix.
        """
        mlflow = _mlflow()
        uri = tracking_uri(configured)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        with _quick_failure():
            try:
                client.search_experiments(max_results=1)
            except Exception as e:  # noqa: BLE001 - any failure here means: cannot use this store
                raise TrackingError(f"cannot reach the MLflow tracking store {uri} ({type(e).__name__}: "
                                    f"{_first_line(e)}); start the server or fix tracking.mlflow_uri / ${ENV_URI} "
                                    "(unset both and every tracking.* key to run without tracking)") from None
        return cls(client, uri)

    def start(self, experiment: str, key: str, run_name: str, fresh: bool, tags: dict[str, str] | None = None,
              tag: str = RUN_DIR_TAG) -> tuple[Target, bool]:
        """The latest MLflow run whose ``tag`` is ``key``, marked running again; a new one when
        there is none or ``fresh``. Returns (target, created)."""
        found = None if fresh else self.find(experiment, tag, key)
        if found is not None:
            self.client.update_run(found.run_id, status="RUNNING")
            return found, False
        run = self.client.create_run(self._experiment_id(experiment), run_name=run_name, tags={tag: key, **(tags or {})})
        return Target(self.uri, run.info.run_id), True

    def find(self, experiment: str, tag: str, key: str) -> Target | None:
        """The latest run of the experiment whose ``tag`` is ``key``."""
        runs = self.client.search_runs([self._experiment_id(experiment)], filter_string=f"tags.`{tag}` = '{_quote(key)}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return Target(self.uri, runs[0].info.run_id) if runs else None

    def children(self, experiment: str, parent: Target) -> dict[str, Any]:
        """``parent``'s child runs (MLflow ``Run``s) by their ``TRIAL_TAG``, in one query."""
        runs = self.client.search_runs([self._experiment_id(experiment)],
                                       filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'",
                                       max_results=50_000)  # MLflow's largest page
        return {run.data.tags.get(TRIAL_TAG): run for run in runs}

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise TrackingError(f"MLflow experiment {name!r} in {self.uri} is deleted; restore it (mlflow "
                                    f"experiments restore --experiment-id {found.experiment_id}) or set "
                                    "tracking.experiment to another name")
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
            location = Path(self.uri[len("sqlite:///"):]).parent.joinpath("mlruns").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception as e:  # noqa: BLE001 - created meanwhile by a concurrent job
            if _code(e) == "RESOURCE_ALREADY_EXISTS":
                return self.client.get_experiment_by_name(name).experiment_id
            raise

    def log_params(self, target: Target, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(target.run_id, params=items[i:i + 100])

    def finish(self, target: Target, out_dir: Path, model_dir: str, metrics: dict, step: int) -> None:
        """A finished run's best metrics (``best_*``), its JSON files and plots in ``out_dir``
        and the exported model (artifact ``model``); then FINISHED."""
        log_metrics(self.client, target, {f"best_{k}": v for k, v in scalar_metrics(metrics).items()}, step)
        for path in sorted(Path(out_dir).iterdir()):
            if path.is_file() and path.suffix in (".json", ".png", ".csv", ".yaml"):
                self.client.log_artifact(target.run_id, str(path))
        self.client.log_artifacts(target.run_id, model_dir, MODEL_ARTIFACT)
        self.client.set_terminated(target.run_id, "FINISHED")

    def end(self, target: Target, status: str) -> None:
        """Mark a run FAILED or KILLED; a failure to do so is only logged (the run's own error
        is the one to show)."""
        try:
            self.client.set_terminated(target.run_id, status)
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark MLflow run %s %s: %s", target.run_id, status, e)

    def register(self, target: Target, name: str, metrics: dict) -> int:
        """The run's ``model`` artifact as a version of registered model ``name``, with the
        validation metrics as tags; the version this run registered before, when there is one
        (a re-run registers nothing new)."""
        try:
            self.client.create_registered_model(name)
        except Exception as e:  # noqa: BLE001
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = self.client.search_model_versions(f"name='{_quote(name)}' and run_id='{target.run_id}'")
        if existing:
            return int(existing[0].version)
        source = f"{self.client.get_run(target.run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        tags = {k: f"{v:.6g}" for k, v in scalar_metrics(metrics).items()}
        return int(self.client.create_model_version(name, source, run_id=target.run_id, tags=tags).version)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _code(e: Exception) -> str | None:
    return getattr(e, "error_code", None)


# ----------------------------------------------------------------------------- runs


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (long ones cut)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "tune.space":
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_CHARS]
    return out


def log_metrics(client, target: Target, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(target.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


class MetricLogger:
    """Rank 0's evaluation metrics, each with its global step. A failed write is a warning:
    a tracking server that blips must not stop hours of training (the driver's final
    logging, which the run's record depends on, fails loudly instead)."""

    def __init__(self, target: Target):
        self.target = target
        self.client = None
        self.warned = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            if self.client is None:
                self.client = _mlflow().MlflowClient(tracking_uri=self.target.uri)
            log_metrics(self.client, self.target, metrics, step)
        except Exception as e:  # noqa: BLE001
            if not self.warned:
                log.warning("[bertray] MLflow logging to %s failed (%s); training goes on", self.target.uri, e)
                self.warned = True


@contextmanager
def ended_on_error(tracker: Tracker | None, target: Target | None):
    """An error inside marks the MLflow run FAILED (Ctrl-C: KILLED) and goes on up."""
    try:
        yield
    except BaseException as e:
        if target is not None:
            tracker.end(target, "KILLED" if isinstance(e, KeyboardInterrupt | Interrupted) else "FAILED")
        raise


# ----------------------------------------------------------------------------- registry


def is_registry_uri(path: str) -> bool:
    return path.startswith(REGISTRY_PREFIX)


@dataclass(frozen=True)
class RegisteredModel:
    """A ``models:/`` URI resolved: what predict records in ``_SUCCESS`` and ``_report.json``."""

    uri: str  # as given
    name: str
    version: int
    alias: str | None
    run_id: str | None
    tracking_uri: str
    path: str  # the local copy

    def to_dict(self) -> dict:
        return {"uri": self.uri, "name": self.name, "version": self.version, "alias": self.alias,
                "run_id": self.run_id, "tracking_uri": self.tracking_uri}


def resolve_model(model_uri: str, configured_uri: str | None, key: str = "model.path") -> RegisteredModel:
    """Download (once: cached) the registered model version ``model_uri`` names.

    Raises:
        TrackingError: a malformed URI, an unknown model name, alias or version, an
            unreachable store; naming the URI and the fix.
    """
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise TrackingError(f"{key}={model_uri}: write models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = match["name"], match["alias"], match["version"]
    uri = tracking_uri(configured_uri)
    database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if database and not os.path.isfile(database):  # connecting would create an empty one
        raise TrackingError(f"{key}={model_uri}: there is no MLflow database at {database}; set "
                            f"tracking.mlflow_uri (or ${ENV_URI}) to the store the model was registered in")
    tracker = Tracker.connect(uri)
    client, uri = tracker.client, tracker.uri
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as e:  # noqa: BLE001
        what = f"alias @{alias}" if alias else f"version {version}"
        raise TrackingError(_not_found(client, model_uri, name, what, uri, e)) from None
    path = _download(client, uri, name, int(mv.version), mv.source)
    return RegisteredModel(model_uri, name, int(mv.version), alias, mv.run_id, uri, path)


def _not_found(client, model_uri: str, name: str, what: str, uri: str, e: Exception) -> str:
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001
        return (f"{model_uri}: no registered model {name!r} in {uri} ({_first_line(e)}); register one with "
                "tracking.register_as in jobs/train.py, or fix the name or tracking.mlflow_uri")
    aliases = ", ".join(f"@{a}" for a in sorted(getattr(model, "aliases", {}) or {})) or "none"
    return (f"{model_uri}: registered model {name!r} in {uri} has no {what} (aliases: {aliases}); set it with "
            f"MlflowClient().set_registered_model_alias({name!r}, <alias>, <version>) or use an existing one")


def cache_root() -> Path:
    """``$BERTRAY_CACHE``, else ``~/.cache/bertray``."""
    return Path(os.environ.get("BERTRAY_CACHE") or Path.home() / ".cache" / "bertray").expanduser()


def _download(client, uri: str, name: str, version: int, source: str) -> str:
    """The version's files under the cache (downloaded to a temporary folder, then renamed in).
    Keyed by the store and the version's source too: a model deleted and registered again gets
    its version numbers again, and must not be served the old files."""
    mlflow = _mlflow()
    key = hashlib.sha256(f"{uri}\n{source}".encode()).hexdigest()[:16]
    dest = cache_root() / "models" / name / f"{version}-{key}"
    if (dest / "config.json").is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
    try:
        with _quick_failure():
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri))
        if not (got / "config.json").is_file():
            raise TrackingError(f"models:/{name}/{version} in {uri} holds no Hugging Face model (no config.json "
                                f"in {source}); register the model folder jobs/train.py exports (tracking.register_as)")
        try:
            got.rename(dest)  # the cache entry appears whole or not at all
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent job's finished copy of the same files
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)

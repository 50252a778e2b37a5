"""Fine-tuning on Ray Train: the per-worker entry and a short driver.

The driver (:func:`run`) prepares the Ray Datasets, budgets CPUs between training
workers and Ray Data, starts a ``TorchTrainer`` and exports the best checkpoint. Each
worker (:func:`train_loop`) binds the recipe in :mod:`bertray.loop` to Ray Train: its
dataset shards, DDP, the checkpoint to resume from and ``ray.train.report``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, Result, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from bertray import data as bdata
from bertray import loop, rundir, tracking
from bertray import problem as bproblem
from bertray.batches import Prefetch
from bertray.calibration import METRICS as CALIBRATION_KEYS
from bertray.calibration import export_temperature, plot_reliability, scaled_threshold
from bertray.checkpoint import export_model
from bertray.cluster import check_train_resources, init_ray, train_request
from bertray.config import ConfigError, RunConfig, metric_problems
from bertray.config_loader import to_dict
from bertray.errors import BertrayError, Interrupted
from bertray.metrics import metric_mode
from bertray.problem import metric_modes
from bertray.report import training_distribution

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data sharding


def data_config(num_workers: int) -> DataConfig:
    """With several workers, train is split across them (equal shards: DDP needs the same step
    count on every rank). A single worker reads train unsplit: the split coordinator actor
    would only add start-up time (~1 s). Validation is never split: every worker reads it in
    the same order and evaluates every world_size-th batch, so each row is scored exactly
    once and no worker waits on a split coordinator.

    Both are read with ``preserve_order``: the same rows reach the same worker in the same
    order every epoch, so a worker resumed mid-epoch redraws the epoch's batches from its
    seed and skips exactly the rows it trained before (Ray's split is deterministic then too).
    """
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"] if num_workers > 1 else [],
                      execution_options={"train": options, "validation": options})


# ----------------------------------------------------------------------------- worker


def _publish(metrics: dict, checkpoint_dir: str | None) -> None:
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _worker() -> loop.Worker:
    ctx = ray.train.get_context()
    return loop.Worker(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device(),
                       threads=max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))


def train_loop(config: dict) -> dict | None:
    """Runs on every Ray Train worker; reads only its ``config`` argument. Returns
    :func:`bertray.loop.fit`'s outcome (None, or the error that stopped training)."""
    job = loop.Job.from_dict(config)
    worker = _worker()
    if job.cfg.scaling.torch_threads:
        worker = loop.Worker(worker.rank, worker.world, worker.device, job.cfg.scaling.torch_threads)
    train = ray.train.get_dataset_shard("train")
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt else nullcontext() as resume_dir:
        # The epoch's data pipeline starts first: its start-up (a tokenizer actor, the first
        # block) overlaps the model load.
        first = Prefetch(loop.epoch_batches(job, worker, train, loop.saved_epoch(resume_dir)))
        parts, state = loop.setup(job, worker, resume_dir, ray.train.torch.prepare_model)
    log.info("[bertray] worker %d/%d on node %s: device=%s amp=%s threads=%s", worker.rank, worker.world,
             ray.get_runtime_context().get_node_id()[:12], worker.device, parts.dtype or "fp32", worker.threads)
    mlflow = tracking.MetricLogger(job.tracking) if job.tracking and worker.rank == 0 else None
    reporter = loop.Reporter(worker.rank, _publish, loop.tensorboard_dir(job.cfg), job.checkpoint_files(), mlflow)
    if ckpt:
        reporter.progress(f"resumed from checkpoint: epoch {state.epoch} step {state.step_in_epoch} "
                          f"(global step {state.global_step})")
    recipe = loop.Recipe(job, worker, parts, train, ray.train.get_dataset_shard("validation"), reporter)
    return loop.fit(recipe, state, first)


# ----------------------------------------------------------------------------- driver


@dataclass
class TrainResult:
    model_dir: str
    metrics: dict
    history: list
    checkpoint_path: str


def worker_resources(cfg: RunConfig) -> dict:
    """CPUs per training worker (cluster.train_request: the rule train, tune and the checks share)."""
    per, _, _ = train_request(cfg, ray.cluster_resources().get("CPU", 0))
    return {"CPU": per}


def build_trainer(cfg: RunConfig, prepared: bdata.PreparedData, callbacks=(),
                  target: tracking.Target | None = None) -> TorchTrainer:
    """The one TorchTrainer used by ``jobs/train.py`` and by every Tune trial; ``target``: the
    MLflow run that rank 0 logs every evaluation to."""
    problem = prepared.problem
    try:
        weights = problem.class_weights(cfg.train.class_weights, prepared.label_counts, prepared.train_rows)
    except ValueError as e:
        raise BertrayError(str(e)) from None
    order = metric_mode(cfg.checkpoint.metric)
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "label2id": prepared.label2id, "id2label": prepared.id2label,
                           "train_rows": prepared.train_rows, "class_weights": weights,
                           "training_distribution": training_distribution(problem, prepared.label_stats),
                           "mlflow": target.to_dict() if target else None},
        datasets={"train": prepared.train, "validation": prepared.validation},
        dataset_config=data_config(cfg.scaling.num_workers),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                               checkpoint_score_attribute=cfg.checkpoint.metric,
                                               checkpoint_score_order=order),
            callbacks=list(callbacks),
        ),
    )


def prepare_data(cfg: RunConfig) -> bdata.PreparedData:
    return bdata.prepare(cfg.data, cfg.model.name, cfg.train.max_length, cfg.train.seed, cfg.model.trust_remote_code,
                         cfg.model.problem_type)


def resolve_problem(cfg: RunConfig, problem_type: str | None = None) -> RunConfig:
    """``cfg`` with ``model.problem_type`` resolved and ``checkpoint.metric`` filled in (the
    type's default when unset): on the driver, before Ray starts (``problem_type`` None: read
    from the first training file's label column when that is cheap), and again once the data
    is prepared.

    Raises:
        ConfigError: ``checkpoint.metric`` is not a metric of the problem type (exit 2).
        LabelError: the label column cannot hold labels of ``model.problem_type`` (exit 1).
    """
    if problem_type is None:
        found = bdata.label_type(cfg.data)
        if found is None:
            return cfg
        problem_type = bproblem.resolve(cfg.model.problem_type, found[0], cfg.data.label_separator, found[1],
                                        cfg.data.label_column)
    problems = metric_problems(problem_type, cfg.checkpoint.metric)
    if problems:
        raise ConfigError(problems)
    metric = cfg.checkpoint.metric or bproblem.make(problem_type).default_metric
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, problem_type=problem_type),
                               checkpoint=dataclasses.replace(cfg.checkpoint, metric=metric))


def best_checkpoint(result, metric: str):
    """(checkpoint, metrics) of the best kept checkpoint by ``metric``."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not candidates:
        if result.checkpoint is None:
            raise BertrayError(f"training produced no checkpoint; see the Ray logs under {result.path}")
        return result.checkpoint, result.metrics
    pick = min if metric_mode(metric) == "min" else max
    return pick(candidates, key=lambda cm: cm[1][metric])


def export(result, cfg: RunConfig, dest: str | None = None) -> TrainResult:
    """Write ``<output_dir>/model`` (best checkpoint, HF format) and ``metrics.json``.

    ``cfg``: as :func:`resolve_problem` left it (the problem type and metric filled in)."""
    ckpt, metrics = best_checkpoint(result, cfg.checkpoint.metric)
    problem_type = cfg.model.problem_type
    out = Path(dest or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    temperature = export_temperature(metrics, cfg.train.calibrate)
    with ckpt.as_directory() as d:
        export_model(d, out / "model", temperature, cfg.model.trust_remote_code)
    # The latest checkpoint carries the whole run's history (the best may be older).
    with (result.checkpoint or ckpt).as_directory() as d:
        history = json.loads((Path(d) / "trainer_state.json").read_text())["history"]
    final = {k: metrics[k] for k in (*metric_modes(problem_type), "threshold", "epoch", "global_step",
                                     "num_examples", *CALIBRATION_KEYS) if k in metrics}
    if "num_examples" in final:  # a float after the report's round trip
        final["num_examples"] = int(final["num_examples"])
    for table in ("per_class", "confusion_matrix"):  # reported as JSON text
        if table in metrics:
            final[table] = json.loads(metrics[table])
    if temperature is not None:
        if "threshold" in final:  # the exported model's, on its calibrated scores
            final["threshold"] = scaled_threshold(final["threshold"], temperature)
        plot_reliability(json.loads(metrics["reliability"]), out / "reliability.png",
                         f"{cfg.name}: validation, temperature {temperature:.3f}")
    else:
        final = {k: v for k, v in final.items() if k not in CALIBRATION_KEYS}
    final["checkpoint"] = ckpt.path
    _write_json(out / "metrics.json", final)
    _write_json(out / "history.json", history)
    return TrainResult(model_dir=str(out / "model"), metrics=final, history=history, checkpoint_path=ckpt.path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def run(cfg: RunConfig) -> TrainResult:
    """Train, then export the best model. Re-running the same config resumes (see bertray.rundir)."""
    if "://" in cfg.output_dir:
        raise BertrayError(f"output_dir={cfg.output_dir}: give a local or shared-filesystem directory; "
                         "put object-store URIs in storage_path (checkpoints)")
    rundir.check_output_dir(cfg.output_dir)
    bdata.check_inputs(cfg.data)
    run_dir = f"{cfg.storage_path}/{cfg.name}"
    fingerprint = rundir.fingerprint(cfg)  # of the config as given: the same on every rerun
    resolved = resolve_problem(cfg)
    tracker = tracking.Tracker.connect(cfg.tracking.mlflow_uri) if tracking.enabled(cfg.tracking) else None
    previous = rundir.claim(run_dir, fingerprint, cfg.fresh_start)
    init_ray()
    if previous == "finished":
        # Nothing left to train: export again from the kept checkpoints, without starting workers.
        print(f"[bertray] this run already finished in {run_dir}; re-exporting its best model "
              "(set fresh_start=true to train again from scratch)", flush=True)
        result = Result.from_path(run_dir)
        cfg = _finished_problem(resolved, result)
        target = start_tracking(tracker, cfg, run_dir, fresh=False)
        return _report(track(tracker, target, cfg, export(result, cfg)), cfg)
    check_train_resources(cfg)
    if previous == "running" and rundir.has_checkpoints(run_dir):
        print(f"[bertray] resuming the run in {run_dir} from its latest checkpoint", flush=True)
    cfg, prepared = _prepare(resolved, run_dir, previous)
    print(f"[bertray] {cfg.model.problem_type}; labels: {prepared.id2label}; training rows: {prepared.train_rows}"
          + (f"; rows with no label: {prepared.label_stats.empty}" if prepared.label_stats.empty else "")
          + (f"; dropped bad rows: {prepared.dropped_rows}" if prepared.dropped_rows else ""), flush=True)
    target = start_tracking(tracker, cfg, run_dir, fresh=previous == "new")
    with tracking.ended_on_error(tracker, target):
        result = _fit(build_trainer(cfg, prepared, target=target), run_dir)
        if result.error:
            raise result.error
        loop.raise_if_failed(result.return_value)  # a diverged run exports nothing
        out = export(result, cfg)
    rundir.mark(run_dir, "finished")
    return _report(track(tracker, target, cfg, out), cfg)


def start_tracking(tracker: tracking.Tracker | None, cfg: RunConfig, run_dir: str,
                   fresh: bool) -> tracking.Target | None:
    """The run's MLflow run (found again by its run directory: a resumed or re-run job continues
    it); a new one logs the config as params."""
    if tracker is None:
        return None
    target, created = tracker.start(cfg.tracking.experiment or cfg.name, run_dir, cfg.name, fresh)
    if created:
        tracker.log_params(target, tracking.flat_params(to_dict(cfg)))
    print(f"[bertray] MLflow: {'new' if created else 'continuing'} run {target.run_id} in {tracker.uri}", flush=True)
    return target


def track(tracker: tracking.Tracker | None, target: tracking.Target | None, cfg: RunConfig,
          out: TrainResult) -> TrainResult:
    """The finished run's files and model to MLflow, and the model registered when asked."""
    if target is None:
        return out
    try:
        tracker.finish(target, Path(cfg.output_dir), out.model_dir, out.metrics, int(out.metrics.get("global_step", 0)))
        version = tracker.register(target, cfg.tracking.register_as, out.metrics) if cfg.tracking.register_as else None
    except Exception as e:  # noqa: BLE001 - MLflow's errors: the model itself is in place
        raise tracking.TrackingError(f"the model is in {out.model_dir}, but recording it in MLflow ({tracker.uri}) "
                                     f"failed: {type(e).__name__}: {str(e)[:300]}; re-run the same command to record "
                                     "it again (it continues the same MLflow run, nothing is retrained)") from e
    if version is not None:
        print(f"[bertray] registered as models:/{cfg.tracking.register_as}/{version} in {tracker.uri}", flush=True)
    return out


def _prepare(cfg: RunConfig, run_dir: str, previous: str) -> tuple[RunConfig, bdata.PreparedData]:
    """The data, the problem type it implies and the label map checked against the run's; a new
    run that fails here leaves no run directory behind."""
    try:
        prepared = prepare_data(cfg)
        cfg = resolve_problem(cfg, prepared.problem.name)
        rundir.check_labels(run_dir, sorted(prepared.label2id, key=prepared.label2id.get))
    except BertrayError:
        if previous == "new":
            rundir.release(run_dir)
        raise
    return cfg, prepared


def _finished_problem(cfg: RunConfig, result) -> RunConfig:
    """A finished run re-exported: its problem type is the one its checkpoints were trained as."""
    if cfg.model.problem_type != bproblem.AUTO:
        return cfg
    from transformers import AutoConfig

    with result.checkpoint.as_directory() as d:
        name = getattr(AutoConfig.from_pretrained(d), "problem_type", None) or bproblem.SINGLE
    return resolve_problem(cfg, name)


def _fit(trainer: TorchTrainer, run_dir: str):
    """``trainer.fit()``, where Ctrl-C raises :class:`Interrupted` (exit 130) within seconds.

    In the main thread Ray Train installs its own SIGINT handler, whose abort ends in
    ``sys.exit`` and exit status 1. Off the main thread it does not, so the main thread keeps
    Python's KeyboardInterrupt; leaving then shuts Ray down, which stops the workers. Checkpoints
    are persisted as they are reported, so the ones saved so far stay and a rerun resumes.
    """
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=fit, name="bertray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        raise Interrupted(f"training stopped; the checkpoints saved so far are in {run_dir}; "
                          "re-run the same command to resume") from None
    if "error" in box:
        raise box["error"]
    return box["result"]


def _report(out: TrainResult, cfg: RunConfig) -> TrainResult:
    print(f"[bertray] best model (epoch {out.metrics.get('epoch')}, {cfg.checkpoint.metric}="
          f"{out.metrics[cfg.checkpoint.metric]:.4f}) written to {out.model_dir}", flush=True)
    return out

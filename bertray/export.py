"""ONNX export of a trained classifier, its exactness check, and predict's choice of backend. Pure: no ``ray``.

    python jobs/export.py --config configs/export.yaml model.path=outputs/sst2/model

Writes, beside the Hugging Face model (``<model>/onnx/``, replaced whole):

* ``model.onnx``: the fp32 graph, exported by ``torch.onnx`` from the eager-attention model
  and fused by ONNX Runtime's transformer optimizer (attention, GELU, LayerNorm);
* ``model_quantized.onnx``: the same with int8 weights (per channel) and activations
  quantized on the fly (``quantize_dynamic``), unless ``quantize=false``;
* ``export.json``: what each way of scoring measured on held-out rows (``input``) on this
  machine: rows/s, the share of rows whose prediction equals exact fp32 torch's, the largest
  score difference, and the headline metric when ``label_column`` is set; plus the SHA-256 of
  the weights it was exported from.

Predict's ``backend=auto`` reads that record once, on the driver: the fastest way that meets
:data:`BUDGET` (on a CPU; a GPU runs torch), or torch when there is no export or it was made
from other weights. File names follow Hugging Face's (``onnx/model.onnx``,
``onnx/model_quantized.onnx``), so the folder also serves Optimum and transformers.js.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from bertray.config import ConfigError
from bertray.errors import BertrayError
from bertray.scoring import IDS, TYPES, Backend, default_threads

ONNX_DIR = "onnx"
RECORD_FILE = f"{ONNX_DIR}/export.json"
FP32 = Backend("onnx", "fp32", f"{ONNX_DIR}/model.onnx")
INT8 = Backend("onnx", "int8", f"{ONNX_DIR}/model_quantized.onnx")
TORCH_FP32 = Backend("torch", "fp32")
TORCH_BF16 = Backend("torch", "bf16")
OPSET = 17
FORMAT = 1
# ONNX Runtime's transformer optimizer fuses these encoder families' attention as "bert".
FUSABLE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"}


@dataclass(frozen=True)
class Budget:
    """How far the default path may stray from exact fp32 scoring (held-out rows)."""

    min_agreement: float = 0.995  # share of rows with the same prediction
    max_metric_drop: float = 0.003  # headline metric (accuracy, F1 micro, ...) lost, absolute


BUDGET = Budget()


class ExportError(BertrayError):
    """The ONNX export or its record is missing, stale or unusable."""


@dataclass(frozen=True)
class Measured:
    """One way of scoring, measured on the check rows against exact fp32 torch."""

    backend: Backend
    rows_per_s: float
    agreement: float
    max_score_diff: float
    metric: float | None = None

    def meets(self, reference: Measured, mode: str, budget: Budget = BUDGET) -> bool:
        if self.agreement < budget.min_agreement:
            return False
        if self.metric is None or reference.metric is None:
            return True
        drop = reference.metric - self.metric if mode == "max" else self.metric - reference.metric
        return drop <= budget.max_metric_drop

    def to_dict(self) -> dict:
        return {**asdict(self.backend), "rows_per_s": round(self.rows_per_s, 1), "agreement": self.agreement,
                "max_score_diff": self.max_score_diff, "metric": self.metric}

    @classmethod
    def from_dict(cls, d: dict) -> Measured:
        return cls(Backend(d["name"], d["dtype"], d.get("file")), d["rows_per_s"], d["agreement"],
                   d["max_score_diff"], d.get("metric"))


# ----------------------------------------------------------------------------- the weights' identity


def weights_digest(model_path: str) -> str:
    """SHA-256 over the folder's safetensors files (names and bytes): an export belongs to these weights."""
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors")):
        digest.update(name.encode())
        with open(os.path.join(model_path, name), "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- writing the graphs


def export_fp32(model_path: str, tokenizer, out: str, workdir: str, trust_remote_code: bool = False) -> dict:
    """``torch.onnx.export`` of the eager-attention model (the attention pattern ONNX Runtime
    fuses), then ONNX Runtime's optimizer; returns the fused operators' counts."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, use_safetensors=True, attn_implementation="eager", trust_remote_code=trust_remote_code).eval()
    sample = tokenizer(["an example", "a second, longer example row"], padding=True, return_tensors="pt")
    names = [n for n in (IDS, "attention_mask", TYPES) if n in sample]
    raw = os.path.join(workdir, "raw.onnx")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    # The legacy (TorchScript) exporter: ONNX Runtime's optimizer fuses its attention pattern. Its
    # tracer warns that the mask's padding check becomes a constant; without a KV cache it is 0 for
    # every shape (tests/test_export.py scores batches of other widths against torch).
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=(torch.jit.TracerWarning, DeprecationWarning, UserWarning))
        torch.onnx.export(model, tuple(sample[n] for n in names), raw, input_names=names, output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    if model.config.model_type not in FUSABLE:
        shutil.move(raw, out)
        return {}
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(raw, model_type="bert", num_heads=model.config.num_attention_heads,
                               hidden_size=model.config.hidden_size, opt_level=1)
    optimized.save_model_to_file(out)
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_int8(src: str, out: str) -> None:
    """Dynamic int8: weights per channel, activations per batch. The pooler and classifier
    (``Gemm``) stay fp32: they are a sliver of the cost and sit right before the decision."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})


def write_graphs(model_path: str, tokenizer, quantize: bool, trust_remote_code: bool = False) -> tuple[str, dict]:
    """Both graphs into a new folder beside ``<model>/onnx``; returns it and the fused operators."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f"exporting to ONNX needs onnx and onnxruntime ({e.name} is missing): "
                          "pip install 'bertray[onnx]'") from None
    staging = os.path.join(model_path, f".{ONNX_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "work"))
    fused = export_fp32(model_path, tokenizer, os.path.join(staging, os.path.basename(FP32.file)),
                        os.path.join(staging, "work"), trust_remote_code)
    if quantize:
        quantize_int8(os.path.join(staging, os.path.basename(FP32.file)),
                      os.path.join(staging, os.path.basename(INT8.file)))
    shutil.rmtree(os.path.join(staging, "work"))
    return staging, fused


def commit(model_path: str, staging: str, record: dict) -> str:
    """Write the record into ``staging`` and swap it in for ``<model>/onnx`` (an old export is
    removed only once the new one is in place)."""
    with open(os.path.join(staging, os.path.basename(RECORD_FILE)), "w") as f:
        json.dump(record, f, indent=2)
    final = os.path.join(model_path, ONNX_DIR)
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(staging, final)
    if old:
        shutil.rmtree(old)
    return final


# ----------------------------------------------------------------------------- measuring


def same_prediction(problem, reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row: the two scores (the problem type's, as predict writes them) give the same
    prediction: the label; the label set at the threshold (``output_columns``' rule);
    regression: within 1% of the reference values' range."""
    from bertray.problem import MULTI, SINGLE

    if problem.name == SINGLE:
        return reference.argmax(1) == scores.argmax(1)
    if problem.name == MULTI:
        cut = np.float32(problem.threshold)
        return ((reference >= cut) == (scores >= cut)).all(1)
    span = float(reference.max() - reference.min()) or 1.0
    return (np.abs(reference - scores) <= 0.01 * span).all(1)


def headline_metric(problem, logits: np.ndarray, labels: pa.Array | None) -> float | None:
    """The problem type's default metric of ``logits`` against ``labels`` (None without labels)."""
    import torch

    if labels is None:
        return None
    state = problem.new_state()
    problem.update(state, torch.from_numpy(logits), problem.batch_labels(labels))
    return float(problem.metrics(state)[problem.default_metric])


def measure(scorer, tokens: pa.Table) -> tuple[np.ndarray, float]:
    """Logits of ``tokens`` and rows/s (after one warm-up micro-batch)."""
    scorer.logits(tokens.slice(0, min(scorer.batch_size, tokens.num_rows)))
    start = time.perf_counter()
    logits = scorer.logits(tokens)
    return logits, tokens.num_rows / (time.perf_counter() - start)


def compare(problem, backend: Backend, logits: np.ndarray, rows_per_s: float, reference: np.ndarray,
            labels: pa.Array | None) -> Measured:
    import torch

    def scores(x):
        return problem.scores(torch.from_numpy(x)).numpy()

    ours, theirs = scores(logits), scores(reference)
    return Measured(backend, rows_per_s, float(same_prediction(problem, theirs, ours).mean()),
                    float(np.abs(ours - theirs).max()), headline_metric(problem, logits, labels))


# ----------------------------------------------------------------------------- predict's choice


def read_record(model_path: str) -> dict | None:
    """``<model>/onnx/export.json``, or None when the model was never exported."""
    path = os.path.join(model_path, RECORD_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        ways = [Measured.from_dict(v).backend for v in record["variants"]]
        if TORCH_FP32 not in ways or not isinstance(record["source_sha256"], str) or record["check"]["rows"] < 1:
            raise ValueError("no exact fp32 reference, weights digest or check rows")
        return record
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is unreadable ({type(e).__name__}: {e}); export the model again: "
                          f"{export_command(model_path)}") from None


@dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str
    measured: Measured | None = None

    def to_dict(self) -> dict:
        return {**asdict(self.backend), "reason": self.reason,
                "measured": self.measured.to_dict() if self.measured else None}


def choose(requested: str, amp_dtype: str, use_gpu: bool, model_path: str, record: dict | None,
           digest: str | None, mode: str = "max") -> Choice:
    """The backend predict runs. ``requested``: auto | torch | onnx; ``amp_dtype``: the torch
    dtype ``amp`` resolves to here (fp32, bf16, fp16); ``amp=fp32`` allows only exact ways.

    Raises:
        ConfigError: ``backend=onnx`` with ``use_gpu``.
        ExportError: ``backend=onnx`` without an export, or one made from other weights.
    """
    torch_way = Backend("torch", amp_dtype)
    export = export_command(model_path)
    if requested == "onnx" and use_gpu:
        raise ConfigError(["backend=onnx runs on CPU (ONNX Runtime's CPU provider); on a GPU use backend=torch"])
    if requested == "torch" or use_gpu:
        return Choice(torch_way, "backend=torch" if requested == "torch" else "on GPU: torch")
    if record is None or record.get("source_sha256") != digest:
        what = "has no ONNX export" if record is None else "has an ONNX export made from other weights"
        if requested == "onnx":
            raise ExportError(f"model.path={model_path} {what} ({RECORD_FILE}); run: {export}")
        return Choice(torch_way, f"the model {what}; torch (export it for the ONNX backend: {export})")
    return _fastest(requested, amp_dtype, model_path, record, torch_way, mode)


def export_command(model_path: str) -> str:
    return f"python jobs/export.py --config configs/export.yaml model.path={model_path}"


def _fastest(requested: str, amp_dtype: str, model_path: str, record: dict, torch_way: Backend,
             mode: str) -> Choice:
    measured = [Measured.from_dict(v) for v in record["variants"]]
    reference = next(m for m in measured if m.backend == TORCH_FP32)
    allowed = [m for m in measured if m.meets(reference, mode)
               and (m.backend.name == "onnx" or m.backend == torch_way)
               and (amp_dtype != "fp32" or m.backend.exact)
               and (requested == "auto" or m.backend.name == requested)]
    if not allowed and requested == "auto":
        return Choice(torch_way, f"no way in {RECORD_FILE} that runs here meets the exactness budget; torch")
    if not allowed:
        raise ExportError(f"no {requested} variant in {RECORD_FILE} meets the exactness budget "
                          f"({BUDGET.min_agreement:.1%} of labels as fp32); use backend=torch or auto")
    best = max(allowed, key=lambda m: m.rows_per_s)
    if best.backend.file and not os.path.isfile(os.path.join(model_path, best.backend.file)):
        raise ExportError(f"{os.path.join(model_path, best.backend.file)} is missing but {RECORD_FILE} lists it; "
                          f"export the model again: {export_command(model_path)}")
    on = record.get("cpu")
    note = "" if on == cpu_name() else f" (measured on {on}, not this CPU: export here to re-measure)"
    return Choice(best.backend, f"fastest within the exactness budget: {best.rows_per_s:.0f} rows/s, same "
                  f"prediction as fp32 on {best.agreement:.2%} of {record['check']['rows']} held-out rows{note}", best)


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class CheckRows:
    """The held-out rows, tokenized, with their labels (None without ``label_column``)."""

    tokens: pa.Table
    labels: pa.Array | None


def read_check_rows(cfg, tokenizer, max_length: int, problem) -> CheckRows:
    """The first ``check_rows`` rows of ``cfg.input`` (one Parquet, CSV or JSONL file)."""
    import pyarrow.dataset as pads

    from bertray.columns import missing_column
    from bertray.tokenization import token_columns

    fmt = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(
        os.path.splitext(cfg.input)[1].lower())
    if fmt is None or not os.path.isfile(cfg.input):
        raise ExportError(f"input={cfg.input}: give one Parquet, CSV or JSONL file of held-out rows")
    columns = {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
               "label_column": cfg.label_column}
    dataset = pads.dataset(cfg.input, format=fmt)
    for key, name in columns.items():
        if name and name not in dataset.schema.names:
            raise ExportError(missing_column(cfg.input, name, dataset.schema.names, key))
    table = dataset.head(cfg.check_rows, columns=[c for c in columns.values() if c])
    if table.num_rows == 0:
        raise ExportError(f"input={cfg.input} has no rows")

    def texts(name):
        return [t or "" for t in table.column(name).to_pylist()]

    tokens = pa.table(token_columns(tokenizer, texts(cfg.text_column), max_length, cfg.truncation,
                                    pairs=texts(cfg.text_pair_column) if cfg.text_pair_column else None))
    labels = None
    if cfg.label_column:
        labels = problem.encode(table.column(cfg.label_column), cfg.input, cfg.label_column)
    return CheckRows(tokens, labels)


def measure_all(cfg, model_path: str, staging: str, rows: CheckRows, problem, pad_id: int) -> list[Measured]:
    """Each way of scoring on the check rows: exact fp32 torch first (the reference), torch bf16
    where the CPU has it, the ONNX graphs in ``staging``."""
    from bertray.modeling import cpu_amp
    from bertray.scoring import OnnxRunner, Scorer, TorchRunner

    threads = default_threads()
    ways = [TORCH_FP32, *([TORCH_BF16] if cpu_amp() == "bf16" else []), FP32]
    ways += [INT8] if os.path.exists(os.path.join(staging, os.path.basename(INT8.file))) else []
    results, reference = [], None
    for way in ways:
        runner = (OnnxRunner(os.path.join(staging, os.path.basename(way.file)), threads) if way.name == "onnx"
                  else TorchRunner(model_path, way.dtype, threads, trust_remote_code=cfg.model.trust_remote_code))
        logits, speed = measure(Scorer(runner, cfg.batch_size, pad_id), rows.tokens)
        reference = logits if reference is None else reference
        results.append(compare(problem, way, logits, speed, reference, rows.labels))
        print(f"[bertray] {way.label}: {speed:.0f} rows/s, same prediction as fp32 on "
              f"{results[-1].agreement:.2%} of rows" + ("" if results[-1].metric is None else
                                                          f", {problem.default_metric} {results[-1].metric:.4f}"),
              flush=True)
    return results


def run(cfg) -> dict:
    """Export ``cfg.model.path`` to ONNX and measure every way of scoring it; returns the record
    written to ``<model>/onnx/export.json``."""
    from transformers import AutoConfig

    from bertray.modeling import check_is_classifier, load_tokenizer, model_max_positions, resolve_max_length
    from bertray.problem import from_model_config

    path = cfg.model.path
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise ExportError(f"model.path={path} holds no model.safetensors: pass the <output_dir>/model folder "
                          "written by jobs/train.py")
    check_is_classifier(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    problem = from_model_config(config).for_output()  # multi-label: its stored threshold, no search
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    max_length = resolve_max_length(cfg.max_length, tokenizer.model_max_length, model_max_positions(path)[0], path)
    rows = read_check_rows(cfg, tokenizer, max_length, problem)
    digest = weights_digest(path)
    staging, fused = write_graphs(path, tokenizer, cfg.quantize, cfg.model.trust_remote_code)
    try:
        measured = measure_all(cfg, path, staging, rows, problem, int(tokenizer.pad_token_id or 0))
        record = _record(cfg, digest, fused, rows, measured, problem)
        final = commit(path, staging, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from bertray.modeling import cpu_amp

    choice = choose("auto", cpu_amp(), False, path, record, digest,
                    problem.mode(problem.default_metric))
    print(f"[bertray] wrote {final}; predict's backend=auto will run {choice.backend.label}: {choice.reason}",
          flush=True)
    return record


def _record(cfg, digest: str, fused: dict, rows: CheckRows, measured: list[Measured], problem) -> dict:
    import onnxruntime
    import torch

    mode = problem.mode(problem.default_metric)
    return {"format": FORMAT, "source_sha256": digest, "cpu": cpu_name(), "threads": default_threads(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "opset": OPSET,
            "fused_operators": fused,
            "check": {"input": cfg.input, "rows": rows.tokens.num_rows, "label_column": cfg.label_column,
                      "metric": problem.default_metric if rows.labels is not None else None,
                      "batch_size": cfg.batch_size},
            "budget": asdict(BUDGET),
            "variants": [{**m.to_dict(), "meets_budget": m.meets(measured[0], mode)} for m in measured]}

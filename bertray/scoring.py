"""Scoring tokenized rows with a classifier: torch or ONNX Runtime. Pure: no ``ray``.

:class:`Scorer` orders a window of rows by token length, runs micro-batches of
``batch_size`` rows padded only to their own longest row, and restores the rows' order.
The forward pass is a *runner*: :class:`TorchRunner` (the Hugging Face model, weights in
the AMP dtype) or :class:`OnnxRunner` (an ONNX Runtime session over a file that
:mod:`bertray.export` wrote); a runner's ``to_host`` gathers the micro-batches' logits once
per window. The predict actors and the export's exactness check share this code, so what the
check measured is what predict runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertray.errors import BertrayError

IDS = "input_ids"
TYPES = "token_type_ids"
MASK = "attention_mask"


def default_threads(workers: int = 1) -> int:
    """This process's cores divided by ``workers`` (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


@dataclass(frozen=True)
class Backend:
    """How to run the forward pass: ``torch`` in ``dtype`` (``fp32``/``bf16``), or ``onnx``
    with the model folder's ``file`` (relative path)."""

    name: str  # torch | onnx
    dtype: str  # torch: an amp value (fp32, bf16, fp16; auto on GPU); onnx: fp32 | int8 (what the file holds)
    file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}-{self.dtype}"

    @property
    def exact(self) -> bool:
        """Scores equal fp32 torch's up to float rounding."""
        return self.dtype == "fp32"


class TorchRunner:
    """The Hugging Face model; weights held in the AMP dtype (no per-call casts, half the memory).
    ``dtype``: an ``amp`` value (``auto`` resolves on this device)."""

    def __init__(self, model_path: str, dtype: str, threads: int, use_gpu: bool = False,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification

        from bertray.modeling import INFERENCE_EAGER_MAX_WIDTH, AttentionSwitch, amp_dtype

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, use_safetensors=True, dtype=amp_dtype(dtype, self.device) or torch.float32,
            trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        self.attention = AttentionSwitch(self.model, INFERENCE_EAGER_MAX_WIDTH)

    def __call__(self, batch: dict[str, np.ndarray]):
        """float32 logits left on the model's device: on a GPU the host goes on to pad and launch
        the next micro-batch while this one runs, and waits once, in :meth:`to_host`."""
        torch = self.torch
        inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}
        self.attention(batch[IDS].shape[1])
        with torch.inference_mode():
            return self.model(**inputs).logits.float()

    def to_host(self, parts: list) -> np.ndarray:
        """The micro-batches' logits, concatenated, as one host array."""
        with self.torch.inference_mode():
            return self.torch.cat(parts).cpu().numpy()


class OnnxRunner:
    """An ONNX Runtime CPU session; feeds the graph the inputs it declares (zero type ids if the
    rows carry none)."""

    def __init__(self, path: str, threads: int):
        ort = import_onnxruntime()
        if not os.path.isfile(path):
            raise BertrayError(f"ONNX model {path} does not exist; write it with "
                               "python jobs/export.py --config configs/export.yaml model.path=<model folder>")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise BertrayError(f"ONNX model {path} cannot be loaded ({type(e).__name__}: {str(e)[:300]}); "
                               "export it again with jobs/export.py") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: batch[name] if name in batch else np.zeros_like(batch[IDS]) for name in self.inputs}
        return self.session.run(["logits"], feed)[0]

    def to_host(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BertrayError("the ONNX backend needs onnxruntime: pip install 'bertray[onnx]' "
                           "(or set backend=torch)") from None
    return onnxruntime


def make_runner(model_path: str, backend: Backend, threads: int, use_gpu: bool = False,
                trust_remote_code: bool = False):
    if backend.name == "onnx":
        return OnnxRunner(os.path.join(model_path, backend.file), threads)
    return TorchRunner(model_path, backend.dtype, threads, use_gpu, trust_remote_code)


class Scorer:
    """Logits of tokenized rows, in the rows' order, from length-sorted micro-batches."""

    def __init__(self, runner, batch_size: int, pad_id: int, pad_multiple: int = 1):
        self.runner = runner
        self.batch_size = batch_size
        self.pad_id = pad_id
        # Rows are length-sorted, so a micro-batch's rows are nearly equal in length anyway.
        self.pad_multiple = pad_multiple

    def logits(self, table: pa.Table) -> np.ndarray | None:
        """``(rows, labels)``; ``table``: ``input_ids`` (and ``token_type_ids``) list columns.
        None for an empty table."""
        n = table.num_rows
        if n == 0:
            return None
        lengths = pc.list_value_length(table.column(IDS)).to_numpy(zero_copy_only=False)
        order = np.argsort(lengths, kind="stable")
        ordered = table.select([c for c in (IDS, TYPES) if c in table.column_names]).take(pa.array(order))
        # contiguous, offsets from 0: each column as (values, offsets) numpy views, taken once per call
        flat = {c: ordered.column(c).combine_chunks() for c in ordered.column_names}
        flat = {c: (a.values.to_numpy(), a.offsets.to_numpy()) for c, a in flat.items()}
        parts = [self.runner(self._inputs(flat, start, min(start + self.batch_size, n)))
                 for start in range(0, n, self.batch_size)]
        logits = self.runner.to_host(parts)  # in length order
        out = np.empty_like(logits)
        out[order] = logits
        return out

    def _inputs(self, flat: dict[str, tuple[np.ndarray, np.ndarray]], start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of the ordered rows, padded; ``flat``: (values, offsets) per column."""
        from bertray.tokenization import pad_flat

        values, offsets = flat[IDS]
        offsets = offsets[start:stop + 1]  # the type ids share the ids' layout
        input_ids, mask = pad_flat(values, offsets, self.pad_id, self.pad_multiple)
        batch = {IDS: input_ids, MASK: mask}
        if TYPES in flat:
            batch[TYPES] = pad_flat(flat[TYPES][0], offsets, 0, self.pad_multiple)[0]
        return batch

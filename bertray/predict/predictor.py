"""The Ray Data stages that predict: tokenize (CPU actors) and score (model actors).

Each predictor call takes a large batch (``PREDICT_BATCH_ROWS``), orders its rows by token
length, runs micro-batches of ``batch_size`` rows padded only to their own longest row,
with the weights in bf16 where ``amp`` says so, with eager attention for narrow
micro-batches and SDPA for wide ones, and then restores the original row order. The model
loads once per actor; torch gets the node's cores divided by the predictors.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertray.config import PredictConfig
from bertray.data import TASK_CPUS, Tokenize

PREDICT_BATCH_ROWS = 4096
"""Rows per predictor call: the window sorted by length, then cut into micro-batches."""
TOKENIZE_BATCH_ROWS = 4096
IDS = "input_ids"


class PredictTokenize(Tokenize):
    """:class:`bertray.data.Tokenize` that scores null texts as ``""`` and writes the text column
    back as it came (nulls stay null, a dictionary-encoded column stays dictionary-encoded)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        col = batch.column(self.text_column)
        if col.null_count == 0:
            return super().__call__(batch)
        filled = pa.array([""] * len(col), pa.string()) if pa.types.is_null(col.type) else pc.fill_null(col, "")
        out = super().__call__(batch.set_column(batch.schema.get_field_index(self.text_column),
                                                self.text_column, filled))
        return out.set_column(out.schema.get_field_index(self.text_column), self.text_column, col)


class Predictor:
    """Ray Data callable class: one model per actor; length-sorted, dynamically padded micro-batches."""

    def __init__(self, model_path: str, amp: str, batch_size: int, pad_id: int, top_k: int | None,
                 all_scores: bool, threads: int | None, num_predictors: int, use_gpu: bool,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification

        from bertray.modeling import INFERENCE_EAGER_MAX_WIDTH, AttentionSwitch, amp_dtype
        from bertray.tokenization import pad_multiple

        if threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // num_predictors)
        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # Inference holds the weights in the AMP dtype itself rather than autocasting fp32
        # weights: no per-call weight casts (on 2 CPUs ~12% more rows/s than bf16 autocast),
        # and half the memory. Predictions matched bf16 autocast on 99.9% of SST-2 rows.
        dtype = amp_dtype(amp, self.device) or torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, use_safetensors=True, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        self.attention = AttentionSwitch(self.model, INFERENCE_EAGER_MAX_WIDTH)
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.names = pa.array([id2label[i] for i in range(len(id2label))], pa.string())
        self.batch_size = batch_size
        self.pad_id = pad_id
        # Rows are length-sorted, so a micro-batch's rows are nearly equal in length anyway.
        self.pad_multiple = pad_multiple(self.device.type)
        self.top_k = min(top_k, len(id2label)) if top_k else None
        self.all_scores = all_scores

    def probabilities(self, ids: pa.ListArray) -> np.ndarray:
        """Softmax probabilities ``(rows, labels)`` in the rows' own order."""
        from bertray.tokenization import pad_flat

        torch = self.torch
        n = len(ids)
        probs = np.empty((n, len(self.names)), dtype=np.float32)
        if n == 0:
            return probs
        lengths = np.diff(ids.offsets.to_numpy())
        order = np.argsort(lengths, kind="stable")
        ordered = ids.take(pa.array(order))  # contiguous, offsets from 0
        values = ordered.values.to_numpy()
        offsets = ordered.offsets.to_numpy()
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                input_ids, mask = pad_flat(values, offsets[start:stop + 1], self.pad_id, self.pad_multiple)
                self.attention(input_ids.shape[1])
                logits = self.model(input_ids=torch.from_numpy(input_ids).to(self.device, non_blocking=True),
                                    attention_mask=torch.from_numpy(mask).to(self.device, non_blocking=True)).logits
                probs[order[start:stop]] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return probs

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(IDS).combine_chunks()
        probs = self.probabilities(ids)
        n = len(probs)
        best = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
        out = batch.drop_columns([IDS])
        out = out.append_column("prediction", self.names.take(pa.array(best)))
        out = out.append_column("score", pa.array(probs[np.arange(n), best], pa.float32()))
        if self.top_k:
            k = self.top_k
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            list_offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
            out = out.append_column("top_k_labels", pa.ListArray.from_arrays(
                list_offsets, self.names.take(pa.array(top.ravel()))))
            out = out.append_column("top_k_scores", pa.ListArray.from_arrays(
                list_offsets, pa.array(np.take_along_axis(probs, top, axis=1).ravel(), pa.float32())))
        if self.all_scores:
            for i, name in enumerate(self.names.to_pylist()):
                out = out.append_column(f"score_{name}", pa.array(probs[:, i], pa.float32()))
        return out


def build_predictions(cfg: PredictConfig, model, ds):
    """The lazy Ray Dataset of ``ds`` (the checked input) + predictions; nothing runs until it is consumed.

    ``model``: the :class:`bertray.predict.preflight.Model` checked on the driver.
    """
    from ray.data import ActorPoolStrategy

    opts = ds.context.execution_options
    opts.preserve_order = True  # ds.context is this read's own copy of the DataContext
    ds = ds.map_batches(
        PredictTokenize,
        fn_constructor_kwargs={"model_name": model.path, "max_length": model.max_length, "label2id": None,
                               "text_column": cfg.text_column,
                               "truncation": cfg.truncation, "trust_remote_code": cfg.model.trust_remote_code,
                               "keep_columns": True},
        batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS,
        compute=ActorPoolStrategy(size=cfg.num_tokenizer_actors), num_cpus=TASK_CPUS)
    gpu = {"num_gpus": 1} if cfg.use_gpu else {}
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": model.path, "amp": cfg.amp, "batch_size": cfg.batch_size,
                               "pad_id": model.pad_id, "top_k": cfg.top_k, "all_scores": cfg.all_scores,
                               "threads": cfg.torch_threads, "num_predictors": cfg.num_predictors,
                               "use_gpu": cfg.use_gpu, "trust_remote_code": cfg.model.trust_remote_code},
        batch_format="pyarrow", batch_size=PREDICT_BATCH_ROWS,
        compute=ActorPoolStrategy(size=cfg.num_predictors), num_cpus=cfg.predictor_cpus, **gpu)


def amp_name(cfg: PredictConfig) -> str:
    """The compute dtype the predictors use (CPU flags read on the driver; GPU: as configured)."""
    if cfg.use_gpu:
        return cfg.amp
    import torch

    from bertray.modeling import amp_dtype

    return {None: "fp32", torch.bfloat16: "bf16"}.get(amp_dtype(cfg.amp, torch.device("cpu")), cfg.amp)

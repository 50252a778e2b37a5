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
from bertray.pieces import PieceWriter, Source

PREDICT_BATCH_ROWS = 4096
"""Rows per predictor call: the window sorted by length, then cut into micro-batches."""
TOKENIZE_BATCH_ROWS = 4096
IDS = "input_ids"
TYPES = "token_type_ids"


class PredictTokenize(Tokenize):
    """:class:`bertray.data.Tokenize` that scores null texts as ``""`` and writes the text
    columns back as they came (nulls stay null, a dictionary-encoded column stays dictionary-encoded)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = [c for c in (self.text_column, self.text_pair_column) if c]
        nulls = [c for c in names if batch.column(c).null_count]
        if not nulls:
            return super().__call__(batch)
        filled = batch
        for name in nulls:
            col = batch.column(name)
            col = pa.array([""] * len(col), pa.string()) if pa.types.is_null(col.type) else pc.fill_null(col, "")
            filled = filled.set_column(filled.schema.get_field_index(name), name, col)
        out = super().__call__(filled)
        for name in nulls:
            out = out.set_column(out.schema.get_field_index(name), name, batch.column(name))
        return out


class Predictor:
    """Ray Data callable class: one model per actor; length-sorted, dynamically padded micro-batches."""

    def __init__(self, model_path: str, amp: str, batch_size: int, pad_id: int, top_k: int | None,
                 all_scores: bool, threads: int | None, num_predictors: int, use_gpu: bool,
                 trust_remote_code: bool = False, threshold: float | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from bertray.modeling import INFERENCE_EAGER_MAX_WIDTH, AttentionSwitch, amp_dtype
        from bertray.problem import from_model_config
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
        # The problem type turns logits into scores and output columns (softmax + label,
        # sigmoid + labels at the threshold, or the raw value).
        self.problem = from_model_config(model.config, threshold=threshold)
        self.width = self.problem.num_labels
        self.batch_size = batch_size
        self.pad_id = pad_id
        # Rows are length-sorted, so a micro-batch's rows are nearly equal in length anyway.
        self.pad_multiple = pad_multiple(self.device.type)
        self.top_k = min(top_k, self.width) if top_k else None
        self.all_scores = all_scores

    def _inputs(self, ids: tuple, types: tuple | None, start: int, stop: int) -> dict:
        """Rows ``start:stop`` padded; ``ids``/``types``: (values, offsets) of the ordered rows."""
        from bertray.tokenization import pad_flat

        input_ids, mask = pad_flat(ids[0], ids[1][start:stop + 1], self.pad_id, self.pad_multiple)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if types is not None:
            batch[TYPES] = pad_flat(types[0], types[1][start:stop + 1], 0, self.pad_multiple)[0]
        return {k: self.torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}

    def probabilities(self, table: pa.Table | pa.ListArray) -> np.ndarray:
        """Scores ``(rows, labels)`` in the rows' own order: the problem type's (softmax,
        sigmoid, or the raw value). ``table``: ``input_ids`` (and ``token_type_ids``)."""
        torch = self.torch
        if not isinstance(table, pa.Table):
            table = pa.table({IDS: table})
        n = table.num_rows
        probs = np.empty((n, self.width), dtype=np.float32)
        if n == 0:
            return probs
        lengths = pc.list_value_length(table.column(IDS)).to_numpy(zero_copy_only=False)
        order = np.argsort(lengths, kind="stable")
        ordered = table.select([c for c in (IDS, TYPES) if c in table.column_names]).take(pa.array(order))
        flat = {c: ordered.column(c).combine_chunks() for c in ordered.column_names}  # contiguous, offsets from 0
        ids, types = ((flat[c].values.to_numpy(), flat[c].offsets.to_numpy()) if c in flat else None
                      for c in (IDS, TYPES))
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                batch = self._inputs(ids, types, start, stop)
                self.attention(batch[IDS].shape[1])
                logits = self.model(**batch).logits
                probs[order[start:stop]] = self.problem.scores(logits).cpu().numpy()
        return probs

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs = self.probabilities(batch)
        out = batch.drop_columns([c for c in (IDS, TYPES) if c in batch.column_names])
        for name, column in self.problem.output_columns(probs, self.all_scores, self.top_k).items():
            out = out.append_column(name, column)
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
                               "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
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
                               "use_gpu": cfg.use_gpu, "trust_remote_code": cfg.model.trust_remote_code,
                               "threshold": cfg.threshold},
        batch_format="pyarrow", batch_size=PREDICT_BATCH_ROWS,
        compute=ActorPoolStrategy(size=cfg.num_predictors), num_cpus=cfg.predictor_cpus, **gpu)


def amp_name(cfg: PredictConfig) -> str:
    """The compute dtype the predictors use (CPU flags read on the driver; GPU: as configured)."""
    if cfg.use_gpu:
        return cfg.amp
    import torch

    from bertray.modeling import amp_dtype

    return {None: "fp32", torch.bfloat16: "bf16"}.get(amp_dtype(cfg.amp, torch.device("cpu")), cfg.amp)


def tagged_source(input_path: str, files: list[str], whole: str | None = None):
    """``files`` as a Ray Dataset whose rows carry their piece (``pieces.SOURCE``): each row its
    file's path, or every row the name of the ``whole`` input's one piece."""
    from bertray.data import read_table
    from bertray.pieces import SOURCE

    if whole is not None:
        name = whole
        return read_table(input_path, files=files).map_batches(
            lambda t: t.append_column(SOURCE, pa.array([name] * t.num_rows, pa.string())),
            batch_format="pyarrow", num_cpus=TASK_CPUS)
    return read_table(input_path, files=files, include_paths=True).rename_columns({"path": SOURCE}, num_cpus=TASK_CPUS)


def write_pieces(predictions, attempt_uri: str, todo: list[Source]) -> int:
    """Run the pipeline: each input file's predictions become a piece under ``attempt_uri``
    (:class:`bertray.pieces.PieceWriter`; one actor, so rows stay in input order).
    Returns the rows written."""
    from ray.data import ActorPoolStrategy

    written = predictions.map_batches(
        PieceWriter, fn_constructor_kwargs={"attempt_uri": attempt_uri, "inputs": [s.identity() for s in todo]},
        batch_format="pyarrow", batch_size=None, compute=ActorPoolStrategy(size=1), num_cpus=TASK_CPUS)
    return sum(int(batch["rows"].sum()) for batch in written.iter_batches(batch_format="numpy"))

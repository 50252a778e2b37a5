"""The Ray Data stages that predict: tokenize (CPU actors) and score (model actors).

Each predictor call takes a large batch (``PREDICT_BATCH_ROWS``) and scores it with
:class:`bertray.scoring.Scorer`: rows ordered by token length, micro-batches of
``batch_size`` rows padded only to their own longest row, the original order restored. The
forward pass is the backend chosen on the driver (:func:`bertray.export.choose`): torch with
the weights in the AMP dtype, or an ONNX Runtime session. The model loads once per actor;
it gets the node's cores divided by the predictors.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertray.config import PredictConfig
from bertray.data import TASK_CPUS, Tokenize
from bertray.pieces import PieceWriter, Source
from bertray.scoring import IDS, TYPES, Backend

PREDICT_BATCH_ROWS = 4096
"""Rows per predictor call: the window sorted by length, then cut into micro-batches."""
TOKENIZE_BATCH_ROWS = 4096


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
    """Ray Data callable class: one model per actor (:class:`bertray.scoring.Scorer` over the
    chosen backend); appends the problem type's output columns."""

    def __init__(self, model_path: str, backend: Backend, batch_size: int, pad_id: int, top_k: int | None,
                 all_scores: bool, threads: int | None, num_predictors: int, use_gpu: bool,
                 trust_remote_code: bool = False, threshold: float | None = None):
        import torch
        from transformers import AutoConfig

        from bertray.problem import from_model_config
        from bertray.scoring import Scorer, default_threads, make_runner
        from bertray.tokenization import pad_multiple

        self.torch = torch
        runner = make_runner(model_path, backend, threads or default_threads(num_predictors), use_gpu,
                             trust_remote_code)
        self.scorer = Scorer(runner, batch_size, pad_id, pad_multiple("cuda" if use_gpu else "cpu"))
        # The problem type turns logits into scores and output columns (softmax + label,
        # sigmoid + labels at the threshold, or the raw value).
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.problem = from_model_config(config, threshold=threshold)
        self.top_k = min(top_k, self.problem.num_labels) if top_k else None
        self.all_scores = all_scores

    def probabilities(self, table: pa.Table) -> np.ndarray:
        """Scores ``(rows, labels)`` in the rows' own order: the problem type's (softmax,
        sigmoid, or the raw value). ``table``: ``input_ids`` (and ``token_type_ids``)."""
        logits = self.scorer.logits(table)
        if logits is None:
            return np.empty((0, self.problem.num_labels), dtype=np.float32)
        return self.problem.scores(self.torch.from_numpy(logits)).numpy()

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
        fn_constructor_kwargs={"model_path": model.path, "backend": model.backend.backend, "batch_size": cfg.batch_size,
                               "pad_id": model.pad_id, "top_k": cfg.top_k, "all_scores": cfg.all_scores,
                               "threads": cfg.torch_threads, "num_predictors": cfg.num_predictors,
                               "use_gpu": cfg.use_gpu, "trust_remote_code": cfg.model.trust_remote_code,
                               "threshold": cfg.threshold},
        batch_format="pyarrow", batch_size=PREDICT_BATCH_ROWS,
        compute=ActorPoolStrategy(size=cfg.num_predictors), num_cpus=cfg.predictor_cpus, **gpu)


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

"""Batch prediction and evaluation on Ray Data.

    python jobs/predict.py --config configs/predict.yaml model.path=outputs/sst2/model
    python jobs/evaluate.py --config configs/predict.yaml model.path=outputs/trec/model input=test.csv output=...

Steps, all streaming (nothing materializes the dataset):

1. Preflight (:mod:`.preflight`), on the driver, before Ray does any work: the output (it
   may replace only a previous bertray output; ``on_existing=error`` refuses any existing
   one), the model (a sequence classifier with safetensors weights; ``max_length`` defaults
   to the length it was trained with; the backend, from its ONNX export's record, see
   :mod:`bertray.export`), and every input file's Parquet footer: row counts,
   text/label columns present, text is strings (dictionary-encoded too).
2. Scan (:mod:`.scan`): Ray tasks of about a million rows each (one per file for CSV/JSONL)
   decode every page, keeping nothing, count null/empty texts and labels, and name any
   damaged file; in evaluate mode unknown or null labels fail here, with counts.
3. Predict (:mod:`.predictor`): ``read (tasks) -> tokenize (CPU actors) -> predict (actors)
   -> write pieces (one actor)``: each input file's predictions become a piece
   (:mod:`bertray.pieces`), and the files finished by an earlier run of the same command are
   skipped; every task asks for a fraction of a CPU.
4. Move the pieces into a staging directory in input order, verify rows out = rows in, write
   the metrics, the run report (:mod:`bertray.report`) and the summary (:mod:`.output`),
   commit (:mod:`bertray.storage`), delete the pieces.

Nightly predict reads Parquet (a file, a directory with hive partitions kept, or a glob;
local or object store); evaluate also reads CSV and JSONL. Text and label columns must be
stored in the files (not hive keys). Null and empty texts are still scored, so rows in =
rows out: a null text reaches the tokenizer as ``""`` (the model sees ``[CLS] [SEP]``) but
the text column is written back unchanged (still null); ``null_texts`` and ``empty_texts``
(null, empty or whitespace only) are counted in the summary.

Nightly-safe output. ``{date}`` in ``output`` becomes ``date`` (default: today on the
driver, YYYY-MM-DD). The output appears complete or not at all, and a failed run leaves the
previous output as it was (see :mod:`bertray.storage` for object stores and leftovers of
killed runs). On a multi-node cluster, local input and output paths must be on a filesystem
every node mounts at the same path (NFS, a shared volume): read and write tasks run on any
node, the commit on the driver. Otherwise use an object store.
"""

# The jobs live in .job and are loaded on first use: Ray workers import this package to reach
# their stage (scan tasks, the tokenizer and piece-writer actors), and must not pay for the
# driver's imports (torch, transformers, scipy) each time a worker process starts.
_EXPORTS = {"CONFUSION_PNG", "METRICS_FILE", "SUCCESS_FILE", "OutputError", "OutputExistsError", "PredictError",
            "evaluate", "run"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from bertray.predict import job

        return getattr(job, name)
    raise AttributeError(f"module 'bertray.predict' has no attribute {name!r}")

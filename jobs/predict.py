"""Batch prediction (and evaluation) with a trained classifier on Ray Data.

    python jobs/predict.py --config configs/predict.yaml model.path=outputs/sst2/model
    python jobs/predict.py --config configs/predict.yaml model.path=... date=2024-06-01   # backfill a day
    python jobs/predict.py --config configs/predict.yaml model.path=models:/sst2@champion  # MLflow registry
    ray job submit --working-dir . -- python jobs/predict.py --config configs/predict.yaml model.path=/shared/model

Writes <output>/*.parquet (the input columns + prediction, score), <output>/_report.json and
_report.png (prediction distribution, scores, PSI against the training labels and the previous
run) and <output>/_SUCCESS (the run summary, JSON); with label_column set also
<output>/_metrics.json and a plot. The output appears complete or not at all (row counts
checked, renamed into place), and replaces only an earlier bertray output. A rerun of the same
command after a failure reuses the input files already predicted. Exit status: 0 done, 1 bad
input/model/output, 2 bad config (max_length above the model's too), 3 done but a
report.max_* threshold was crossed (drift or low confidence; the output is committed).
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from an unpacked copy of the repo where
# bertray may not be pip-installed; the repo root makes it importable (workers get the
# working dir on their path from Ray).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray.cli import main  # noqa: E402
from bertray.config import PredictConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(__doc__, PredictConfig, "bertray.predict:run"))

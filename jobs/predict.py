"""Batch prediction (and evaluation) with a trained classifier on Ray Data.

    python jobs/predict.py --config configs/predict.yaml model.path=outputs/sst2/model
    python jobs/predict.py --config configs/predict.yaml model.path=... date=2024-06-01   # backfill a day
    ray job submit --working-dir . -- python jobs/predict.py --config configs/predict.yaml model.path=/shared/model

Writes <output>/*.parquet (the input columns + prediction, score) and <output>/_SUCCESS (the
run summary, JSON); with label_column set also <output>/_metrics.json and
_confusion_matrix.png. The output appears complete or not at all (written to a temp dir,
row counts checked, renamed into place), and replaces only an earlier bertray output. Exit
status: 0 done, 1 bad input/model/output, 2 bad config (max_length above the model's too).
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

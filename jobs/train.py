"""Fine-tune a BERT-family text classifier on Ray Train.

    python jobs/train.py --config configs/sst2.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/sst2.yaml output_dir=/shared/run1

Writes <output_dir>/model (Hugging Face format), metrics.json and tensorboard/; with
tracking.mlflow_uri (or MLFLOW_TRACKING_URI) also an MLflow run, and with
tracking.register_as=<name> a registered model version for predict's model.path=models:/<name>@<alias>.
Re-running the same command resumes from the latest checkpoint; another config in the same
output_dir is refused (fresh_start=true starts over).
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from an unpacked copy of the repo where
# bertray may not be pip-installed; the repo root makes it importable (workers get the
# working dir on their path from Ray).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray.cli import main  # noqa: E402
from bertray.config import RunConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(__doc__, RunConfig, "bertray.train:run"))

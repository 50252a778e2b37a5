"""Hyperparameter search (ASHA) over the training job on Ray Tune.

    python jobs/tune.py --config configs/tune_sst2.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_sst2.yaml output_dir=/shared/tune1

Writes <output_dir>/results.csv, best_config.yaml, best_model/ and tune_curves.png.
An interrupted search resumes only with tune.resume=true (Ray unpickles its tuner.pkl: trust the storage).
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
    sys.exit(main(__doc__, RunConfig, "bertray.tune:run"))

"""Fine-tune a BERT-family text classifier on Ray Train.

    python jobs/train.py --config configs/sst2.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/sst2.yaml output_dir=/shared/run1

Writes <output_dir>/model (Hugging Face format), metrics.json and tensorboard/.
Re-running the same command with the same output_dir resumes from the latest checkpoint.
"""

import argparse
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from an unpacked copy of the repo where
# bertray may not be pip-installed; the repo root makes it importable (workers get the
# working dir on their path from Ray).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray.config import ConfigError, RunConfig, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, RunConfig)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bertray.train import run  # imports Ray only after the config is valid

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

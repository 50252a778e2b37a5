"""Evaluate a trained classifier on labelled data (Parquet, CSV or JSONL): predictions plus metrics.

    python jobs/evaluate.py --config configs/predict.yaml model.path=outputs/trec/model \\
        'input={data_root}/trec/test.parquet' output=outputs/eval/trec

jobs/predict.py with label_column set (default here: label), reading every format training
reads (predict reads Parquet only). Writes the predictions (Parquet),
<output>/_metrics.json (the metrics of the model's problem type: accuracy, F1, per class
and confusion matrix; multi-label F1 micro/macro/samples at the threshold; regression MSE,
Pearson, Spearman ...) and a plot (_confusion_matrix.png, _label_f1.png or _scatter.png),
and prints the summary with the full metrics. Pairs: text_pair_column=<column>. Exit status: 0 done, 1 bad input/model/output, 2 bad config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray.cli import main  # noqa: E402
from bertray.config import PredictConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(__doc__, PredictConfig, "bertray.predict:evaluate"))

"""Export a trained classifier to ONNX (fp32 and int8) and measure each way of scoring it.

    python jobs/export.py --config configs/export.yaml model.path=outputs/sst2/model

Writes <model>/onnx/model.onnx, <model>/onnx/model_quantized.onnx and <model>/onnx/export.json
(rows/s of torch and ONNX Runtime on this machine, and how often each agrees with exact fp32
on held-out rows). jobs/predict.py's backend=auto then runs the fastest way within the
exactness budget. Needs pip install -e ".[onnx]". Exit status: 0 done, 1 bad model/input,
2 bad config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray.cli import main  # noqa: E402
from bertray.config import ExportConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(__doc__, ExportConfig, "bertray.export:run"))

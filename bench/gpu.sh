#!/usr/bin/env bash
# The GPU checks, in one run on a machine with one CUDA GPU (about 10 minutes on an H100/H200):
#   bash bench/gpu.sh            # results in bench/results/train_gpu_ways.json and predict_gpu.json
# 1. training, BERT-base shape (random weights, MiniLM's uncased vocabulary), 20,000 SST-2 rows,
#    batch 64, bf16: Trainer at its best against bertray padded, padding-free, compiled, both;
# 2. prediction with use_gpu=true on 100,000 SST-2 rows (the rate once running is in its stages).
# Needs the full data sets ($BERTRAY_DATA_ROOT) and `pip install -e ".[bench]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${BERT_BASE_DIR:-/tmp/bertray-bert-base-shape}"
if [ ! -f "$model/config.json" ]; then
  python - "$model" <<'EOF'
import shutil, sys
from pathlib import Path
from transformers import BertConfig, BertForSequenceClassification
from bertray.modeling import resolve_model_path
out, minilm = Path(sys.argv[1]), Path(resolve_model_path("default"))
BertForSequenceClassification(BertConfig(num_labels=2)).save_pretrained(out)  # BERT-base's shape
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (minilm / name).is_file():
        shutil.copy(minilm / name, out / name)
EOF
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python bench/train.py --gpu --model "$model" --rows 20000 --batch-size 64 \
  --ways best bertray bertray+padding_free bertray+compile bertray+padding_free+compile
python bench/predict.py --rows 100000 --no-export --skip-pipeline --set use_gpu=true \
  --cpus "$(nproc)" --results bench/results/predict_gpu.json

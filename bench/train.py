"""Training speed: bertray's job vs the plain Hugging Face Trainer, same data, one run.

    python bench/train.py                  # 4,000 SST-2 training rows, max_length 128, 1 epoch
    python bench/train.py --rows 1000      # quicker

Three runs, each in its own process (so peak memory is its own), evaluated on the full SST-2
validation set (872 rows):
  1. Trainer as a user would write it: padding to max_length, fp32, batch 16;
  2. Trainer at its best: bf16, dynamic padding, group_by_length, batch 32;
  3. bertray (jobs/train.py path, configs/sst2.yaml, 1 worker, bf16 auto, batch 32).
Training samples/s excludes start-up (model load, Ray start). Results go to
bench/results/train.json. Needs `pip install -e ".[bench]"` (accelerate, for Trainer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BERTRAY_DATA_ROOT", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS  # noqa: E402


def run_trainer(rows: int, max_length: int, best: bool) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from bertray.modeling import load_classifier, load_tokenizer

    torch.set_num_threads(os.cpu_count())
    tok = load_tokenizer("default")
    model = load_classifier("default", {"0": 0, "1": 1}, {0: "0", 1: "1"})
    train = pd.read_parquet(DATA / "sst2" / "train.parquet").head(rows)
    val = pd.read_parquet(DATA / "sst2" / "validation.parquet")

    def encode(df):
        padding = False if best else "max_length"
        enc = tok(df["text"].tolist(), truncation=True, max_length=max_length, padding=padding)
        return Dataset.from_dict({**enc, "labels": df["label"].tolist()})

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=1, per_device_train_batch_size=32 if best else 16,
            per_device_eval_batch_size=64, learning_rate=1e-4 if best else 5e-5, warmup_steps=0.06 if best else 0,
            bf16=best, train_sampling_strategy="group_by_length" if best else "random", save_strategy="no", report_to=[], logging_steps=50,
            use_cpu=True, seed=42, dataloader_num_workers=0)
        # Dynamic padding without pad_to_multiple_of: on CPU rounding up to 8 only adds tokens
        # (~10% of the step time on SST-2), so Trainer at its best leaves it off, as bertray does.
        trainer = Trainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(val),
                          data_collator=DataCollatorWithPadding(tok) if best else None,
                          compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
        with PeakRSS() as mem:
            start = time.perf_counter()
            metrics = trainer.train().metrics
            train_s = time.perf_counter() - start
            acc = trainer.evaluate()["eval_accuracy"]
    return {"train_samples_per_s": rows / train_s, "train_seconds": train_s, "accuracy": acc,
            "peak_rss_mb": mem.peak / 2**20, "trainer_reported_samples_per_s": metrics["train_samples_per_second"]}


def run_bertray(rows: int, max_length: int) -> dict:
    import ray

    from bertray.config import load_config
    from bertray.train import run

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(ROOT / "configs" / "sst2.yaml", [f"data.max_train_rows={rows}", f"train.max_length={max_length}",
                                                           "train.epochs=1", f"output_dir={out}", f"data.root={DATA}"])
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with PeakRSS() as mem:
            start = time.perf_counter()
            result = run(cfg)
            wall = time.perf_counter() - start
        ray.shutdown()
    record = result.history[0]
    return {"train_samples_per_s": record["train_samples_per_s"], "train_seconds": rows / record["train_samples_per_s"],
            "accuracy": record["accuracy"], "peak_rss_mb": mem.peak / 2**20, "wall_seconds_with_ray_start": wall}


def measure(kind: str, rows: int, max_length: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--rows", str(rows), "--max-length", str(max_length)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--worker", choices=["plain", "best", "bertray"])
    args = parser.parse_args()
    if args.worker:
        fn = {"plain": lambda: run_trainer(args.rows, args.max_length, best=False),
              "best": lambda: run_trainer(args.rows, args.max_length, best=True),
              "bertray": lambda: run_bertray(args.rows, args.max_length)}[args.worker]
        print(json.dumps(fn()))
        return
    results = {k: measure(k, args.rows, args.max_length) for k in ("plain", "best", "bertray")}
    names = {"plain": "HF Trainer, pad to max_length, fp32, bs16", "best": "HF Trainer, bf16, dynamic pad, group_by_length",
             "bertray": "bertray jobs/train.py (Ray Train, 1 worker)"}
    print(f"\nTraining, {args.rows:,} SST-2 rows, max_length {args.max_length}, 1 epoch, {os.cpu_count()} CPUs")
    print(f"{'way':<50}{'samples/s':>11}{'train s':>9}{'val acc':>9}{'peak RSS MB':>13}{'vs plain':>10}")
    for k, r in results.items():
        ratio = r["train_samples_per_s"] / results["plain"]["train_samples_per_s"]
        print(f"{names[k]:<50}{r['train_samples_per_s']:>11.1f}{r['train_seconds']:>9.1f}{r['accuracy']:>9.4f}"
              f"{r['peak_rss_mb']:>13,.0f}{ratio:>9.2f}x")
    print("\ntargets: bertray >= 8x plain at accuracy no more than 1 point lower; not slower than Trainer at its best")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps({"rows": args.rows, "max_length": args.max_length, **results}, indent=2))


if __name__ == "__main__":
    main()

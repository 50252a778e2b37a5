"""Training speed: bertray's job vs the plain Hugging Face Trainer, same data, one run.

    python bench/train.py                  # 4,000 SST-2 training rows, max_length 128, 1 epoch
    python bench/train.py --rows 1000      # quicker
    python bench/train.py --gpu --model bert-base-uncased --rows 20000 --batch-size 64   # one GPU, AMP
    python bench/train.py --ways best bertray bertray+padding_free bertray+compile   # bertray's options

Three runs, each in its own process (so peak memory is its own), evaluated on the full SST-2
validation set (872 rows):
  1. Trainer as a user would write it: padding to max_length, fp32, batch 16;
  2. Trainer at its best: bf16, dynamic padding, group_by_length, batch 32;
  3. bertray (jobs/train.py path, configs/sst2.yaml, 1 worker, bf16 auto, batch 32);
     with --ways, also bertray with train.padding_free and/or train.torch_compile (the epoch's
     samples/s then includes compiling, as a user's run does).
Training samples/s excludes start-up (model load, Ray start). Results go to
bench/results/train.json (with --gpu: train_gpu.json; with other --ways: train_ways.json). Needs `pip install -e ".[bench]"`
(accelerate, for Trainer).

With --gpu every way trains on the GPU, the best Trainer and bertray in bf16; Trainer at its
best then also pads to a multiple of 8 (tensor cores) and loads batches in 2 worker processes.
--model takes any HF id or model directory (default: the pip-shipped MiniLM).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, full_data_root  # noqa: E402

DATA = full_data_root()


def run_trainer(args, best: bool) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from bertray.modeling import load_classifier, load_tokenizer

    torch.set_num_threads(os.cpu_count())
    tok = load_tokenizer(args.model)
    model = load_classifier(args.model, {"0": 0, "1": 1}, {0: "0", 1: "1"})
    train = pd.read_parquet(DATA / "sst2" / "train.parquet").head(args.rows)
    val = pd.read_parquet(DATA / "sst2" / "validation.parquet")

    def encode(df):  # a list of feature dicts is a map-style dataset to Trainer (and group_by_length)
        padding = False if best else "max_length"
        enc = tok(df["text"].tolist(), truncation=True, max_length=args.max_length, padding=padding)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": int(y)} for i, y in enumerate(df["label"])]

    # Dynamic padding: on CPU without pad_to_multiple_of (rounding up to 8 only adds tokens,
    # ~10% of the step time on SST-2), as bertray does; on GPU to a multiple of 8 (tensor cores).
    collator = DataCollatorWithPadding(tok, pad_to_multiple_of=8 if args.gpu else None) if best else None
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, num_train_epochs=1, per_device_train_batch_size=args.batch_size if best else 16,
            per_device_eval_batch_size=64, learning_rate=1e-4 if best else 5e-5, warmup_steps=0.06 if best else 0,
            bf16=best, train_sampling_strategy="group_by_length" if best else "random", save_strategy="no",
            report_to=[], logging_steps=50, use_cpu=not args.gpu, seed=42,
            dataloader_num_workers=2 if best and args.gpu else 0)
        trainer = Trainer(model=model, args=targs, train_dataset=encode(train), eval_dataset=encode(val),
                          data_collator=collator,
                          compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
        with PeakRSS() as mem:
            start = time.perf_counter()
            metrics = trainer.train().metrics
            train_s = time.perf_counter() - start
            acc = trainer.evaluate()["eval_accuracy"]
    return {"train_samples_per_s": args.rows / train_s, "train_seconds": train_s, "accuracy": acc,
            "peak_rss_mb": mem.peak / 2**20, "trainer_reported_samples_per_s": metrics["train_samples_per_second"]}


BERTRAY_WAYS = {
    "bertray": [],
    "bertray+padding_free": ["train.padding_free=true"],
    "bertray+compile": ["train.torch_compile=true"],
    "bertray+padding_free+compile": ["train.padding_free=true", "train.torch_compile=true"],
}
WAYS = ["plain", "best", *BERTRAY_WAYS]


def run_bertray(args) -> dict:
    import ray

    from bertray.config_loader import load_config
    from bertray.train import run

    overrides = [f"data.max_train_rows={args.rows}", f"train.max_length={args.max_length}", "train.epochs=1",
                 f"train.batch_size={args.batch_size}", f"model.name={args.model}", f"data.root={DATA}",
                 *BERTRAY_WAYS[args.worker]]
    if args.gpu:
        overrides += ["scaling.use_gpu=true", "train.amp=bf16"]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(ROOT / "configs" / "sst2.yaml", [*overrides, f"output_dir={out}"])
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with PeakRSS() as mem:
            start = time.perf_counter()
            result = run(cfg)
            wall = time.perf_counter() - start
        ray.shutdown()
    record = result.history[0]
    return {"train_samples_per_s": record["train_samples_per_s"], "train_seconds": args.rows / record["train_samples_per_s"],
            "accuracy": record["accuracy"], "peak_rss_mb": mem.peak / 2**20, "wall_seconds_with_ray_start": wall}


def measure(kind: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, *argv], capture_output=True, text=True)
    if proc.returncode:
        print(f"{kind} failed:\n{proc.stderr[-4000:]}", file=sys.stderr, flush=True)
        return {"error": proc.stderr[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="Trainer at its best and bertray (plain: 16)")
    parser.add_argument("--model", default="default", help="HF id or model directory (default: the pip-shipped MiniLM)")
    parser.add_argument("--gpu", action="store_true", help="train on one CUDA GPU")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=["plain", "best", "bertray"],
                        help="the ways to run, each in its own process (plain is the ratios' base)")
    parser.add_argument("--worker", choices=WAYS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_bertray(args) if args.worker in BERTRAY_WAYS
                         else run_trainer(args, best=args.worker == "best")))
        return
    device = "1 GPU" if args.gpu else f"{os.cpu_count()} CPUs"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = ("train_gpu" if args.gpu else "train") + ("" if args.ways == ["plain", "best", "bertray"] else "_ways")
    record = {"model": args.model, "rows": args.rows, "max_length": args.max_length, "batch_size": args.batch_size,
              "device": device, "ways": args.ways}
    results = {}
    for way in args.ways:  # each way's result is written as it lands: a run cut short keeps the ways it finished
        results[way] = measure(way, sys.argv[1:])
        print(f"{way}: {'failed' if 'error' in results[way] else json.dumps(results[way])}", flush=True)
        (out / f"{name}.json").write_text(json.dumps({**record, **results}, indent=2))
    print_table(args, {k: r for k, r in results.items() if "error" not in r}, device)
    failed = [k for k, r in results.items() if "error" in r]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (the others' results are in {out / name}.json)")


def print_table(args, results: dict, device: str) -> None:
    if not results:
        return
    names = {"plain": "HF Trainer, pad to max_length, fp32, bs16",
             "best": f"HF Trainer, bf16, dynamic pad, group_by_length, bs{args.batch_size}",
             **{k: f"{k} (1 worker), bs{args.batch_size}" for k in BERTRAY_WAYS}}
    base_way = next(iter(results))
    base = results[base_way]["train_samples_per_s"]
    print(f"\nTraining {args.model}, {args.rows:,} SST-2 rows, max_length {args.max_length}, 1 epoch, {device}")
    print(f"{'way':<58}{'samples/s':>11}{'train s':>9}{'val acc':>9}{'peak RSS MB':>13}{'vs ' + base_way:>16}")
    for k, r in results.items():
        ratio = r["train_samples_per_s"] / base
        print(f"{names[k]:<58}{r['train_samples_per_s']:>11.1f}{r['train_seconds']:>9.1f}{r['accuracy']:>9.4f}"
              f"{r['peak_rss_mb']:>13,.0f}{ratio:>15.2f}x")
    if {"plain", "best", "bertray"} <= set(results):
        print("\ntargets: bertray >= 8x plain at accuracy no more than 1 point lower; not slower than Trainer at its best")


if __name__ == "__main__":
    main()

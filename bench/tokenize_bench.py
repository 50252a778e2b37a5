"""Tokenization throughput and memory: bertray's Ray Data pipeline vs the plain datasets.map way.

    python bench/tokenize_bench.py                 # 500,000 rows (SST-2 repeated), max_length 128
    python bench/tokenize_bench.py --rows 100000   # quicker

Each measurement runs in its own process so peak memory is its own. Peak RSS for bertray is the
driver plus every Ray worker process (ray::*), sampled every 0.1 s; Ray's fixed daemons (GCS,
raylet, dashboard) are left out of both sides. Results are printed as a table and saved to
bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, full_data_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = full_data_root()


def make_corpus(rows: int, folder: Path) -> list[str]:
    """SST-2 train repeated to ``rows`` rows, as 8 Parquet files."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("part-*.parquet"))
    if files:
        return [str(f) for f in files]
    base = pd.read_parquet(DATA / "sst2" / "train.parquet")[["text", "label"]]
    df = pd.concat([base] * (rows // len(base) + 1), ignore_index=True).iloc[:rows]
    for i, part in enumerate(range(0, rows, -(-rows // 8))):
        df.iloc[part:part + -(-rows // 8)].to_parquet(folder / f"part-{i}.parquet", index=False)
    return [str(f) for f in sorted(folder.glob("part-*.parquet"))]


def run_bertray(files: list[str], max_length: int) -> dict:
    import ray

    from bertray.config import DataConfig
    from bertray.data import read_table, tokenize_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataConfig(num_tokenizer_actors=2, tokenizer_actor_cpus=0.75, length_bucketing=True)
    ds = tokenize_dataset(read_table(files[0].rsplit("/", 1)[0]), "default", max_length, label2id=None, cfg=cfg)
    with PeakRSS() as mem:
        start = time.perf_counter()
        rows = sum(b.num_rows for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow"))
        seconds = time.perf_counter() - start
    ray.shutdown()
    return {"rows": rows, "seconds": seconds, "peak_rss_mb": mem.peak / 2**20}


def run_plain(files: list[str], max_length: int) -> dict:
    import tempfile

    import datasets

    from bertray.modeling import load_tokenizer

    tok = load_tokenizer("default")
    with tempfile.TemporaryDirectory() as cache, PeakRSS() as mem:
        start = time.perf_counter()
        ds = datasets.Dataset.from_parquet(files, cache_dir=cache)
        ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True,
                    remove_columns=["text"])
        rows = len(ds)
        seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "peak_rss_mb": mem.peak / 2**20}


def measure(kind: str, rows: int, max_length: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--rows", str(rows), "--max-length", str(max_length)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--worker", choices=["bertray", "plain"])
    args = parser.parse_args()
    folder = Path("/tmp/bertray-bench") / f"sst2x{args.rows}"
    if args.worker:
        files = make_corpus(args.rows, folder)
        fn = run_bertray if args.worker == "bertray" else run_plain
        print(json.dumps(fn(files, args.max_length)))
        return
    make_corpus(args.rows, folder)
    make_corpus(args.rows // 5, Path("/tmp/bertray-bench") / f"sst2x{args.rows // 5}")
    plain = measure("plain", args.rows, args.max_length)
    ours = measure("bertray", args.rows, args.max_length)
    small = measure("bertray", args.rows // 5, args.max_length)
    rate = {k: v["rows"] / v["seconds"] for k, v in (("plain", plain), ("bertray", ours))}
    print(f"\nTokenization, {args.rows:,} rows, max_length {args.max_length}, {os.cpu_count()} CPUs")
    print(f"{'way':<40}{'rows':>10}{'seconds':>10}{'rows/s':>12}{'peak RSS MB':>14}")
    print(f"{'datasets.Dataset.map(batched=True)':<40}{plain['rows']:>10,}{plain['seconds']:>10.1f}{rate['plain']:>12,.0f}{plain['peak_rss_mb']:>14,.0f}")
    print(f"{'bertray (Ray Data, 2 tokenizer actors)':<40}{ours['rows']:>10,}{ours['seconds']:>10.1f}{rate['bertray']:>12,.0f}{ours['peak_rss_mb']:>14,.0f}")
    print(f"{'bertray, 1/5 of the rows':<40}{small['rows']:>10,}{small['seconds']:>10.1f}{small['rows'] / small['seconds']:>12,.0f}{small['peak_rss_mb']:>14,.0f}")
    speedup = rate["bertray"] / rate["plain"]
    growth = ours["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"\nspeed-up vs plain: {speedup:.2f}x (target >= 1.7x)")
    print(f"peak RSS at 5x rows / 1x rows: {growth:.2f} (target < 1.3)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenize.json").write_text(json.dumps(
        {"rows": args.rows, "max_length": args.max_length, "plain": plain, "bertray": ours, "bertray_fifth": small,
         "speedup": speedup, "rss_growth_5x": growth}, indent=2))


if __name__ == "__main__":
    main()

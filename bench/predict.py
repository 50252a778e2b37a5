"""Batch prediction throughput: bertray (Ray Data) vs transformers.pipeline, same rows, same model.

    python bench/predict.py --model outputs/sst2-full/model      # 40,000 and 100,000 SST-2 rows (half an hour)
    python bench/predict.py --rows 2000 --skip-pipeline          # quick check that it works
    python bench/predict.py --rows 100000 --no-export            # the torch path only
    python bench/predict.py --free-model --rows 100000 --growth --skip-pipeline --no-export   # the pipeline's ceiling

First the model is exported (``jobs/export.py`` on a copy of it, timed on its own: a
once-per-model step), measured on ``--held-out`` rows (default: SST-2 validation), so
predict's default ``backend=auto`` runs the fastest way that meets the exactness budget; the
table of every way (rows/s, labels equal to exact fp32, accuracy) is printed. For exactness
figures that mean something, pass a fine-tuned ``--model``.

Rows: SST-2 train (67,349 real sentences) repeated up to ``--rows``, written as Parquet.
Both contenders read that Parquet and write the same Parquet (input columns + prediction,
score); both timings include loading the model, reading and writing.

* bertray: ``bertray.predict.run`` in-process after ``ray.init(num_cpus=--cpus)`` (default 2), with
  configs/predict.yaml (backend=auto, amp=auto) and ``--batch-size``. The
  cluster start is not timed; the preflight, the scan, actor start-up, tokenization,
  inference, writing, the row-count check and the commit are.
* pipeline: ``transformers.pipeline("text-classification", model=DIR, batch_size=64)`` over
  the texts in input order, fp32, truncation to the same ``max_length``.

Each runs in its own subprocess; the parent samples memory over that subprocess's whole
process tree every 0.2 s (for bertray: driver, GCS, raylet and every Ray worker). ``peak RSS``
sums RSS over the tree (shared library pages counted once per process, so it overstates a
multi-process run); ``peak USS`` sums unique pages only. ``--growth`` runs bertray again on
a tenth of the largest ``--rows`` and reports peak(rows)/peak(rows/10): a
streaming pipeline stays near 1; materializing would grow ~10x.

Without ``--model`` a classifier is built in a temp dir: the pip-shipped MiniLM-L6 with a
fresh 2-label head (seeded). Its predictions are meaningless but its cost per row is exactly
that of a fine-tuned MiniLM, which is what is measured.

Prints tables and writes bench/results/predict.json (appending to docs/benchmarks.md is manual).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- setup


def data_root() -> Path:
    from _common import full_data_root

    return full_data_root()


def make_input(rows: int, directory: Path, rows_per_file: int = 12_500) -> Path:
    """SST-2 train repeated to ``rows`` rows, in files of ``rows_per_file`` rows."""
    import numpy as np
    import pyarrow.parquet as pq

    source = pq.read_table(data_root() / "sst2" / "train.parquet", columns=["text", "label"])
    table = source.take(np.resize(np.arange(source.num_rows), rows))
    directory.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, rows, rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), directory / f"part-{i:04d}.parquet")
    return directory


def quick_classifier(directory: Path) -> Path:
    """MiniLM-L6 with a seeded, untrained 2-label head (same cost per row as a fine-tuned one)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bertray.modeling import resolve_model_path

    base = resolve_model_path("default")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, use_safetensors=True)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    return directory


def free_classifier(directory: Path) -> Path:
    """A 1-layer, 32-wide BERT with MiniLM's tokenizer: its forward pass costs almost nothing, so
    the rows/s it gets is the ceiling that reading, tokenizing, Ray Data and writing set on this
    host (what a night on a fast enough accelerator can reach at most)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bertray.modeling import resolve_model_path

    base = resolve_model_path("default")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=AutoTokenizer.from_pretrained(base).vocab_size, hidden_size=32,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- contenders (subprocesses)


def run_bertray(args) -> dict:
    import ray

    from bertray.config import PredictConfig
    from bertray.config_loader import load_config
    from bertray.predict import run

    # address="local": always a private cluster, never one a `ray start` left running
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(ROOT / "configs" / "predict.yaml", [f"model.path={args.model}", f"input={args.input}", f"output={args.output}",
                             f"max_length={args.max_length}", f"batch_size={args.batch_size}",
                             *args.overrides], PredictConfig)
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"seconds": seconds, "rows": summary["rows_out"], "stage_seconds": summary["stage_seconds"],
            "backend": summary["backend"]}


def run_pipeline(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import pipeline

    start = time.perf_counter()
    pipe = pipeline("text-classification", model=args.model, batch_size=64, device=-1)
    table = pq.read_table(args.input)
    results = pipe(table.column("text").to_pylist(), truncation=True, max_length=args.max_length)
    table = table.append_column("prediction", pa.array([r["label"] for r in results], pa.string()))
    table = table.append_column("score", pa.array([r["score"] for r in results], pa.float32()))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(args.output) / "part-0.parquet")
    return {"seconds": time.perf_counter() - start, "rows": table.num_rows}


# ----------------------------------------------------------------------------- measurement


def _psutil():
    try:
        import psutil
    except ImportError:  # not a bertray dependency, but Ray vendors it and puts it on sys.path
        import ray  # noqa: F401

        psutil = importlib.import_module("psutil")
    return psutil


def measure(which: str, model: Path, inp: Path, out: Path, args) -> dict:
    """Run one contender in a subprocess and sample memory over its process tree."""
    psutil = _psutil()

    cmd = [sys.executable, __file__, "--worker", which, "--model", str(model), "--input", str(inp),
           "--output", str(out), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--cpus", str(args.cpus),
           *[f"--set={o}" for o in args.overrides]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak = {"rss": 0, "uss": 0}
    done = threading.Event()

    def sample() -> None:
        # RSS (cheap: /proc/<pid>/statm) every 0.2 s; USS (walks page tables) every 2 s, so the
        # sampler itself takes little CPU from the 2 cores being measured.
        root = psutil.Process(proc.pid)
        tick = 0
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = uss = 0
            for p in procs:
                try:
                    if tick % 10 == 0:
                        info = p.memory_full_info()
                        uss += info.uss
                    else:
                        info = p.memory_info()
                    rss += info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak["rss"] = max(peak["rss"], rss)
            if tick % 10 == 0:
                peak["uss"] = max(peak["uss"], uss)
            tick += 1
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode}); see its output above")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(rows_per_s=result["rows"] / result["seconds"], peak_rss_mib=peak["rss"] / 2**20,
                  peak_uss_mib=peak["uss"] / 2**20)
    return result


def agreement(a: Path, b: Path) -> float | None:
    """Share of rows where both outputs predict the same label (rows in input order in both)."""
    import pyarrow.parquet as pq

    pa_ = pq.read_table(a, columns=["text", "prediction"])
    pb = pq.read_table(b, columns=["text", "prediction"])
    if pa_.column("text") != pb.column("text"):
        return None
    same = [x == y for x, y in zip(pa_.column("prediction").to_pylist(), pb.column("prediction").to_pylist(),
                                   strict=True)]
    return sum(same) / max(len(same), 1)


def export_model(model: Path, directory: Path, args) -> tuple[Path, dict | None, float]:
    """A copy of ``model`` with its ONNX export (``jobs/export.py``); the record and the seconds it took."""
    import shutil

    if args.no_export:
        return model, None, 0.0
    copy = directory / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("onnx"))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--config", str(ROOT / "configs" / "export.yaml"),
                    f"model.path={copy}", f"input={args.held_out or data_root() / 'sst2' / 'validation.parquet'}",
                    f"max_length={args.max_length}", f"batch_size={args.batch_size}"], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    return copy, json.loads((copy / "onnx" / "export.json").read_text()), seconds


def compare(rows: int, model: Path, directory: Path, args) -> dict:
    """bertray (and the pipeline) on ``rows`` rows; memory growth against rows/10 when asked."""
    inp = make_input(rows, directory / f"input-{rows}")
    print(f"{rows} rows, model {model}, max_length {args.max_length}, {args.cpus} CPUs", flush=True)
    results = {"bertray": measure("bertray", model, inp, directory / f"out-bertray-{rows}", args)}
    print(f"bertray:  {results['bertray']['rows_per_s']:.1f} rows/s", flush=True)
    if not args.skip_pipeline:
        results["pipeline"] = measure("pipeline", model, inp, directory / f"out-pipeline-{rows}", args)
        print(f"pipeline: {results['pipeline']['rows_per_s']:.1f} rows/s", flush=True)
        results["agreement"] = agreement(directory / f"out-bertray-{rows}", directory / f"out-pipeline-{rows}")
    if args.growth:
        small_rows = rows // 10
        small = measure("bertray", model, make_input(small_rows, directory / f"input-{small_rows}"),
                        directory / f"out-small-{rows}", args)
        results["memory_growth"] = {
            "rows_small": small_rows, "peak_rss_mib_small": small["peak_rss_mib"],
            "peak_uss_mib_small": small["peak_uss_mib"], "seconds_small": small["seconds"],
            "rss_ratio": results["bertray"]["peak_rss_mib"] / small["peak_rss_mib"],
            "uss_ratio": results["bertray"]["peak_uss_mib"] / small["peak_uss_mib"],
            # throughput without the fixed start-up cost (actors, scan), from the two runs
            "marginal_rows_per_s": (rows - small_rows) / max(results["bertray"]["seconds"] - small["seconds"], 1e-9),
            # the same from the predict stage alone (actors, read, tokenize, score, write): no preflight or scan
            "marginal_predict_stage_rows_per_s": (rows - small_rows) / max(
                results["bertray"]["stage_seconds"]["predict"] - small["stage_seconds"]["predict"], 1e-9)}
    return results


def print_export(record: dict | None, seconds: float) -> None:
    if record is None:
        return
    print(f"\nexport (jobs/export.py, once per model): {seconds:.1f} s; every way on {record['check']['rows']} "
          f"held-out rows of {record['check']['input']}:")
    print("| way | rows/s | same label as fp32 | max score diff | accuracy | within budget |")
    print("|---|---:|---:|---:|---:|---|")
    for v in record["variants"]:
        metric = "-" if v["metric"] is None else f"{v['metric']:.4f}"
        print(f"| {v['name']}-{v['dtype']} | {v['rows_per_s']:.0f} | {v['agreement']:.2%} | "
              f"{v['max_score_diff']:.4f} | {metric} | {'yes' if v['meets_budget'] else 'no'} |")


def print_run(rows: int, results: dict) -> None:
    base = results.get("pipeline")
    print(f"\n{rows} rows, whole job (start-up included), Parquet in and out:")
    print("| contender | rows | seconds | rows/s | vs pipeline | peak RSS (MiB, tree sum) | peak USS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("bertray", "pipeline"):
        r = results.get(name)
        if r:
            ratio = f"{r['rows_per_s'] / base['rows_per_s']:.2f}x" if base else "-"
            print(f"| {name} | {r['rows']} | {r['seconds']:.1f} | {r['rows_per_s']:.1f} | {ratio} | "
                  f"{r['peak_rss_mib']:.0f} | {r['peak_uss_mib']:.0f} |")
    b = results["bertray"]
    print(f"bertray backend: {b['backend']['name']}-{b['backend']['dtype']}; stages (s): {b['stage_seconds']}")
    if results.get("agreement") is not None:
        print(f"same prediction as the pipeline (fp32) on {results['agreement']:.2%} of rows")
    growth = results.get("memory_growth")
    if growth:
        fixed = growth["seconds_small"] - growth["rows_small"] / growth["marginal_rows_per_s"]
        print(f"memory growth {growth['rows_small']} -> {rows} rows: peak RSS x{growth['rss_ratio']:.2f}, peak USS "
              f"x{growth['uss_ratio']:.2f}; marginal {growth['marginal_rows_per_s']:.1f} rows/s, start-up ~{fixed:.1f} s; "
              f"predict stage alone: marginal {growth['marginal_predict_stage_rows_per_s']:.1f} rows/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[40_000, 100_000])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="an HF sequence-classifier dir; default: MiniLM + fresh 2-label head")
    which.add_argument("--free-model", action="store_true",
                   help="a near-free 1-layer model instead: the ceiling the pipeline around the model sets")
    p.add_argument("--held-out", default=None, help="the export's check rows (default: full SST-2 validation)")
    p.add_argument("--no-export", action="store_true", help="no ONNX export: predict runs torch")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of bertray's private Ray cluster (GPUs: all found)")
    p.add_argument("--batch-size", type=int, default=128, help="bertray micro-batch rows (the pipeline uses 64)")
    p.add_argument("--growth", action="store_true", help="also run rows/10 of the largest size: memory growth")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra bertray predict override, e.g. --set backend=torch")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "predict.json"))
    p.add_argument("--worker", choices=["bertray", "pipeline"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = (run_bertray if args.worker == "bertray" else run_pipeline)(args)
        print(json.dumps(result))
        return 0

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        model = (Path(args.model).resolve() if args.model
                 else free_classifier(tmp / "free") if args.free_model else quick_classifier(tmp / "fresh"))
        model, record, export_seconds = export_model(model, tmp, args)
        growth, last = args.growth, max(args.rows)
        for rows in sorted(args.rows):
            args.growth = growth and rows == last
            runs[rows] = compare(rows, model, tmp, args)
    from bertray.export import cpu_name

    print_export(record, export_seconds)
    for rows, results in runs.items():
        print_run(rows, results)
    out = {"model": args.model or ("1-layer 32-wide BERT (--free-model)" if args.free_model
                                   else "MiniLM-L6 + fresh 2-label head"), "max_length": args.max_length,
           "batch_size": args.batch_size, "overrides": args.overrides, "cpus": args.cpus, "machine": cpu_name(),
           "export": record, "export_seconds": export_seconds, "runs": runs,
           "speedup": {rows: r["bertray"]["rows_per_s"] / r["pipeline"]["rows_per_s"]
                       for rows, r in runs.items() if "pipeline" in r},
           "date": time.strftime("%Y-%m-%d")}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one CPU forward pass of the predictor's model spends its time, and the matmuls' GFLOP/s.

    python bench/forward_profile.py                          # MiniLM, 128 rows x 16 tokens, bf16, all cores
    python bench/forward_profile.py --model <dir> --width 64 --dtype fp32

The model is loaded as predict's torch backend loads it (``bertray.scoring.TorchRunner``: weights
in the AMP dtype, the eager-attention switch for narrow batches); the rows are random token ids
of one width (SST-2 training phrases are ~16 tokens). Prints the forward's mean time, rows/s,
the top operators by self CPU time (torch.profiler), and the linear layers' arithmetic rate
(2 x tokens x in x out FLOPs each, over ``aten::addmm``'s self time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def linear_flops(model, tokens: int) -> float:
    import torch

    return sum(2.0 * tokens * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="HF id or directory (default: the pip-shipped MiniLM)")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--width", type=int, default=16, help="tokens per row")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=None, help="default: this process's cores")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch

    from bertray.modeling import resolve_model_path
    from bertray.scoring import TorchRunner, default_threads

    runner = TorchRunner(resolve_model_path(args.model), args.dtype, args.threads or default_threads())
    ids = torch.randint(1000, 20000, (args.rows, args.width))
    batch = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    for _ in range(5):
        runner.to_host([runner(batch)])
    start = time.perf_counter()
    for _ in range(args.repeats):
        runner.to_host([runner(batch)])
    seconds = (time.perf_counter() - start) / args.repeats
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            runner.to_host([runner(batch)])
    events = prof.key_averages()
    addmm = sum(e.self_cpu_time_total for e in events if e.key == "aten::addmm") / 1e6 / args.repeats
    flops = linear_flops(runner.model, args.rows * args.width)
    print(f"{args.model}, {args.rows} rows x {args.width} tokens, {args.dtype}, {torch.get_num_threads()} threads: "
          f"{seconds * 1000:.1f} ms a forward, {args.rows / seconds:,.0f} rows/s")
    print(events.table(sort_by="self_cpu_time_total", row_limit=10))
    print(f"linear layers: {flops / 1e9:.1f} GFLOP a forward; aten::addmm {addmm * 1000:.1f} ms "
          f"({flops / addmm / 1e9:.0f} GFLOP/s); the whole forward {flops / seconds / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()

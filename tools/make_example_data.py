"""Regenerate bertray/example_data/ (the small data shipped with the package) from the full sets.

    BERTRAY_DATA_ROOT=/path/to/shared/data python tools/make_example_data.py

The full sets are laid out as in bertray/example_data/README.md. Subsets keep the source's
row order: SST-2 takes its first rows (already in random order), so ``data.max_train_rows=N``
selects the same rows from the bundled data as from the full set; the other subsets are a
seeded sample, sorted back into source order. Output is Parquet with zstd, except the SMS spam
set, which stays the project's CSV example. Running it twice gives identical files.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bertray" / "example_data"
SEED = 20
# relative path -> rows kept (None: the whole file). The SST-2 train size covers the quickstart
# (data.max_train_rows: 8000) and tests that read 3 predictor batches of 4,096 rows.
SUBSETS: dict[str, int | None] = {
    "sst2/train.parquet": 16_384,
    "sst2/validation.parquet": None,
    "trec/train.parquet": None,
    "trec/test.parquet": None,
    "sms_spam/sms_spam.csv": None,
    "mrpc/train.parquet": 1_000,
    "mrpc/validation.parquet": 400,
    "stsb/train.parquet": 1_500,
    "goemotions/train.parquet": 5_000,
    "goemotions/validation.parquet": 1_000,
}
HEAD = {"sst2/train.parquet"}


def subset(table: pa.Table, rows: int | None, head: bool, seed: int) -> pa.Table:
    """``rows`` rows of ``table``: the first ones, or a seeded sample in source order."""
    if rows is None or rows >= table.num_rows:
        return table
    if head:
        return table.slice(0, rows)
    keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=rows, replace=False))
    return table.take(keep)


def main() -> int:
    source = os.environ.get("BERTRAY_DATA_ROOT")
    if not source or not Path(source, "sst2", "train.parquet").is_file():
        print("set BERTRAY_DATA_ROOT to the folder with the full sets (sst2/, trec/, ...)", file=sys.stderr)
        return 2
    src = Path(source).resolve()
    if src == OUT.resolve():
        print("BERTRAY_DATA_ROOT points at the bundled data itself; point it at the full sets", file=sys.stderr)
        return 2
    for rel, rows in SUBSETS.items():
        dst = OUT / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".csv"):
            shutil.copyfile(src / rel, dst)
            continue
        table = subset(pq.read_table(src / rel), rows, rel in HEAD, SEED)
        pq.write_table(table, dst, compression="zstd", compression_level=9)
        print(f"{rel}: {table.num_rows} rows, {dst.stat().st_size / 1e3:.0f} kB")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

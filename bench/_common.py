"""Shared by the benchmarks: the full data sets, and peak memory of a process and everything it started."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def full_data_root() -> Path:
    """The full public data sets the benchmarks need (not the subsets shipped in bertray/example_data):
    $BERTRAY_DATA_ROOT, else ../shared/data beside the repository. Exits naming the variable when absent."""
    root = Path(os.environ.get("BERTRAY_DATA_ROOT") or ROOT.parent / "shared" / "data").resolve()
    if not (root / "sst2" / "train.parquet").is_file():
        sys.exit(f"the benchmarks need the full data sets, not found under {root}: set BERTRAY_DATA_ROOT to a "
                 "folder laid out as in bertray/example_data/README.md")
    return root


class PeakRSS:
    """Peak summed RSS of this process and its descendants (with a local ``ray.init()``: GCS,
    raylet, dashboard and every Ray worker), sampled every 0.2 s.

    Cheap on purpose, since it runs beside the work it measures on the same 2 cores: the
    process tree (a scan of every /proc entry) is re-read only every 2 s, and each sample
    reads one small /proc file per known process.
    """

    def __init__(self):
        import psutil

        self.psutil, self.peak = psutil, 0
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = self.psutil.Process()
        procs, tick = [root], 0
        while not self._done.is_set():
            if tick % 10 == 0:
                try:
                    procs = [root, *root.children(recursive=True)]
                except self.psutil.NoSuchProcess:
                    pass
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            tick += 1
            self._done.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self.thread.join()

"""Shared by the benchmarks: peak memory of a process and its Ray workers."""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """Samples the RSS of this process plus Ray worker processes."""

    def __init__(self, include_ray: bool):
        import psutil

        self.psutil, self.include_ray, self.peak, self._stop = psutil, include_ray, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = self.psutil.Process().memory_info().rss
        if self.include_ray:
            for p in self.psutil.process_iter(["name", "cmdline"]):
                try:
                    if (p.info["name"] or "").startswith("ray::") or any("ray::" in c for c in (p.info["cmdline"] or [])[:1]):
                        total += p.memory_info().rss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
        return total

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._total())
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()

"""bertray.memory: a freed large block is reused, not faulted in again, in a thread (as in Ray Train)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Each run is a fresh process: mallopt settings are process-wide and would stay in pytest's.
PROBE = textwrap.dedent("""
    import resource, sys, threading
    import torch
    from bertray.memory import keep_freed_memory

    kept = keep_freed_memory() if sys.argv[1] == "keep" else True
    faults = []

    def steps():  # Ray Train runs the training function in a thread: its blocks live in a thread arena
        for _ in range(8):  # glibc settles on reusing the block after a few rounds (4 here)
            torch.zeros(30522, 384).add_(1)  # MiniLM's word-embedding gradient, 47 MB
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.zeros(30522, 384).add_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)

    thread = threading.Thread(target=steps)
    thread.start()
    thread.join()
    print(kept, faults[0])
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    return int(out[1])


def test_keep_freed_memory_reuses_the_block_instead_of_faulting_it_in():
    default, kept = _faults("default"), _faults("keep")
    pages = 10 * 30522 * 384 * 4 // 4096  # ten 47 MB blocks, in 4 KiB pages
    assert default > pages // 2, f"glibc's default should fault each fresh block in ({default} faults)"
    assert kept < pages // 20, f"kept memory should be reused ({kept} faults for ~{pages} pages)"

"""Learning-rate schedules: linear warmup, then linear or cosine decay (or constant).

Pure: no ``ray``, no work at import. The shapes match transformers'
``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"scheduler={kind!r}: use linear, cosine or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int):
    lr_factor(0, kind, warmup_steps, total_steps)  # fail fast on an unknown kind
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, kind, warmup_steps, total_steps))

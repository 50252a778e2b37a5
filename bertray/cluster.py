"""Ray glue shared by every job: joining the cluster and fitting requests to its resources."""

from __future__ import annotations

import ray


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit) or start a local one."""
    if not ray.is_initialized():
        ray.init(log_to_driver=True)

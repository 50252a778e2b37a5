"""Ray glue shared by every job: joining the cluster and fitting requests to its resources."""

from __future__ import annotations

import math
import os
import time

import ray

from bertray.errors import BertrayError

# A CPU training worker with less than this share of a core does not train slowly, it stalls
# (each still holds a model copy and its own threads): refused rather than left to hang.
MIN_CPU_SHARE = 0.25
# Seconds to wait for an autoscaling cluster to grow to the request; 0 (default) means the cluster
# is the size it is, and a request that does not fit is an error at once.
AUTOSCALE_WAIT_ENV = "BERTRAY_AUTOSCALE_WAIT_S"


class ResourceError(BertrayError):
    """The cluster cannot hold what the config asks for."""


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit) or start a local one."""
    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def cpu_share_per_worker(total_cpus: float, workers: int, reserved: float = 0.0) -> float:
    """The one rule for splitting CPUs: what is left after ``reserved``, evenly over ``workers``,
    rounded down to 1/100 (Ray's resource granularity); 0 when nothing is left."""
    share = (total_cpus - reserved) / max(workers, 1)
    return max(math.floor(share * 100) / 100, 0.0)


def train_request(cfg, total_cpus: float) -> tuple[float, float, float]:
    """(CPUs per worker, CPUs for the whole run, GPUs) of a training config on ``total_cpus``."""
    s, d = cfg.scaling, cfg.data
    tokenizers = d.num_tokenizer_actors * d.tokenizer_actor_cpus
    gpus = float(s.num_workers) if s.use_gpu else 0.0
    if s.cpus_per_worker is not None or s.use_gpu:
        per = s.cpus_per_worker or 1.0
        return per, s.num_workers * per + tokenizers, gpus
    per = cpu_share_per_worker(total_cpus, s.num_workers, s.data_cpus)
    return per, s.num_workers * per + max(s.data_cpus, tokenizers), gpus


def _shortfall(cfg, res: dict, largest_node_cpus: float) -> str | None:
    s = cfg.scaling
    total, gpus_have = res.get("CPU", 0.0), res.get("GPU", 0.0)
    per, cpus, gpus = train_request(cfg, total)
    size = f"the cluster has {total:g} CPUs and {gpus_have:g} GPUs"
    if not s.use_gpu and s.cpus_per_worker is None and per < MIN_CPU_SHARE:
        return (f"scaling.num_workers={s.num_workers} with scaling.data_cpus={s.data_cpus:g}: {size}, which leaves "
                f"{per:g} CPU per training worker (at least {MIN_CPU_SHARE:g} is needed); lower scaling.num_workers "
                "or scaling.data_cpus, or use a larger cluster")
    if per > largest_node_cpus:
        return (f"scaling.cpus_per_worker={per:g}: the largest node has {largest_node_cpus:g} CPUs and a worker "
                "runs on one node; lower scaling.cpus_per_worker")
    if cpus > total + 1e-9 or gpus > gpus_have:
        return (f"scaling.num_workers={s.num_workers} x scaling.cpus_per_worker={per:g}"
                f"{' (+1 GPU each)' if gpus else ''} plus {cpus - s.num_workers * per:g} CPU(s) for Ray Data "
                f"(data.num_tokenizer_actors x data.tokenizer_actor_cpus) needs {cpus:g} CPUs and {gpus:g} GPUs; "
                f"{size}; lower scaling.num_workers or scaling.cpus_per_worker, or use a larger cluster")
    return None


def _snapshot() -> tuple[dict, float]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=0.0)
    return ray.cluster_resources(), largest


def check_train_resources(cfg, wait_s: float | None = None) -> None:
    """Refuse, before any worker starts, a training request the cluster cannot hold.

    On an autoscaling cluster (``BERTRAY_AUTOSCALE_WAIT_S`` > 0) wait up to that long for it
    to grow, saying so; otherwise the error is immediate (a request that never fits hangs Ray).
    """
    wait_s = float(os.environ.get(AUTOSCALE_WAIT_ENV, "0")) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    problem = _shortfall(cfg, *_snapshot())
    if problem and wait_s > 0:
        print(f"[bertray] waiting up to {wait_s:g} s for the cluster to scale up: {problem}", flush=True)
    while problem and time.monotonic() < deadline:
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
        problem = _shortfall(cfg, *_snapshot())
    if problem:
        waited = f" (after waiting {wait_s:g} s for the autoscaler)" if wait_s > 0 else ""
        raise ResourceError(problem + waited)

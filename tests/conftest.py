"""Shared fixtures: one local Ray session for the whole run, real data, a real trained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BERTRAY_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()
os.environ.setdefault("BERTRAY_DATA_ROOT", str(DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "trec" / "train.parquet").exists():
        pytest.fail(f"real data not found under {DATA}; set BERTRAY_DATA_ROOT to the shared/data folder")
    return DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every test that needs Ray (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def smoke_config(tmp: Path, *overrides: str):
    """configs/smoke.yaml with ``output_dir`` under ``tmp`` and extra overrides."""
    from bertray.config import RunConfig, load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"output_dir={tmp}", *overrides], RunConfig)


@pytest.fixture(scope="session")
def trained(ray_session, data_root, tmp_path_factory):
    """A real model trained by bertray on TREC (2 workers, DDP), shared by train and predict tests."""
    from bertray.train import run

    out = tmp_path_factory.mktemp("trained")
    # batch 8 per worker keeps the optimizer steps of the 1-worker smoke run (batch 16)
    cfg = smoke_config(out, "scaling.num_workers=2", "train.amp=fp32", "train.batch_size=8")
    return cfg, run(cfg)

"""A fresh clone needs nothing beside it: the configs and the tests find their data inside the clone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# Prints, for every shipped config, the data paths it resolves to, and the tests' data folder.
RESOLVE = """
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
sys.path.insert(0, "tests")
from bertray.config import ExportConfig, PredictConfig, RunConfig
from bertray.config_loader import load_config
import conftest
out = {"tests": str(conftest.DATA)}
for path in sorted(Path("configs").glob("*.yaml")):
    cls = {"predict": PredictConfig, "export": ExportConfig}.get(path.stem, RunConfig)
    cfg = load_config(path, [], cls)
    out[path.name] = [cfg.data.train, cfg.data.validation] if cls is RunConfig else [cfg.input]
print(json.dumps(out))
"""


def _clone(tmp_path):
    clone = tmp_path / "repo"  # tmp_path is empty: no ../shared beside the clone
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("BERTRAY_DATA_ROOT", "RAY_ADDRESS")}
    return clone.resolve(), env


@pytest.mark.slow
def test_fresh_clone_resolves_all_data_inside_itself_and_trains_the_smoke_config(tmp_path):
    clone, env = _clone(tmp_path)
    assert not (clone.parent / "shared").exists()
    proc = subprocess.run([sys.executable, "-c", RESOLVE], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.loads(proc.stdout)
    assert resolved.pop("tests") == str(clone / "bertray" / "example_data")
    assert {"sst2.yaml", "smoke.yaml", "predict.yaml"} <= set(resolved)
    for name, paths in resolved.items():
        for path in filter(None, paths):
            assert path.startswith(f"{clone}/"), f"{name}: {path} is outside the clone"
            assert os.path.isfile(path), f"{name}: {path} is not in the clone"

    out = clone / "outputs" / "smoke"
    run = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/smoke.yaml",
                          f"output_dir={out}"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "model" / "model.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text())["accuracy"] > 0.3  # 6 classes: chance is ~0.2

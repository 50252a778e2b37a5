"""Config: loading, overrides, validation that reports every problem at once; shipped YAMLs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bertray.config import ConfigError, PredictConfig, RunConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _cls_for(path: Path):
    return PredictConfig if path.stem.startswith("predict") else RunConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must open with a comment giving the command that runs it"
    text = path.read_text()
    assert f"configs/{path.name}" in text.split("\n\n")[0] or f"configs/{path.name}" in text[:600]
    load_config(path, [], _cls_for(path))


def test_overrides_are_typed_and_paths_resolved(tmp_path):
    cfg = load_config(ROOT / "configs" / "sst2.yaml",
                      ["train.lr=3e-5", "train.epochs=2", "scaling.num_workers=2", f"output_dir={tmp_path}/run",
                       "data.max_train_rows=null", "data.root=/data"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2 and cfg.scaling.num_workers == 2
    assert cfg.data.max_train_rows is None
    assert cfg.data.train == "/data/sst2/train.parquet"
    assert cfg.output_dir == f"{tmp_path}/run"
    assert cfg.storage_path == f"{tmp_path}/run/ray" and cfg.name == "run"


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "smoke.yaml",
                    ["train.amp=fp8", "train.lr=-1", "train.bogus=1", "scaling.num_workers=zero", "modle.name=x"])
    msg = str(e.value)
    assert "train.amp='fp8'" in msg and "fp32|bf16|fp16" in msg
    assert "unknown key train.bogus" in msg
    assert "unknown key modle" in msg
    assert "scaling.num_workers='zero'" in msg
    assert len(e.value.problems) == 4  # lr is range-checked once the types are right
    with pytest.raises(ConfigError, match=r"train.lr=-1.0 must be > 0"):
        load_config(ROOT / "configs" / "smoke.yaml", ["train.lr=-1"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("input: a.parquet\noutput: out\nmodel: {path: m}\ndate: 2026-13-45\n")
    with pytest.raises(ConfigError, match="looks like a date is not one"):
        load_config(bad, cls=PredictConfig)


def test_fp16_needs_gpu_and_class_weights_checked():
    with pytest.raises(ConfigError, match="train.amp=fp16 needs scaling.use_gpu=true"):
        load_config(ROOT / "configs" / "smoke.yaml", ["train.amp=fp16"])
    with pytest.raises(ConfigError, match="class_weights='often'"):
        load_config(ROOT / "configs" / "smoke.yaml", ["train.class_weights=often"])
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["train.class_weights=[1.0, 2]"])
    assert cfg.train.class_weights == [1.0, 2.0]


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"loguniform": [1e-5, 1e-4]}}, "unknown config key 'train.lrr'"),
    ({"train.lr": {"loguniform": [1e-4, 1e-5]}}, "is empty: low must be < high"),
    ({"train.lr": {"uniform": [-1e-4, 1e-4]}}, "a learning rate must be > 0"),
    ({"train.lr": {"loguniform": [0, 1e-4]}}, "bounds must be > 0"),
    ({"train.epochs": {"choice": []}}, "non-empty list"),
    ({"train.epochs": {"normal": [1, 2]}}, "give exactly one of"),
    ({"train.max_length": {"choice": [64, 128]}}, "changes the data pipeline"),
])
def test_bad_search_space(space, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "smoke.yaml", [f"tune.space={space!r}".replace("'", '"')])


def test_apply_overrides_revalidates():
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    assert apply_overrides(cfg, {"train.lr": 1e-3}).train.lr == 1e-3
    with pytest.raises(ConfigError):
        apply_overrides(cfg, {"train.batch_size": 0})


def test_bad_config_exits_before_ray_starts():
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/smoke.yaml", "train.amp=fp64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.amp='fp64'" in proc.stderr and "one of auto|fp32|bf16|fp16" in proc.stderr
    assert "ray" not in proc.stderr.lower().replace("ray job", "")

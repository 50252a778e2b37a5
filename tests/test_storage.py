"""The staged-output transaction (bertray.storage) and model export on real local directories; no Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import save

from bertray import storage
from bertray.checkpoint import STATE_FILES, export_model
from bertray.storage import SUCCESS_FILE, OutputError, OutputExistsError

LOCAL = pafs.LocalFileSystem()


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def bertray_output(path: Path, rows: int = 1) -> Path:
    path.mkdir(parents=True)
    (path / "part-0.parquet").write_bytes(b"old")
    (path / SUCCESS_FILE).write_text(json.dumps({"rows_out": rows}))
    return path


def stage_and_commit(final: Path, files: dict[str, bytes], on_existing: str = "overwrite") -> None:
    with storage.staged(LOCAL, str(final), str(final)) as stage:
        for name, data in files.items():
            storage.write_bytes(LOCAL, f"{stage.path}/{name}", data)
        storage.commit(LOCAL, stage.path, str(final), on_existing)


def hidden_siblings(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.*"))


# ----------------------------------------------------------------------------- what may be replaced


@pytest.mark.parametrize("kind", ["file", "foreign dir", "spark output"])
def test_a_target_bertray_did_not_write_is_refused_and_left_untouched(tmp_path, kind):
    final = tmp_path / "out"
    if kind == "file":
        final.write_bytes(b"someone's report")
    else:
        final.mkdir()
        (final / "data.csv").write_text("a,b\n1,2\n")
        if kind == "spark output":
            (final / SUCCESS_FILE).write_bytes(b"")  # Spark and Hadoop write an empty marker
    before = tree(tmp_path) if final.is_dir() else final.read_bytes()
    with pytest.raises(OutputError, match=rf"output {final} is an? .*(not a previous bertray output|did not write)"):
        storage.check_target(LOCAL, str(final), str(final))
    # The commit checks again (something may appear while a run writes) and refuses too.
    with pytest.raises(OutputError, match="left untouched"):
        stage_and_commit(final, {SUCCESS_FILE: b"{}"})
    assert (tree(tmp_path) if final.is_dir() else final.read_bytes()) == before
    assert not hidden_siblings(final)


def test_a_previous_bertray_output_or_an_empty_dir_is_replaced_whole(tmp_path):
    final = bertray_output(tmp_path / "out")
    storage.check_target(LOCAL, str(final), str(final))
    stage_and_commit(final, {"part-new.parquet": b"new", SUCCESS_FILE: b'{"rows_out": 2}'})
    assert tree(final) == {"part-new.parquet": b"new", SUCCESS_FILE: b'{"rows_out": 2}'}
    assert not hidden_siblings(final)

    empty = tmp_path / "empty"
    empty.mkdir()
    storage.check_target(LOCAL, str(empty), str(empty))
    stage_and_commit(empty, {SUCCESS_FILE: b"{}"})
    assert tree(empty) == {SUCCESS_FILE: b"{}"}


def test_on_existing_error_refuses_any_existing_output(tmp_path):
    final = bertray_output(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists and on_existing=error"):
        storage.check_target(LOCAL, str(final), str(final), on_existing="error")
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        stage_and_commit(final, {SUCCESS_FILE: b"{}"}, on_existing="error")
    assert tree(final)[SUCCESS_FILE] == b'{"rows_out": 1}'


def test_an_output_under_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "reports").write_text("not a directory")
    final = tmp_path / "reports" / "dt=2024-01-01"
    with pytest.raises(OutputError, match=rf"{tmp_path / 'reports'} is a file"):
        storage.check_target(LOCAL, str(final), str(final))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_parent_is_refused_before_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="no permission to write"):
        storage.check_target(LOCAL, str(locked / "out"), str(locked / "out"))


# ----------------------------------------------------------------------------- failures keep the previous output


def test_a_failure_while_staging_keeps_the_previous_output_and_leaves_nothing(tmp_path):
    final = bertray_output(tmp_path / "out")
    before = tree(final)
    with pytest.raises(RuntimeError, match="row count"):
        with storage.staged(LOCAL, str(final), str(final)) as stage:
            storage.write_bytes(LOCAL, f"{stage.path}/part-new.parquet", b"half")
            raise RuntimeError("row count differs")
    assert tree(final) == before
    assert not hidden_siblings(final)


def test_stale_leftovers_are_reported(tmp_path):
    final = tmp_path / "out"
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.old-def").mkdir()
    (tmp_path / ".other.tmp-abc").mkdir()
    assert storage.stale_leftovers(LOCAL, str(final)) == [str(tmp_path / ".out.old-def"),
                                                          str(tmp_path / ".out.tmp-abc")]


# ----------------------------------------------------------------------------- model export


def weights(value: float) -> bytes:
    return save({"w": torch.full((2,), value)})


def checkpoint(path: Path, weights: bytes = weights(1.0)) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    for f in STATE_FILES:
        (path / f).write_bytes(b"state")
    return path


def test_export_replaces_the_previous_model_whole_and_leaves_no_siblings(tmp_path):
    dest = tmp_path / "run" / "model"
    export_model(checkpoint(tmp_path / "ckpt-1"), dest)
    assert tree(dest) == {"config.json": b'{"architectures": ["BertForSequenceClassification"]}',
                          "model.safetensors": weights(1.0), "tokenizer.json": b"{}"}
    (dest / "extra-from-old-model.txt").write_text("old")
    export_model(checkpoint(tmp_path / "ckpt-2", weights(2.0)), dest)
    assert (dest / "model.safetensors").read_bytes() == weights(2.0)
    assert not (dest / "extra-from-old-model.txt").exists()
    assert not hidden_siblings(dest)


def test_export_of_a_checkpoint_without_weights_keeps_the_previous_model(tmp_path):
    dest = tmp_path / "model"
    export_model(checkpoint(tmp_path / "ckpt-1"), dest)
    before = tree(dest)
    broken = checkpoint(tmp_path / "ckpt-2")
    (broken / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match=r"lacks \['model.safetensors'\]"):
        export_model(broken, dest)
    assert tree(dest) == before
    assert not hidden_siblings(dest)


def test_export_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        export_model(checkpoint(tmp_path / "ckpt"), dest)
    assert tree(dest) == {"notes.txt": b"mine"}


def test_export_refuses_non_finite_weights_and_keeps_the_previous_model(tmp_path):
    from bertray.errors import NonFiniteError

    dest = tmp_path / "model"
    export_model(checkpoint(tmp_path / "ckpt-1"), dest)
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        export_model(checkpoint(tmp_path / "ckpt-2", weights(float("nan"))), dest)
    assert (dest / "model.safetensors").read_bytes() == weights(1.0)
    assert not hidden_siblings(dest)

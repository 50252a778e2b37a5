"""Resumable predict's pieces (bertray.pieces) without Ray: the writer marks a file finished only
once all its rows are written, a rerun reuses only unchanged files of the same command, and the
collected output keeps input order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import pieces as P

COMMAND = {"model": "m", "settings": {"batch_size": 32}}


@pytest.fixture
def inputs(tmp_path) -> list[P.Source]:
    files = []
    for name, rows in (("a", 5), ("b", 3)):
        path = tmp_path / "in" / f"{name}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": [f"{name}{i}" for i in range(rows)]}), path)
        files.append(str(path))
    return P.sources(files, {files[0]: 5, files[1]: 3})


def _batch(source: P.Source, start: int, stop: int) -> pa.Table:
    name = Path(source.path).stem
    return pa.table({"text": [f"{name}{i}" for i in range(start, stop)], "prediction": ["x"] * (stop - start),
                     P.SOURCE: [source.path] * (stop - start)})


def _done(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/_done.json"))


def test_a_file_is_finished_only_when_all_its_rows_are_written(tmp_path, inputs):
    a, b = inputs
    resume = P.prepare(str(tmp_path / ".out.pieces"), COMMAND, inputs)
    writer = P.PieceWriter(resume.attempt_uri, [s.identity() for s in inputs])
    out = writer(pa.concat_tables([_batch(a, 0, 4)]))
    assert out.to_pydict() == {"path": [a.path], "rows": [4]} and not _done(tmp_path / ".out.pieces")
    writer(pa.concat_tables([_batch(a, 4, 5), _batch(b, 0, 2)]))  # one batch spanning two files
    [done] = _done(tmp_path / ".out.pieces")
    record = json.loads(done.read_text())
    assert record["source"] == a.identity() and len(record["parts"]) == 2
    writer(_batch(b, 2, 3))
    assert len(_done(tmp_path / ".out.pieces")) == 2


def test_a_rerun_reuses_unchanged_files_and_collects_in_input_order(tmp_path, inputs):
    a, b = inputs
    root = tmp_path / ".out.pieces"
    first = P.prepare(str(root), COMMAND, inputs)
    P.PieceWriter(first.attempt_uri, [s.identity() for s in inputs])(_batch(a, 0, 5))  # then killed
    again = P.prepare(str(root), COMMAND, inputs)
    assert list(again.done) == [a.path]
    P.PieceWriter(again.attempt_uri, [b.identity()])(_batch(b, 0, 3))
    stage = tmp_path / "stage"
    stage.mkdir()
    assert P.collect(again, inputs, str(stage)) == 2
    table = pq.read_table(stage)
    assert table.column("text").to_pylist() == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    assert P.SOURCE not in table.column_names


def test_a_changed_input_or_an_unreadable_record_is_predicted_again(tmp_path, inputs):
    a, b = inputs
    root = tmp_path / ".out.pieces"
    first = P.prepare(str(root), COMMAND, inputs)
    writer = P.PieceWriter(first.attempt_uri, [s.identity() for s in inputs])
    writer(_batch(a, 0, 5))
    writer(_batch(b, 0, 3))
    os.utime(a.path, (1_000_000, 1_000_000))  # the input file was rewritten since
    changed = P.sources([a.path, b.path], {a.path: 5, b.path: 3})
    assert list(P.prepare(str(root), COMMAND, changed).done) == [b.path]
    for done in _done(root):
        done.write_text('{"source": {"path"')  # killed while writing it
    assert P.prepare(str(root), COMMAND, changed).done == {}


def test_pieces_of_another_command_are_discarded(tmp_path, inputs):
    root = tmp_path / ".out.pieces"
    first = P.prepare(str(root), COMMAND, inputs)
    P.PieceWriter(first.attempt_uri, [s.identity() for s in inputs])(_batch(inputs[0], 0, 5))
    other = P.prepare(str(root), {**COMMAND, "settings": {"batch_size": 64}}, inputs)
    assert other.done == {} and not _done(root)


def test_collect_refuses_an_input_without_a_finished_piece(tmp_path, inputs):
    resume = P.prepare(str(tmp_path / ".out.pieces"), COMMAND, inputs)
    (tmp_path / "stage").mkdir()
    with pytest.raises(RuntimeError, match=r"no predictions were written for .*a\.parquet"):
        P.collect(resume, inputs, str(tmp_path / "stage"))

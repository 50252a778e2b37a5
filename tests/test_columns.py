"""Column rules shared by training and predict, and the CSV/JSONL line finder, on real Arrow data and files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from bertray.columns import is_text_type, missing_column, text_stats, usable_text
from bertray.filecheck import find_bad_line, find_first_bad_line


@pytest.mark.parametrize("array", [
    pa.array(["a", None, "", "  \t", "b", None]),
    pa.array(["a", None, "", "  \t", "b", None], pa.large_string()),
    pa.array(["a", None, "", "  \t", "b", None]).dictionary_encode(),
    pa.chunked_array([["a", None, ""], ["  \t", "b", None]]),
])
def test_text_stats_and_usable_text_agree_in_every_layout(array):
    assert text_stats(array) == (2, 2)
    assert usable_text(array).to_pylist() == [True, False, False, False, True, False]


def test_all_null_column_is_text_with_every_row_null():
    col = pa.nulls(3)
    assert is_text_type(col.type) and text_stats(col) == (3, 0) and usable_text(col).to_pylist() == [False] * 3


@pytest.mark.parametrize("t, ok", [(pa.string(), True), (pa.large_string(), True), (pa.dictionary(pa.int32(), pa.string()), True),
                                   (pa.int64(), False), (pa.binary(), False), (pa.float64(), False)])
def test_is_text_type(t, ok):
    assert is_text_type(t) is ok


def test_missing_column_names_file_key_columns_and_fix():
    msg = missing_column("/d/t.parquet", "sentence", ["text", "label"], "data.text_column")
    assert msg == ("/d/t.parquet: column 'sentence' (from data.text_column) not found; columns in the data: "
                   "['text', 'label']. Set data.text_column=<one of those>.")
    assert "Use one of those." in missing_column("/d/t.parquet", "x", ["a"])


def test_bad_utf8_in_csv_names_file_and_line(tmp_path):
    good, bad = tmp_path / "a.csv", tmp_path / "b.csv"
    good.write_text("text,label\nfine,0\n", encoding="utf-8")
    bad.write_bytes("text,label\nok,1\n\"café, ünïcode\",0\n".encode() + b"caf\xe9 latin-1,1\n")
    assert find_bad_line(str(good), "csv") is None
    msg = find_first_bad_line([str(good), str(bad)], "csv")
    assert msg.startswith(f"{bad}: line 4: not valid UTF-8 (byte 4 of the line is b'\\xe9')") and "iconv" in msg


@pytest.mark.parametrize("line, problem", [('{"text": "c", label: 1}', "not valid JSON (Expecting property name"),
                                           ('["c", 1]', "a JSON list, not an object"),
                                           ('{"text": "c", "label": 1', "not valid JSON")])
def test_malformed_jsonl_line_is_named(tmp_path, line, problem):
    path = tmp_path / "t.jsonl"
    path.write_text(f'{{"text": "a", "label": 0}}\n\n{{"text": "b", "label": 1}}\n{line}\n', encoding="utf-8")
    msg = find_bad_line(str(path), "json")
    assert msg.startswith(f"{path}: line 4: {problem}") and "one JSON object per line" in msg

"""Input listing on real folders: what a data engineer means by a directory or a glob."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray.errors import DataError
from bertray.paths import EXAMPLE_DATA, is_uri, list_files


def _touch(root, *rels):
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": ["a"], "label": [0]}), path)


@pytest.fixture
def lake(tmp_path):
    """A table folder as Spark, Hive and a killed writer leave it."""
    _touch(tmp_path, "part-0.parquet", "part-1.parquet", "sub/part-2.parquet", "sub/deeper/part-3.parquet",
           "_SUCCESS", "_temporary/0/task/part-9.parquet", ".staging/part-8.parquet",
           ".part-0.parquet.crc", ".tmp-run-123/part-7.parquet", "sub/_committed_1", "sub/.hidden.parquet")
    return tmp_path


def _names(files, root):
    return [f[len(str(root)) + 1:] for f in files]


def test_directory_skips_every_hidden_or_underscore_component(lake):
    assert _names(list_files(str(lake)), lake) == [
        "part-0.parquet", "part-1.parquet", "sub/deeper/part-3.parquet", "sub/part-2.parquet"]


def test_star_stays_in_one_directory(lake):
    assert _names(list_files(f"{lake}/*.parquet"), lake) == ["part-0.parquet", "part-1.parquet"]
    assert _names(list_files(f"{lake}/*/*.parquet"), lake) == ["sub/part-2.parquet"]
    assert _names(list_files(f"{lake}/part-[1].parquet"), lake) == ["part-1.parquet"]


def test_double_star_is_recursive_and_still_skips_hidden(lake):
    assert _names(list_files(f"{lake}/**/*.parquet"), lake) == [
        "part-0.parquet", "part-1.parquet", "sub/deeper/part-3.parquet", "sub/part-2.parquet"]
    assert _names(list_files(f"{lake}/sub/**"), lake) == ["sub/deeper/part-3.parquet", "sub/part-2.parquet"]


def test_hidden_names_are_read_when_asked_for_explicitly(lake):
    # a pattern or a path that names the hidden part itself means it
    assert _names(list_files(f"{lake}/_temporary/**/*.parquet"), lake) == ["_temporary/0/task/part-9.parquet"]
    assert _names(list_files(f"{lake}/.staging"), lake) == [".staging/part-8.parquet"]
    assert _names(list_files(f"{lake}/sub/.*.parquet"), lake) == ["sub/.hidden.parquet"]
    assert _names(list_files(f"{lake}/_SUCCESS"), lake) == ["_SUCCESS"]


def test_relative_and_uri_paths(lake, monkeypatch):
    monkeypatch.chdir(lake)
    assert list_files("part-0.parquet") == [f"{lake}/part-0.parquet"]
    assert list_files(f"file://{lake}/*.parquet") == [f"file://{lake}/part-0.parquet", f"file://{lake}/part-1.parquet"]
    assert is_uri("s3://bucket/x") and is_uri("gs://b/x") and not is_uri("/data/x")


@pytest.mark.parametrize("pattern", ["nope.parquet", "*.csv", "_temporary", "sub/*/x/*.parquet"])
def test_nothing_matching_names_the_path(lake, pattern):
    if pattern == "_temporary":  # only hidden files below it
        _touch(lake, "empty/_temporary/part-0.parquet")
        pattern = "empty"
    with pytest.raises(DataError, match=r"no data files found at '.*': check the path .* names starting with '_' or '\.' are skipped"):
        list_files(f"{lake}/{pattern}")


def test_example_data_is_shipped_inside_the_package():
    files = list_files(str(EXAMPLE_DATA))
    assert f"{EXAMPLE_DATA}/README.md" in files  # sources and licences beside the data
    files = [f for f in files if not f.endswith("README.md")]
    assert {f.split("/")[-2] for f in files} == {"sst2", "trec", "sms_spam", "mrpc", "stsb", "goemotions"}
    assert sum(Path(f).stat().st_size for f in files) < 4_000_000  # a few MB at most


def test_every_example_file_is_package_data():
    """`pip install .` carries exactly what is in the folder: each file matches a package-data glob."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((EXAMPLE_DATA.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bertray"]
    package = EXAMPLE_DATA.parent
    for path in EXAMPLE_DATA.rglob("*"):
        if path.is_file():
            rel = str(path.relative_to(package))
            assert any(fnmatch.fnmatchcase(rel, g) for g in globs), f"{rel} is not in package-data {globs}"

"""Ray Data pipeline on real data: readers, bad input, label map, split, tokenized output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import ray.data
from conftest import ROOT

from bertray.config import DataConfig
from bertray.data import DataError, list_files, prepare

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def trec(data_root):
    return pd.read_parquet(data_root / "trec" / "train.parquet")[["text", "label"]].head(300)


def _write(df: pd.DataFrame, path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return str(path)


def _rows(ds):
    return ds.to_pandas()


@pytest.mark.parametrize("fmt, ext", [("parquet", "parquet"), ("csv", "csv"), ("json", "jsonl")])
def test_each_format_reads_and_tokenizes(tmp_path, trec, fmt, ext):
    train = _write(trec.iloc[:200], tmp_path / f"train.{ext}", fmt)
    val = _write(trec.iloc[200:], tmp_path / f"val.{ext}", fmt)
    p = prepare(DataConfig(train=train, validation=val), "default", 32, seed=0)
    assert p.label2id == {k: i for i, k in enumerate(sorted(trec.iloc[:200]["label"].unique()))}
    assert p.train_rows == 200
    out = _rows(p.train)
    assert len(out) == 200 and set(out.columns) == {"input_ids", "labels"}
    # labels are encoded with the saved map, and every row is accounted for
    expected = trec.iloc[:200]["label"].map(p.label2id).value_counts().to_dict()
    assert out["labels"].value_counts().to_dict() == expected
    assert max(len(x) for x in out["input_ids"]) <= 32
    assert len(_rows(p.validation)) == 100


def test_directory_and_glob_inputs(tmp_path, trec):
    for i in range(3):
        _write(trec.iloc[i * 100:(i + 1) * 100], tmp_path / "parts" / f"part-{i}.parquet", "parquet")
    assert len(list_files(str(tmp_path / "parts"))) == 3
    assert len(list_files(str(tmp_path / "parts" / "part-[01].parquet"))) == 2
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = True  # Ray's default, whatever earlier tests left
    p = prepare(DataConfig(train=str(tmp_path / "parts" / "*.parquet"), validation=str(tmp_path / "parts" / "part-0.parquet")),
                "default", 32, seed=0)
    assert p.train_rows == 300
    # Reading Parquet switches Ray's reader for its own read only, not for the caller's session.
    assert ctx.use_datasource_v2 is True


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no data files found at '.*nope\.parquet'"):
        prepare(DataConfig(train=str(tmp_path / "nope.parquet")), "default", 32, seed=0)


def test_missing_column_lists_existing_columns(tmp_path, trec):
    path = _write(trec, tmp_path / "t.parquet", "parquet")
    with pytest.raises(DataError) as e:
        prepare(DataConfig(train=path, text_column="sentence"), "default", 32, seed=0)
    msg = str(e.value)
    assert "column 'sentence' (from data.text_column) not found" in msg and "['text', 'label']" in msg and path in msg


def test_bad_rows_error_names_file_column_count_and_can_be_dropped(tmp_path, trec):
    df = trec.copy()
    df.loc[[0, 1], "text"] = None
    df.loc[2, "text"] = "   "
    df.loc[3, "label"] = None
    path = _write(df, tmp_path / "bad.parquet", "parquet")
    with pytest.raises(DataError) as e:
        prepare(DataConfig(train=path), "default", 32, seed=0)
    msg = str(e.value)
    assert f"{path}: 2 row(s) with null text in column 'text'" in msg
    assert "1 row(s) with empty text" in msg and "1 row(s) with null label in column 'label'" in msg
    assert "data.drop_bad_rows=true" in msg
    p = prepare(DataConfig(train=path, drop_bad_rows=True), "default", 32, seed=0)
    assert p.dropped_rows == 4
    assert len(_rows(p.train)) + len(_rows(p.validation)) == len(df) - 4


def test_unknown_validation_label_named_with_count(tmp_path, trec):
    val = trec.iloc[:50].copy()
    val.loc[val.index[:3], "label"] = "WHO"
    t = _write(trec, tmp_path / "t.csv", "csv")
    v = _write(val, tmp_path / "v.csv", "csv")
    with pytest.raises(DataError, match=r"v.csv: column 'label': label\(s\) not in the training label map: 'WHO' \(3 rows\)"):
        prepare(DataConfig(train=t, validation=v), "default", 32, seed=0)


def test_split_is_deterministic_disjoint_and_stratified(data_root):
    cfg = DataConfig(train=str(data_root / "sms_spam" / "sms_spam.csv"), validation_fraction=0.2)
    # max_length covers whole messages, so equal ids mean equal texts
    a = prepare(cfg, "default", 512, seed=7)
    b = prepare(cfg, "default", 512, seed=7)
    va, vb = _rows(a.validation), _rows(b.validation)
    tr = _rows(a.train)
    key = lambda df: sorted(map(tuple, df["input_ids"]))  # noqa: E731
    assert key(va) == key(vb)  # same seed -> same split
    assert len(va) + len(tr) == 5574
    assert 0.17 < len(va) / 5574 < 0.23
    assert a.train_rows == len(tr)  # exact count, used for the LR schedule
    spam_share = lambda df: (df["labels"] == a.label2id["spam"]).mean()  # noqa: E731
    assert abs(spam_share(va) - spam_share(tr)) < 0.03  # class balance kept in both parts
    assert not set(map(tuple, va["input_ids"])) & set(map(tuple, tr["input_ids"]))  # no text on both sides
    c = prepare(cfg, "default", 512, seed=8)
    assert key(_rows(c.validation)) != key(va)


def test_training_batches_bucket_by_length_and_change_every_epoch(data_root):
    from bertray.batches import iterate

    cfg = DataConfig(train=str(data_root / "sst2" / "validation.parquet"), validation=str(data_root / "sst2" / "validation.parquet"))
    ds = prepare(cfg, "default", 128, seed=0).train

    def batches(pool_rows, bucketing, seed):
        return [[tuple(ids) for ids in b.column("input_ids").to_pylist()] for b in iterate(ds, 16, pool_rows, bucketing, seed)]

    def padding(bs):  # padded positions / real tokens
        return sum(len(b) * max(map(len, b)) - sum(map(len, b)) for b in bs) / sum(len(r) for b in bs for r in b)

    in_order = batches(0, False, 0)
    rows = sorted(r for b in in_order for r in b)
    epoch1, epoch2 = batches(256, True, 1), batches(256, True, 2)
    shuffled = batches(256, False, 1)
    for bs in (epoch1, epoch2, shuffled):
        assert sorted(r for b in bs for r in b) == rows  # every row exactly once
        assert max(map(len, bs)) == 16
    assert padding(epoch1) < padding(shuffled) / 4  # bucketed: similar lengths share a batch
    # Another epoch: other batches (rows and order), not the same batches reordered.
    assert {frozenset(b) for b in epoch1} != {frozenset(b) for b in epoch2}
    assert epoch1 == batches(256, True, 1)  # the same seed gives the same batches (resume skips them)
    assert shuffled != in_order and [len(b) for b in in_order] == [len(b) for b in shuffled]


def test_hugging_face_dataset_on_disk(tmp_path, trec):
    import datasets

    datasets.Dataset.from_pandas(trec, preserve_index=False).save_to_disk(str(tmp_path / "hf"))
    p = prepare(DataConfig(train=str(tmp_path / "hf"), validation=str(tmp_path / "hf")), "default", 32, seed=0)
    assert p.train_rows == len(trec)
    assert json.dumps(p.label2id)


# ----------------------------------------------------------------------------- inputs, labels, degenerate data


def test_directory_input_skips_spark_hive_and_temp_leftovers(tmp_path, trec):
    table = tmp_path / "table"
    _write(trec.iloc[:100], table / "part-0.parquet", "parquet")
    _write(trec.iloc[100:200], table / "region=eu" / "part-1.parquet", "parquet")
    for leftover in ("_temporary/0/part-0.parquet", ".staging/part-0.parquet", ".tmp-a1b2/part-0.parquet"):
        _write(trec.iloc[200:300], table / leftover, "parquet")
    (table / "_SUCCESS").write_text("")
    p = prepare(DataConfig(train=str(table), validation=str(table / "part-0.parquet")), "default", 32, seed=0)
    assert p.train_rows == 200  # the two visible parts, none of the 300 leftover rows


@pytest.mark.parametrize("fmt, ext", [("parquet", "parquet"), ("csv", "csv"), ("json", "jsonl")])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_float_and_bool_label_columns_train(tmp_path, trec, fmt, ext, kind):
    df = trec.iloc[:120].copy()
    flag = df["label"].isin(["HUM", "LOC"])
    df["label"] = flag.astype(float) if kind == "float" else flag
    t = _write(df.iloc[:100], tmp_path / f"t.{ext}", fmt)
    v = _write(df.iloc[100:], tmp_path / f"v.{ext}", fmt)
    # a float column is regression under problem_type=auto: classes must be asked for
    p = prepare(DataConfig(train=t, validation=v), "default", 32, seed=0, problem_type="single_label_classification")
    assert p.label2id == {"0": 0, "1": 1} and p.id2label == {0: "0", 1: "1"}
    assert p.label_counts == {1: int(flag.iloc[:100].sum()), 0: int((~flag.iloc[:100]).sum())}
    assert sorted(_rows(p.train)["labels"]) == sorted(flag.iloc[:100].astype(int))
    assert sorted(_rows(p.validation)["labels"]) == sorted(flag.iloc[100:].astype(int))


def test_one_class_in_training_is_an_error_with_counts(tmp_path, trec):
    df = trec[trec["label"] == "HUM"]
    t = _write(df, tmp_path / "t.parquet", "parquet")
    with pytest.raises(DataError, match=rf"data.train={t}: training needs at least 2 classes, found 1 \('HUM': {len(df)} rows\)"):
        prepare(DataConfig(train=t, validation=t), "default", 32, seed=0)


@pytest.mark.parametrize("case", ["empty file", "only bad rows"])
def test_empty_validation_file_is_an_error_with_counts(tmp_path, trec, case):
    t = _write(trec, tmp_path / "t.parquet", "parquet")
    val = trec.iloc[:0] if case == "empty file" else trec.iloc[:5].assign(text="  ")
    v = _write(val, tmp_path / "v.parquet", "parquet")
    read, bad = (0, 0) if case == "empty file" else (5, 5)
    with pytest.raises(DataError, match=rf"data.validation={v}: no usable validation rows \({read} rows read, {bad} with"):
        prepare(DataConfig(train=t, validation=v, drop_bad_rows=True), "default", 32, seed=0)


def test_holdout_of_zero_rows_is_an_error(tmp_path, trec):
    t = _write(trec.iloc[:20], tmp_path / "t.parquet", "parquet")
    with pytest.raises(DataError, match=r"data.validation_fraction=0.001 of 20 usable training rows holds out 0 rows"):
        prepare(DataConfig(train=t, validation_fraction=0.001), "default", 32, seed=0)


def test_labels_differing_by_case_or_whitespace_warn(tmp_path, trec, caplog):
    df = trec.iloc[:60].copy()
    df.loc[df.index[:3], "label"] = "hum"
    df.loc[df.index[3:5], "label"] = " HUM"
    t = _write(df, tmp_path / "t.parquet", "parquet")
    with caplog.at_level("WARNING", logger="bertray.data"):
        p = prepare(DataConfig(train=t, validation=t), "default", 32, seed=0)
    assert "hum" in p.label2id and " HUM" in p.label2id  # still trained as written
    assert "differ only by case or surrounding whitespace: [[' HUM', 'HUM', 'hum']]" in caplog.text


def _bad_input(tmp_path, trec, case) -> tuple[str, str]:
    """A training file for each late-error case, and the message that must name it."""
    if case == "utf8 csv":
        path = tmp_path / "t.csv"
        _write(trec.iloc[:50], path, "csv")
        with path.open("ab") as f:
            f.write(b"caf\xe9 au lait?,DESC\n")
        return str(path), rf"{path}: line 52: not valid UTF-8 \(byte 4 of the line is b'\\xe9'\)"
    if case == "jsonl line":
        path = tmp_path / "t.jsonl"
        _write(trec.iloc[:50], path, "json")
        with path.open("a") as f:
            f.write('{"text": "who?", label: "HUM"}\n')
        return str(path), rf"{path}: line 51: not valid JSON .* one JSON object per line"
    path = tmp_path / "t.parquet"
    _write(trec.iloc[:50].assign(text=range(50)), path, "parquet")
    return str(path), rf"column 'text' \(from data.text_column\) does not hold text \({path}: int64\)"


@pytest.mark.parametrize("case", ["utf8 csv", "jsonl line", "int text"])
def test_late_data_errors_become_early_errors_naming_file_and_line(tmp_path, trec, case):
    path, message = _bad_input(tmp_path, trec, case)
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(train=path, validation=path), "default", 32, seed=0)


@pytest.mark.parametrize("case", ["utf8 csv", "one class"])
def test_data_errors_exit_1_from_jobs_train_before_training(tmp_path, trec, case, capsys):
    from bertray.cli import main
    from bertray.config import RunConfig

    if case == "one class":
        path, message = _write(trec[trec["label"] == "NUM"], tmp_path / "t.parquet", "parquet"), "found 1 ('NUM'"
    else:
        path, message = _bad_input(tmp_path, trec, case)
        message = f"{path}: line 52: not valid UTF-8"
    out = tmp_path / "out"
    status = main("", RunConfig, "bertray.train:run",
                  ["--config", str(ROOT / "configs" / "smoke.yaml"), f"data.train={path}", f"data.validation={path}", f"output_dir={out}"])
    assert status == 1
    assert message in capsys.readouterr().err
    assert not (out / "model").exists() and not (out / "ray").exists()


def test_auto_trains_a_float_column_of_few_whole_numbers_as_regression_and_says_so(tmp_path, trec, capsys):
    df = trec.iloc[:120].copy()
    df["label"] = df["label"].isin(["HUM", "LOC"]).astype(float)
    t, v = _write(df.iloc[:100], tmp_path / "t.parquet", "parquet"), _write(df.iloc[100:], tmp_path / "v.parquet", "parquet")
    p = prepare(DataConfig(train=t, validation=v), "default", 32, seed=0)
    assert p.problem.name == "regression" and p.label2id == {"label": 0}
    assert sorted(_rows(p.train)["labels"]) == sorted(df["label"].iloc[:100])
    out = capsys.readouterr().out
    assert "holds floats, so model.problem_type=auto trains regression" in out
    assert "model.problem_type=single_label_classification" in out


def test_multi_label_strings_split_on_the_separator(tmp_path, trec):
    df = trec.iloc[:120].copy()
    df["label"] = df["label"] + np.where(np.arange(120) % 3 == 0, "|extra", "") + np.where(np.arange(120) % 7 == 0, " | ", "")
    t, v = _write(df.iloc[:100], tmp_path / "t.parquet", "parquet"), _write(df.iloc[100:], tmp_path / "v.parquet", "parquet")
    p = prepare(DataConfig(train=t, validation=v, label_separator="|"), "default", 32, seed=0)
    assert p.problem.name == "multi_label_classification" and "extra" in p.label2id and "" not in p.label2id
    assert p.label_counts[p.label2id["extra"]] == sum(1 for i in range(100) if i % 3 == 0)
    first = _rows(p.train)["labels"][0]
    assert sorted(first) == sorted([p.label2id[df["label"].iloc[0].split("|")[0]], p.label2id["extra"]])

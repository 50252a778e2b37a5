import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from bertray.modeling import load_fast_tokenizer, load_tokenizer
from bertray.tokenization import encode_flat, pad_flat, pad_rows, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def texts(data_root):
    return pd.read_parquet(data_root / "sst2" / "validation.parquet")["text"].tolist()[:64]


def test_dynamic_padding_to_longest_multiple_of_8(tokenizer, texts):
    ids = tokenize(tokenizer, texts, max_length=128)
    input_ids, mask = pad_rows(ids, tokenizer.pad_token_id)
    longest = max(len(x) for x in ids)
    assert input_ids.shape[1] == -(-longest // 8) * 8 < 128
    assert (mask.sum(1) == [len(x) for x in ids]).all()
    for row, x in zip(input_ids, ids, strict=True):
        assert list(row[: len(x)]) == x and (row[len(x):] == tokenizer.pad_token_id).all()
    # identical to what the tokenizer itself pads to (pad_to_multiple_of=8)
    ref = tokenizer(texts, padding=True, pad_to_multiple_of=8, truncation=True, max_length=128, return_tensors="np")
    assert np.array_equal(input_ids, ref["input_ids"]) and np.array_equal(mask, ref["attention_mask"])


def test_truncation_keeps_special_tokens(tokenizer, texts):
    ids = tokenize(tokenizer, texts, max_length=16)
    assert max(len(x) for x in ids) == 16
    assert all(x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id for x in ids)


def test_head_tail_keeps_first_and_last_tokens(tokenizer):
    text = " ".join(f"w{i}" for i in range(300))
    full = tokenizer(text)["input_ids"]
    (ht,) = tokenize(tokenizer, [text], max_length=32, truncation="head_tail")
    assert len(ht) == 32
    assert ht[:8] == full[:8] and ht[8:] == full[-24:]


def test_pad_flat_matches_pad_rows_on_sliced_arrow(tokenizer, texts):
    import pyarrow as pa

    ids = tokenize(tokenizer, texts, 128)
    arr = pa.array(ids, type=pa.list_(pa.int32())).slice(5, 20)
    a = pad_flat(arr.values.to_numpy(), arr.offsets.to_numpy(), 0)
    b = pad_rows(ids[5:25], 0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_rust_tokenizer_from_tokenizer_json_matches_transformers(tokenizer, data_root):
    """Actors load tokenizer.json directly (no transformers import); ids must not change."""
    texts = pd.read_parquet(data_root / "trec" / "train.parquet")["text"].tolist()[:500]
    texts += [" ".join(["Überraschung, naïve café!"] * 40), "", "   "]
    values, offsets = encode_flat(load_fast_tokenizer("default"), texts, 64)
    ref = tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == ref
    assert values.dtype == np.int32 and offsets[0] == 0 and offsets[-1] == len(values)


def test_pairs_match_transformers_ids_types_and_longest_first_truncation(tokenizer, data_root):
    df = pd.read_parquet(data_root / "mrpc" / "train.parquet").head(200)
    a, b = df["sentence1"].tolist(), df["sentence2"].tolist()
    b[0] = " ".join(["long"] * 80)  # the longer side loses tokens first
    values, offsets, types = encode_flat(load_fast_tokenizer("default"), a, 32, pairs=b)
    ref = tokenizer(a, b, truncation="longest_first", max_length=32)
    rows = [(values[s:e].tolist(), types[s:e].tolist()) for s, e in zip(offsets[:-1], offsets[1:], strict=True)]
    assert rows == list(zip(ref["input_ids"], ref["token_type_ids"], strict=True))
    assert types.dtype == np.int8


def test_collate_pads_token_type_ids_with_the_ids_and_encodes_labels_by_problem():
    import torch

    from bertray.batches import collate
    from bertray.problem import MULTI, make

    ids = pa.array([[101, 7, 102, 8, 102], [101, 9, 102]], pa.list_(pa.int32()))
    types = pa.array([[0, 0, 0, 1, 1], [0, 0, 0]], pa.list_(pa.int8()))
    labels = pa.array([[0, 2], []], pa.list_(pa.int32()))
    batch = collate(pa.table({"input_ids": ids, "token_type_ids": types, "labels": labels}), 0,
                    torch.device("cpu"), make(MULTI, {"a": 0, "b": 1, "c": 2}))
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]

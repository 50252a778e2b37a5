"""Padding-free batches and torch.compile: the same logits and gradients as the padded path,
with the real MiniLM on real SST-2 and MRPC rows, on CPU (the paths GPUs run, checked here)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import smoke_config

from bertray.batches import collate, collate_padding_free
from bertray.config import ConfigError
from bertray.errors import BertrayError
from bertray.modeling import enable_padding_free, load_classifier, load_tokenizer
from bertray.tokenization import encode_flat, pack_flat

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture
def model():
    """Training mode (the paths training runs) with dropout 0, so two forward passes can be compared."""
    torch.manual_seed(0)
    m = load_classifier("default", {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"}, num_hidden_layers=2, dropout=0.0)
    enable_padding_free(m)
    return m.train()


def _table(tokenizer, texts, pairs=None, labels=None) -> pa.Table:
    values, offsets, *types = encode_flat(tokenizer.backend_tokenizer, texts, 128, pairs=pairs)
    types = types[0] if types else None
    columns = {"input_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))}
    if types is not None:
        columns["token_type_ids"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(types, pa.int8()))
    columns["labels"] = pa.array(labels if labels is not None else [0] * len(texts), pa.int64())
    return pa.table(columns)


@pytest.fixture(scope="module")
def sst2(tokenizer, data_root):
    df = pd.read_parquet(data_root / "sst2" / "validation.parquet").head(48)
    return _table(tokenizer, df["text"].tolist(), labels=df["label"].tolist())


@pytest.fixture(scope="module")
def mrpc(tokenizer, data_root):
    df = pd.read_parquet(data_root / "mrpc" / "validation.parquet").head(24)
    return _table(tokenizer, df["sentence1"].tolist(), df["sentence2"].tolist(), df["label"].tolist())


@pytest.mark.parametrize("lengths", [
    np.random.default_rng(0).integers(2, 40, size=57),  # mixed
    np.array([64, 64, 32, 32]),  # rows filled exactly: no padding at all
    np.array([1, 64, 3, 1]),  # one-token texts, a text as long as a row
], ids=["mixed", "full", "edges"])
def test_pack_places_every_token_once_in_order_with_positions_restarting(lengths):
    offsets = np.concatenate([[5], 5 + np.cumsum(lengths)])  # a slice of a longer array, as Arrow gives
    values = np.random.default_rng(1).integers(1000, 30000, size=offsets[-1])
    ids, positions, starts = pack_flat(values, offsets, 0, 64)
    assert ids.shape == positions.shape and ids.shape[1] == 64
    assert ids.shape[0] <= -(-lengths.sum() // 64) + 2  # first-fit decreasing leaves little room unused
    flat_ids, flat_pos = ids.reshape(-1), positions.reshape(-1)
    used = np.zeros(flat_ids.size, bool)
    for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        assert start // 64 == (start + n - 1) // 64  # a text never crosses rows
        np.testing.assert_array_equal(flat_ids[start:start + n], values[offsets[i]:offsets[i + 1]])
        np.testing.assert_array_equal(flat_pos[start:start + n], np.arange(n))
        assert not used[start:start + n].any()
        used[start:start + n] = True
    # the rest is padding at each row's end, every token at position 0 (a text of its own)
    assert (flat_ids[~used] == 0).all() and (flat_pos[~used] == 0).all()
    for row in used.reshape(ids.shape):
        assert row.tolist() == sorted(row.tolist(), reverse=True)
    if lengths.sum() % 64 == 0 and set(lengths) <= {32, 64}:
        assert used.all()


def test_pack_refuses_a_text_longer_than_a_row():
    with pytest.raises(ValueError, match="70 tokens does not fit a packed row of 64"):
        pack_flat(np.ones(72), np.array([0, 2, 72]), 0, 64)


def test_pack_refuses_a_text_with_no_tokens():
    # it would start where the next text starts and be classified by that text's first token
    with pytest.raises(ValueError, match="no tokens cannot be packed.*train.padding_free=false"):
        pack_flat(np.ones(5), np.array([0, 5, 5]), 0, 64)


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", ["sst2", "mrpc"])
def test_padding_free_logits_and_gradients_equal_the_padded_path(model, rows, attention, request):
    table = request.getfixturevalue(rows)
    model.set_attn_implementation(attention)
    padded, packed = collate(table, 0, CPU), collate_padding_free(table, 0, 128, CPU)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # fewer tokens computed
    if rows == "mrpc":
        assert packed["token_type_ids"].sum() == padded["token_type_ids"].sum() > 0
    (ref, ref_grads), (got, got_grads) = _loss_and_grads(model, padded), _loss_and_grads(model, packed)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert ref_grads.keys() == got_grads.keys()
    for name in ("classifier.weight", "bert.pooler.dense.weight", "bert.encoder.layer.0.attention.self.query.weight",
                 "bert.embeddings.position_embeddings.weight"):
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-5, rtol=1e-3)


def test_padding_free_logits_equal_the_padded_path_with_flex_attention(model, mrpc):
    """flex_attention skips the masked blocks; its backward has no CPU kernel, so forward only here."""
    model.set_attn_implementation("flex_attention")
    padded, packed = collate(mrpc, 0, CPU), collate_padding_free(mrpc, 0, 128, CPU)
    padded.pop("labels"), packed.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).logits, model(**padded).logits, atol=2e-5, rtol=1e-4)


def test_padding_free_model_still_takes_padded_batches(model, sst2):
    batch = collate(sst2, 0, CPU)
    batch.pop("labels")
    plain = load_classifier("default", {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"}, num_hidden_layers=2).eval()
    plain.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(**batch).logits, plain(**batch).logits)


def test_padding_free_refuses_a_model_it_cannot_pool(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2, num_labels=2)
    with pytest.raises(BertrayError, match="model_type='distilbert', class DistilBertForSequenceClassification.*"
                                           "train.padding_free=false"):
        enable_padding_free(DistilBertForSequenceClassification(config))
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path / "distil")
    with pytest.raises(ConfigError, match=r"train.padding_free=true needs a BERT-type model.*distilbert"):
        smoke_config(tmp_path / "out", f"model.name={tmp_path / 'distil'}", "train.padding_free=true")
    smoke_config(tmp_path / "out", f"model.name={tmp_path / 'distil'}")  # the same model without it: fine


def test_padding_free_refuses_flash_attention(tmp_path):
    """Hugging Face's FlashAttention path keeps packed texts apart only in a one-row batch."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    model.config._attn_implementation_internal = "flash_attention_2"  # flash-attn itself needs a GPU
    with pytest.raises(BertrayError, match="attn_implementation='flash_attention_2'.*train.padding_free=false"):
        enable_padding_free(model)
    model.config._attn_implementation_internal = "sdpa"
    model.save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "attn_implementation": "flash_attention_2"}))
    with pytest.raises(ConfigError, match=r"needs attention in \['sdpa', 'eager', 'flex_attention'\]"):
        smoke_config(tmp_path / "out", f"model.name={tmp_path / 'bert'}", "train.padding_free=true")
    smoke_config(tmp_path / "out", f"model.name={tmp_path / 'bert'}")  # the same model without it: fine


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_padded_and_padding_free(model, sst2):
    padded, packed = collate(sst2, 0, CPU), collate_padding_free(sst2, 0, 128, CPU)
    eager = [_loss_and_grads(model, padded), _loss_and_grads(model, packed)]
    model.compile()
    compiled = [_loss_and_grads(model, padded), _loss_and_grads(model, packed)]
    with torch.inference_mode():  # evaluation's mode: another graph
        inference = model(**{k: v for k, v in padded.items() if k != "labels"}).logits
    for (e_logits, e_grads), (c_logits, c_grads) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c_logits, e_logits, atol=2e-5, rtol=1e-4)
        for name in ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"):
            torch.testing.assert_close(c_grads[name], e_grads[name], atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(compiled[1][0], compiled[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(inference, eager[0][0], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_ddp_run_padding_free_and_compiled_exports_a_plain_model_with_its_reported_accuracy(ray_session, tmp_path,
                                                                                             data_root):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bertray.train import run

    cfg = smoke_config(tmp_path / "pf", "scaling.num_workers=2", "train.batch_size=8", "train.amp=fp32",
                       "train.epochs=1", "train.padding_free=true", "train.torch_compile=true")
    result = run(cfg)
    model, info = AutoModelForSequenceClassification.from_pretrained(result.model_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or renamed (``_orig_mod.``) weights
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    val = pd.read_parquet(data_root / "trec" / "test.parquet").head(cfg.data.max_validation_rows or None)
    label2id = model.config.label2id
    with torch.inference_mode():
        enc = tok(val["text"].tolist(), truncation=True, max_length=cfg.train.max_length, padding=True,
                  return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1).numpy()
    truth = np.array([label2id[v] if isinstance(v, str) else int(v) for v in val["label"]])
    assert np.mean(predicted == truth) == pytest.approx(result.metrics["accuracy"], abs=1e-9)

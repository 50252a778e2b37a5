"""bertray.scoring.Scorer on the real default model: length-sorted, padded micro-batches give
each row the logits of that row's own unpadded forward pass, in the input's order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import bertray
from bertray.modeling import resolve_model_path
from bertray.scoring import IDS, TYPES, Scorer, TorchRunner
from bertray.tokenization import token_columns

EXAMPLES = Path(bertray.__file__).parent / "example_data"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    base = resolve_model_path("default")
    out = tmp_path_factory.mktemp("classifier")
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, use_safetensors=True).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def one_by_one(classifier, tokens: pa.Table) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(classifier, use_safetensors=True).eval()
    rows = []
    with torch.inference_mode():
        for i in range(tokens.num_rows):
            inputs = {c: torch.tensor([tokens.column(c)[i].as_py()]) for c in (IDS, TYPES) if c in tokens.column_names}
            rows.append(model(**inputs).logits[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("pairs", [False, True], ids=["texts", "pairs"])
def test_micro_batches_give_each_row_its_own_logits_in_input_order(classifier, pairs):
    table = pq.read_table(EXAMPLES / ("mrpc" if pairs else "sst2") / "validation.parquet").slice(0, 23)
    texts = table.column("sentence1" if pairs else "text").to_pylist()
    second = table.column("sentence2").to_pylist() if pairs else None
    tokens = pa.table(token_columns(AutoTokenizer.from_pretrained(classifier), texts, 64, pairs=second))
    lengths = [len(r) for r in tokens.column(IDS).to_pylist()]
    assert len(set(lengths)) > 5 and lengths != sorted(lengths)  # the order must really be restored

    logits = Scorer(TorchRunner(str(classifier), "fp32", 2), 4, 0).logits(tokens)  # 23 rows: a partial last batch
    assert logits.shape == (23, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, one_by_one(classifier, tokens), atol=1e-4)

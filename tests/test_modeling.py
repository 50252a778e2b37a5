import pytest
import torch

from bertray.batches import Prefetch, Timed
from bertray.loop import param_groups
from bertray.modeling import AttentionSwitch, load_classifier, load_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_classifier("default", {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"}, num_hidden_layers=2).eval()


def test_attention_switch_picks_by_width_and_keeps_the_outputs(model):
    tok = load_tokenizer("default")
    short = tok(["a fine film", "dull and far too long for what it has to say"], padding=True, return_tensors="pt")
    switch = AttentionSwitch(model, max_eager_width=8)
    assert switch.enabled
    with torch.inference_mode():
        switch(8)
        assert model.config._attn_implementation == "eager"
        eager = model(**short).logits
        switch(9)
        assert model.config._attn_implementation == "sdpa"
        sdpa = model(**short).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-4)


def test_attention_switch_keeps_sdpa_where_the_model_has_no_eager_choice(model):
    model.set_attn_implementation("eager")  # switching needs an SDPA model to start from
    try:
        switch = AttentionSwitch(model, max_eager_width=8)
        switch(64)
        assert not switch.enabled and model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")


def test_prefetch_yields_every_item_in_order_and_reraises_in_the_consumer():
    assert list(Prefetch(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert list(Prefetch(iter([]))) == []

    def broken():
        yield 1
        raise ValueError("bad block in part-3.parquet")

    with pytest.raises(ValueError, match="part-3"):
        list(Prefetch(broken()))

    def broken_at_start():
        raise OSError("no such file")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="no such file"):
        list(Prefetch(broken_at_start()))


def test_timed_counts_only_the_wait_for_items():
    import time

    def slow():
        time.sleep(0.2)
        yield 1

    timed = Timed(slow())
    assert list(timed) == [1]
    assert 0.2 <= timed.seconds < 1.0


def test_layer_lr_decay_scales_each_layer_from_the_head_down(model):
    groups = param_groups(model, 0.01, 1e-4, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sorted(map(id, model.parameters())) == sorted(lr_of)  # every parameter exactly once
    params = dict(model.named_parameters())
    lr = lambda name: lr_of[id(params[name])]  # noqa: E731
    assert lr("classifier.weight") == lr("bert.pooler.dense.weight") == 1e-4
    assert lr("bert.encoder.layer.1.output.dense.weight") == pytest.approx(0.5e-4)  # top of 2 layers
    assert lr("bert.encoder.layer.0.attention.self.query.weight") == pytest.approx(0.25e-4)
    assert lr("bert.embeddings.word_embeddings.weight") == pytest.approx(0.125e-4)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(params["bert.encoder.layer.0.output.LayerNorm.weight"]) in no_decay
    assert id(params["bert.encoder.layer.0.output.dense.weight"]) not in no_decay
    assert {g["lr"] for g in param_groups(model, 0.01, 1e-4)} == {1e-4}  # 1.0: off

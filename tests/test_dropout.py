"""FastDropout: the mask distribution, gradients, repeatability, and that a real model's
dropouts go through it. Pure torch: no Ray."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from bertray.dropout import FastDropout, keep_mask
from bertray.modeling import load_classifier, load_tokenizer


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_keeps_the_right_share(p):
    torch.manual_seed(0)
    n = 1_000_000
    mask, kept = keep_mask((1000, 1000), 1 - p)
    assert abs(kept - (1 - p)) <= 1 / 65536
    sigma = math.sqrt(kept * (1 - kept) / n)
    assert abs(mask.float().mean().item() - kept) < 5 * sigma


def test_dropout_is_unbiased_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.full((2000, 1000), 3.0, requires_grad=True)
    with FastDropout():
        y = F.dropout(x, 0.1, training=True)
    _, kept = keep_mask((1,), 0.9)
    assert y.detach().unique().tolist() == pytest.approx([0.0, 3.0 / kept])
    assert y.mean().item() == pytest.approx(3.0, rel=2e-3)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / kept)


def test_outside_training_and_on_p_zero_input_is_unchanged():
    x = torch.randn(64, 64)
    with FastDropout():
        assert torch.equal(F.dropout(x, 0.1, training=False), x)
        assert torch.equal(F.dropout(x, 0.0, training=True), x)
        with pytest.raises(ValueError, match="dropout probability"):
            F.dropout(x, 1.5, training=True)  # torch's own argument check still applies


def test_a_real_model_draws_its_masks_here():
    torch.manual_seed(0)
    tok = load_tokenizer("default")
    model = load_classifier("default", {"a": 0, "b": 1}, {0: "a", 1: "b"}, num_hidden_layers=2)
    batch = tok(["a film of quiet, unforced grace", "dull and far too long"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
    model.train()

    def forward(seed: int, fast: bool) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad(), (FastDropout() if fast else nullcontext()):
            return model(**batch).logits

    fast = forward(1, True)
    assert torch.equal(fast, forward(1, True))  # repeatable under a seed
    assert not torch.equal(fast, plain)  # dropout is applied
    assert not torch.equal(fast, forward(2, True))
    assert not torch.equal(fast, forward(1, False))  # other masks than torch's own: the mode took over

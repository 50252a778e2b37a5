"""Tokenization of a batch and dynamic padding. Pure: no ``ray``, no work at import.

Rows are tokenized without padding and stored as variable-length ``input_ids``; a
batch is padded only when it is formed, to its longest row rounded up to a multiple
of 8 (tensor-core and bf16-kernel friendly), never to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_MULTIPLE = 8


def tokenize(tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head") -> list[list[int]]:
    """Token ids per text, with special tokens, truncated to ``max_length``.

    ``truncation="head"`` keeps the first tokens. ``"head_tail"`` keeps the first quarter
    and the last three quarters of the budget, which classifies long reviews better than
    the head alone (Sun et al., 2019, "How to Fine-Tune BERT for Text Classification").
    """
    if truncation == "head":
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]
    if truncation != "head_tail":
        raise ValueError(f"truncation={truncation!r}: use 'head' or 'head_tail'")
    enc = tokenizer(list(texts), truncation=False, padding=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    head = max_length // 4
    tail = max_length - head
    # [CLS] is inside the head and [SEP] inside the tail, so special tokens survive.
    return [ids if len(ids) <= max_length else ids[:head] + ids[-tail:] for ids in enc["input_ids"]]


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Stable order that groups rows of similar length (for bucketing)."""
    return np.argsort(lengths, kind="stable")


def pad_flat(values: np.ndarray, offsets: np.ndarray, pad_id: int, multiple: int = PAD_MULTIPLE
             ) -> tuple[np.ndarray, np.ndarray]:
    """Pad rows given as one flat array plus offsets (Arrow's list layout).

    Returns ``(input_ids, attention_mask)`` of shape ``(rows, L)`` where ``L`` is the
    longest row rounded up to ``multiple``.
    """
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if len(lengths) else 0
    width = max(multiple, -(-longest // multiple) * multiple)
    mask = np.arange(width)[None, :] < lengths[:, None]
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    # Row-major boolean assignment fills each row left to right, matching the flat order.
    input_ids[mask] = values[offsets[0]:offsets[-1]]
    return input_ids, mask.astype(np.int64)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`pad_flat` for a list of id lists."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
    return pad_flat(values, offsets, pad_id, multiple)

"""Tokenization of a batch and dynamic padding. Pure: no ``ray``, no work at import.

Rows are tokenized without padding and stored as variable-length ``input_ids``; a
batch is padded only when it is formed, to its longest row (on GPUs rounded up to a
multiple of 8, see :func:`pad_multiple`), never to ``max_length``; or, padding-free,
packed end to end into rows of ``max_length`` tokens (:func:`pack_flat`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD_MULTIPLE = 8


def pad_multiple(device_type: str) -> int:
    """The width multiple to pad batches to on ``device_type`` (``"cuda"``, ``"cpu"``...).

    Rounding up to 8 feeds GPU tensor cores; on CPU it only adds work: SST-2 rows average
    13 tokens, so rounding adds ~25% of tokens and cost ~10% of training speed.
    """
    return PAD_MULTIPLE if device_type == "cuda" else 1


def encode_flat(tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head",
                pairs: Sequence[str] | None = None):
    """Token ids (with special tokens) of every text, as one flat int32 array plus row offsets.

    That is Arrow's list layout, so a batch becomes a ``list<int32>`` column without a Python
    list per row. ``tokenizer`` is a ``tokenizers.Tokenizer`` (the Rust backend) or a
    Hugging Face fast tokenizer (its backend is used). ``encode_batch_fast`` skips the
    character offsets a classifier never uses.

    ``truncation="head"`` keeps the first ``max_length`` tokens. ``"head_tail"`` keeps the
    first quarter and the last three quarters of the budget, which classifies long reviews
    better than the head alone (Sun et al., 2019, "How to Fine-Tune BERT for Text
    Classification"); [CLS] is inside the head and [SEP] inside the tail, so both survive.

    ``pairs``: the second text of each row. The rows are then ``[CLS] a [SEP] b [SEP]``,
    truncated ``longest_first`` (the longer text loses tokens first, as ``transformers`` does),
    and the result is ``(values, offsets, token_type_ids)``, the type ids in the ids' layout.
    """
    if truncation not in ("head", "head_tail"):
        raise ValueError(f"truncation={truncation!r}: use 'head' or 'head_tail'")
    if pairs is not None and truncation != "head":
        raise ValueError("text pairs are truncated longest_first: use truncation='head'")
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if truncation == "head":
        # counts the special tokens the post-processor adds
        backend.enable_truncation(max_length, strategy="longest_first")
    else:
        backend.no_truncation()
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(list(texts) if pairs is None else list(zip(texts, pairs, strict=True)))
    rows = [e.ids for e in encodings]
    if truncation == "head_tail":
        head = max_length // 4
        tail = max_length - head
        rows = [ids if len(ids) <= max_length else ids[:head] + ids[-tail:] for ids in rows]
    values, offsets = _flat(rows, np.int32)
    if pairs is None:
        return values, offsets
    return values, offsets, _flat([e.type_ids for e in encodings], np.int8)[0]


def _flat(rows: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, rows), dtype=np.int32, count=len(rows)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return values, offsets


def tokenize(tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head") -> list[list[int]]:
    """:func:`encode_flat` as one Python list of ids per text."""
    values, offsets = encode_flat(tokenizer, texts, max_length, truncation)
    return [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def length_order(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An order that groups rows of similar length (for bucketing), rows of equal length in
    random order: the batches cut from it hold similar lengths yet change from epoch to epoch."""
    shuffled = rng.permutation(len(lengths))
    return shuffled[np.argsort(lengths[shuffled], kind="stable")]


def token_columns(tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head",
                  pairs: Sequence[str] | None = None) -> dict:
    """:func:`encode_flat` as Arrow list columns: ``input_ids`` (and ``token_type_ids`` for pairs)."""
    import pyarrow as pa

    encoded = encode_flat(tokenizer, texts, max_length, truncation, pairs=pairs)
    offsets = pa.array(encoded[1])
    cols = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(encoded[0]))}
    if pairs is not None:
        cols["token_type_ids"] = pa.ListArray.from_arrays(offsets, pa.array(encoded[2]))
    return cols


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


def first_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``lengths`` tokens placed end to end in bins of ``width`` tokens, longest row
    first, each into the first bin with room (first-fit decreasing).

    Returns ``(bin, offset)`` of every row (in row order) and each bin's filled tokens.
    """
    bins: list[int] = []
    where = np.empty(len(lengths), dtype=np.int64)
    offset = np.empty(len(lengths), dtype=np.int64)
    for row in np.argsort(-lengths, kind="stable"):
        n = int(lengths[row])
        if n > width:
            raise ValueError(f"a row of {n} tokens does not fit a packed row of {width} tokens")
        if n == 0:  # it would start where the next row starts, and be classified by that row's first token
            raise ValueError("a text tokenized to no tokens cannot be packed: its tokenizer adds no special "
                             "tokens such as [CLS]; use one that does, or set train.padding_free=false")
        b = next((b for b, filled in enumerate(bins) if filled + n <= width), len(bins))
        if b == len(bins):
            bins.append(0)
        where[row], offset[row] = b, bins[b]
        bins[b] += n
    return where, offset, np.asarray(bins, dtype=np.int64)


@dataclass(frozen=True)
class Packing:
    """Where each token of a batch goes in Hugging Face's padding-free layout: the rows packed
    end to end (:func:`first_fit`) into rows of ``width`` tokens, ``position_ids`` restarting
    at 0 with every text and so marking where one text ends and the next begins. Computed once
    per batch and applied to every column with the rows' layout (ids, token type ids)."""

    width: int
    target: np.ndarray
    """The flat index (into ``bins * width``) of every token, in the rows' flat order."""
    position_ids: np.ndarray
    """``(bins, width)``. A bin's unused tail sits at position 0, so each padding token is a
    text of its own (attending only to itself, never read) and no position exceeds the
    longest text's."""
    starts: np.ndarray
    """For every row in order, the flat index of its first token."""

    @classmethod
    def of(cls, offsets: np.ndarray, width: int) -> Packing:
        lengths = np.diff(offsets)
        where, offset, filled = first_fit(lengths, width)
        starts = where * width + offset
        within = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], lengths)
        target = np.repeat(starts, lengths) + within
        position_ids = np.zeros(len(filled) * width, dtype=np.int64)
        position_ids[target] = within
        return cls(width, target, position_ids.reshape(-1, width), starts)

    def place(self, values: np.ndarray, offsets: np.ndarray, fill: int) -> np.ndarray:
        """A column (one flat array plus offsets, laid out as the rows packed) as ``(bins, width)``."""
        out = np.full(self.position_ids.size, fill, dtype=np.int64)
        out[self.target] = values[offsets[0]:offsets[-1]]
        return out.reshape(-1, self.width)


def pack_flat(values: np.ndarray, offsets: np.ndarray, pad_id: int, width: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (one flat array plus offsets) in the padding-free layout (:class:`Packing`):
    ``(input_ids, position_ids, starts)``."""
    packing = Packing.of(offsets, width)
    return packing.place(values, offsets, pad_id), packing.position_ids, packing.starts


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`pad_flat` for a list of id lists."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
    return pad_flat(values, offsets, pad_id, multiple)

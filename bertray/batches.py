"""Training and evaluation batches: drawn from a shard, padded into tensors. No ``ray`` here.

A shard is anything with Ray Data's ``iter_batches(batch_size=, batch_format="pyarrow",
prefetch_batches=)`` (a ``DataIterator`` in a Ray Train worker); its rows are tokenized
(``input_ids`` list<int32>, optional ``token_type_ids`` and ``labels``).
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bertray.tokenization import Packing, length_order, pad_flat, pad_multiple


def collate(table: pa.Table, pad_id: int, device: torch.device, problem=None) -> dict[str, torch.Tensor]:
    """A batch for ``model(**batch)``: ``input_ids``, ``attention_mask`` (``token_type_ids`` for
    pairs, ``labels`` when present: ``problem.batch_labels``, default class ids) on ``device``."""
    ids = table.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    multiple = pad_multiple(device.type)
    input_ids, attention_mask = pad_flat(ids.values.to_numpy(), offsets, pad_id, multiple)
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if "token_type_ids" in table.column_names:
        types = table.column("token_type_ids").combine_chunks()  # the same row lengths as input_ids
        batch["token_type_ids"] = torch.from_numpy(
            pad_flat(types.values.to_numpy(), types.offsets.to_numpy(), 0, multiple)[0])
    return _to_device(batch, table, device, problem)


def collate_padding_free(table: pa.Table, pad_id: int, max_length: int, device: torch.device,
                         problem=None) -> dict[str, torch.Tensor]:
    """A padding-free batch: the rows packed end to end into rows of ``max_length`` tokens
    (rounded up to the device's pad multiple), with ``position_ids`` restarting at each text
    and ``sequence_starts`` (each text's first token, for the classifier head) instead of an
    ``attention_mask``. For a model prepared by :func:`bertray.modeling.enable_padding_free`."""
    ids = table.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    multiple = pad_multiple(device.type)
    width = -(-max_length // multiple) * multiple
    packing = Packing.of(offsets, width)
    batch = {"input_ids": torch.from_numpy(packing.place(ids.values.to_numpy(), offsets, pad_id)),
             "position_ids": torch.from_numpy(packing.position_ids), "sequence_starts": torch.from_numpy(packing.starts)}
    if "token_type_ids" in table.column_names:
        types = table.column("token_type_ids").combine_chunks()  # the same row lengths as input_ids
        batch["token_type_ids"] = torch.from_numpy(packing.place(types.values.to_numpy(), types.offsets.to_numpy(), 0))
    return _to_device(batch, table, device, problem)


def _to_device(batch: dict, table: pa.Table, device: torch.device, problem) -> dict[str, torch.Tensor]:
    """``batch`` with the table's ``labels`` added (when present), on ``device``."""
    if "labels" in table.column_names:
        column = table.column("labels")
        # a copy: Arrow's buffers are read-only
        batch["labels"] = problem.batch_labels(column) if problem is not None else torch.tensor(column.to_numpy())
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def epoch_seed(seed: int, epoch: int, rank: int) -> list[int]:
    """The shuffle seed of one worker's epoch: another order every epoch and on every worker,
    and the same order again when a resumed worker redraws the epoch."""
    return [seed, epoch, rank]


def iterate(shard, batch_size: int, pool_rows: int, bucketing: bool, seed):
    """Batches (Arrow tables, unpadded; :func:`collate` pads them) from a Ray Data shard.

    Rows are shuffled within pools of ``pool_rows`` rows (whole batches) drawn with ``seed``
    (anything ``numpy.random.default_rng`` takes), which the caller changes every epoch. With
    ``bucketing``, each pool is then sorted by length (ties in shuffled order), cut into
    batches, and the batches come in random order: Hugging Face's ``group_by_length``,
    streamed. So a batch holds rows of similar length (little padding), and which rows share
    a batch changes from epoch to epoch. The same shard order and seed give the same batches.
    ``pool_rows=0``: batches in data order (evaluation).
    """
    if not pool_rows:
        yield from shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=4)
        return
    pool_rows = max(1, pool_rows // batch_size) * batch_size
    rng = np.random.default_rng(seed)
    for pool in shard.iter_batches(batch_size=pool_rows, batch_format="pyarrow", prefetch_batches=2):
        if bucketing:
            order = length_order(pc.list_value_length(pool.column("input_ids")).to_numpy(), rng)
        else:
            order = rng.permutation(pool.num_rows)
        pool = pool.take(pa.array(order))
        starts = np.arange(0, pool.num_rows, batch_size)
        if bucketing:
            rng.shuffle(starts)
        for start in starts:
            yield pool.slice(start, batch_size)


class Digest:
    """A running fingerprint of the batches trained so far in an epoch (their rows, in order).

    Saved with a mid-epoch checkpoint; a resumed worker recomputes it over the batches it
    skips, so it knows whether it skipped exactly the rows that were trained.
    """

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        ids = table.column("input_ids").combine_chunks()
        self._hash.update(pc.list_value_length(ids).to_numpy(zero_copy_only=False).tobytes())
        self._hash.update(ids.flatten().to_numpy(zero_copy_only=False).tobytes())
        self.rows += table.num_rows

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class Prefetch:
    """Pulls the first item of an iterator in a background thread right away.

    A training worker's data pipeline needs seconds to deliver its first batch (a tokenizer
    actor process starts, the first block is read and tokenized); started before the model
    loads, or before the previous epoch's evaluation, that start-up overlaps other work
    instead of following it.
    """

    def __init__(self, iterable):
        self._it = iter(iterable)
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, name="bertray-prefetch", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the training thread
            self._error = e

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._it


class Timed:
    """An iterator that adds up the time spent waiting for its next item (the data wait)."""

    def __init__(self, iterable):
        self._it = iter(iterable)
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - start

"""The training recipe (bertray/loop.py) without Ray: real MiniLM (2 layers), real TREC rows,
a shard held in memory. Ray Train's part (shards, DDP, reports) is tested in test_train.py."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import smoke_config
from safetensors.torch import load_file, save_file

from bertray import loop
from bertray.batches import Prefetch
from bertray.checkpoint import export_model, save_checkpoint
from bertray.data import Tokenize
from bertray.errors import BertrayError, NonFiniteError
from bertray.loop import Decision, Rules, TrainState, decide, update_best_k

TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


class TableShard:
    """A dataset shard held in memory: the ``iter_batches`` that the loop uses from Ray Data's
    ``DataIterator``, in a fixed order (as Ray Data gives with ``preserve_order``)."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow", prefetch_batches: int = 0):
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


class Published:
    """Every report the loop publishes; checkpoints copied out before the loop deletes them.
    ``stop_after``: raise after that many checkpoints, as a killed worker would stop."""

    def __init__(self, where: Path, stop_after: int | None = None):
        self.where, self.stop_after = where, stop_after
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir:
            dest = self.where / f"checkpoint_{len(self.checkpoints)}"
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoints.append(dest)
            if self.stop_after is not None and len(self.checkpoints) >= self.stop_after:
                raise Killed


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tokenized(data_root):
    import pyarrow.parquet as pq

    table = pq.read_table(data_root / "trec" / "train.parquet", columns=["text", "label"])
    tok = Tokenize("default", 32, {n: i for i, n in enumerate(TREC_LABELS)})
    return tok(table.slice(0, 40)), tok(table.slice(1000, 16))


def make_recipe(tmp_path: Path, tokenized, *overrides: str, publish=None, resume_dir=None):
    train, val = tokenized
    # One encoder layer, frozen: the loop's logic is the same, a step costs a fraction
    cfg = smoke_config(tmp_path / "out", "model.num_hidden_layers=1", "model.freeze_encoder=true",
                       "train.batch_size=4", "train.shuffle_buffer_rows=16", "train.epochs=1", "train.max_length=32",
                       "train.log_every_n_steps=2", "train.amp=fp32", *overrides)
    job = loop.Job(cfg=cfg, label2id={n: i for i, n in enumerate(TREC_LABELS)},
                   id2label=dict(enumerate(TREC_LABELS)), train_rows=train.num_rows)
    worker = loop.Worker()
    parts, state = loop.setup(job, worker, resume_dir)
    reporter = loop.Reporter(0, publish or Published(tmp_path))
    return loop.Recipe(job, worker, parts, TableShard(train), TableShard(val), reporter), state


class Recording:
    """The batches a loop pulls from an epoch's iterator, in order."""

    def __init__(self, batches):
        self._it = iter(batches)
        self.pulled: list[list[tuple]] = []

    def __iter__(self):
        return self

    def __next__(self):
        table = next(self._it)
        self.pulled.append([tuple(r) for r in table.column("input_ids").to_pylist()])
        return table


# ----------------------------------------------------------------------------- pure decisions


def _record(epoch, step, **metrics):
    return {"epoch": epoch, "global_step": step, **metrics}


def test_early_stopping_after_patience_epochs_without_improvement():
    rules = Rules(metric="accuracy", epochs=10, patience=2, keep=2)
    state = TrainState()
    decisions = []
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.55], start=1):
        state, d = decide(state, _record(epoch, epoch * 10, accuracy=acc), rules, epoch_done=True)
        decisions.append(d)
    assert [d.improved for d in decisions] == [True, True, False, False]  # equal is not better
    assert [d.stop_early for d in decisions] == [False, False, False, True]
    assert state.epoch == 4 and state.stopped_early and state.best == 0.6 and state.stale_epochs == 2
    assert [r["accuracy"] for r in state.history] == [0.5, 0.6, 0.6, 0.55]


def test_decide_is_pure_and_mid_epoch_evaluations_do_not_count_towards_patience():
    rules = Rules(metric="loss", epochs=3, patience=1)
    state = TrainState(epoch=1, global_step=20, step_in_epoch=5, batches_in_epoch=10, rows_in_epoch=80,
                       epoch_digest="abc", best=0.4, stale_epochs=0)
    before = TrainState.from_json(state.to_json())
    mid, d = decide(state, _record(1, 20, loss=0.9), rules, epoch_done=False)
    assert state == before  # unchanged
    assert d == Decision(improved=False, stop_early=False)
    assert (mid.epoch, mid.batches_in_epoch, mid.stale_epochs) == (1, 10, 0)  # epoch not advanced, nothing stale
    end, d = decide(mid, _record(2, 30, loss=0.3), rules, epoch_done=True)  # loss: lower is better
    assert d.improved and end.best == 0.3
    assert (end.epoch, end.step_in_epoch, end.batches_in_epoch, end.rows_in_epoch, end.epoch_digest) == (2, 0, 0, 0, "")
    last, d = decide(end, _record(3, 40, loss=0.5), rules, epoch_done=True)
    assert last.stale_epochs == 1 and not d.stop_early  # the last epoch: nothing left to stop


def test_best_k_keeps_the_best_evaluations_best_first():
    ranked: list[dict] = []
    for step, acc in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7), (5, 0.4)]:
        ranked = update_best_k(ranked, {"global_step": step, "value": acc}, "accuracy", keep=2)
    assert [e["global_step"] for e in ranked] == [2, 4]  # of equal values the earlier ranks first
    losses: list[dict] = []
    for step, value in [(1, 0.5), (2, 0.3), (3, 0.4), (4, float("nan"))]:
        losses = update_best_k(losses, {"global_step": step, "value": value}, "loss", keep=3)
    assert [e["global_step"] for e in losses] == [2, 3, 1]  # a NaN never ranks above a number

    state = TrainState()
    rules = Rules(metric="f1_macro", epochs=3, keep=2)
    for epoch, f1 in enumerate([0.2, 0.5, 0.3], start=1):
        state, _ = decide(state, _record(epoch, epoch, f1_macro=f1), rules, epoch_done=True)
    assert [e["epoch"] for e in state.best_k] == [2, 3]


def test_train_state_round_trips_and_reads_older_states():
    state = TrainState(epoch=2, global_step=7, best=0.5, best_k=[{"epoch": 1, "global_step": 3, "value": 0.5}],
                       history=[{"epoch": 1, "accuracy": 0.5}])
    assert TrainState.from_json(state.to_json()) == state
    old = {"epoch": 1, "step_in_epoch": 0, "global_step": 4, "best": 0.3, "stale_epochs": 0,
           "stopped_early": False, "history": [], "restores": 0, "removed_key": 1}
    assert TrainState.from_json(json.dumps(old)) == TrainState(epoch=1, global_step=4, best=0.3)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_scheduler_is_hugging_faces_with_its_trainers_warmup_count(kind, tmp_path):
    total, ratio, lr = 40, 0.06, 1e-3
    warmup = math.ceil(ratio * total)  # Trainer's get_warmup_steps: 3 here, where int() would give 2
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = loop.build_scheduler(opt, kind, ratio, total)
    seen = []
    for _ in range(total):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()

    def expected(step):  # the schedules as Hugging Face documents them
        if step < warmup:
            return lr * step / warmup
        progress = (step - warmup) / (total - warmup)
        return lr * {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[kind]

    assert seen == pytest.approx([expected(s) for s in range(total)], abs=1e-12)
    assert seen[0] == 0.0 and seen[warmup] == pytest.approx(lr)
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    again = loop.build_scheduler(opt, kind, ratio, total)
    again.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))  # no pickled code
    assert again.get_last_lr() == sched.get_last_lr() and again.last_epoch == total


# ----------------------------------------------------------------------------- the loop on a real model


def test_accumulation_is_flushed_at_the_end_of_the_epoch(tmp_path, tokenized):
    # 40 rows in batches of 4: 10 micro-batches; accumulating 4: 2 full steps and a flush of 2
    recipe, state = make_recipe(tmp_path, tokenized, "train.grad_accum_steps=4")
    assert recipe.parts.total_steps == 3
    state, meter = loop.train_epoch(recipe, state, recipe.epoch_batches(0))
    assert (state.global_step, state.step_in_epoch, state.batches_in_epoch) == (3, 3, 10)
    assert meter.epoch_rows == 40
    assert recipe.parts.scheduler.last_epoch == 3
    opt_steps = {int(s["step"]) for s in recipe.parts.optimizer.state_dict()["state"].values()}
    assert opt_steps == {3}
    assert all(p.grad is None for p in recipe.parts.model.parameters())  # nothing left half-accumulated


def test_mid_epoch_resume_skips_exactly_the_rows_it_trained(tmp_path, tokenized, caplog):
    overrides = ("train.grad_accum_steps=2", "checkpoint.every_n_steps=2")
    published = Published(tmp_path / "first", stop_after=1)
    recipe, state = make_recipe(tmp_path / "a", tokenized, *overrides, publish=published)
    first = Recording(recipe.epoch_batches(0))
    with pytest.raises(Killed):  # the worker dies right after its first (mid-epoch) checkpoint
        loop.fit(recipe, state, first)
    ckpt = published.checkpoints[0]
    saved = TrainState.from_json((ckpt / "trainer_state.json").read_text())
    assert (saved.global_step, saved.batches_in_epoch) == (2, 4)
    trained_before = first.pulled
    assert len(trained_before) == 4 and saved.rows_in_epoch == sum(map(len, trained_before))

    resumed, state = make_recipe(tmp_path / "b", tokenized, *overrides, resume_dir=str(ckpt))
    assert (state.restores, state.resumed_at_epoch, state.global_step) == (1, 0, 2)
    second = Recording(resumed.epoch_batches(0))
    with caplog.at_level(logging.WARNING):
        state, _ = loop.train_epoch(resumed, state, second)
    assert "not exact" not in caplog.text
    skipped, trained_after = second.pulled[:4], second.pulled[4:]
    assert skipped == trained_before  # the same rows, in the same batches and order
    all_rows = sorted(r for b in trained_before + trained_after for r in b)
    assert all_rows == sorted(tuple(r) for r in tokenized[0].column("input_ids").to_pylist())  # each row once
    assert state.global_step == recipe.parts.total_steps == 5


def test_a_resume_that_cannot_skip_the_same_rows_says_so(tmp_path, tokenized, caplog):
    published = Published(tmp_path, stop_after=1)
    recipe, state = make_recipe(tmp_path / "a", tokenized, "checkpoint.every_n_steps=2", publish=published)
    with pytest.raises(Killed):
        loop.fit(recipe, state)
    # another seed draws other batches: the skipped rows are not the trained ones
    resumed, state = make_recipe(tmp_path / "b", tokenized, "checkpoint.every_n_steps=2", "train.seed=7",
                                 resume_dir=str(published.checkpoints[0]))
    with caplog.at_level(logging.WARNING):
        loop.train_epoch(resumed, state, resumed.epoch_batches(0))
    assert "resume of epoch 1 is not exact" in caplog.text


def test_fit_reports_each_epoch_and_saves_the_tokenizer_with_the_training_max_length(tmp_path, tokenized):
    published = Published(tmp_path)
    recipe, state = make_recipe(tmp_path, tokenized, "train.epochs=2", "train.max_length=24", publish=published)
    assert loop.fit(recipe, state, Prefetch(recipe.epoch_batches(0))) is None
    assert [r["epoch"] for r in published.reports] == [1, 2]
    last = TrainState.from_json((published.checkpoints[-1] / "trainer_state.json").read_text())
    assert (last.epoch, last.global_step) == (2, recipe.parts.total_steps)
    assert len(last.best_k) == 2 and [h["epoch"] for h in last.history] == [1, 2]
    from transformers import AutoTokenizer

    config = json.loads((published.checkpoints[-1] / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 24
    assert AutoTokenizer.from_pretrained(published.checkpoints[-1]).model_max_length == 24


def test_a_non_finite_loss_stops_training_and_nothing_is_saved(tmp_path, tokenized):
    published = Published(tmp_path)
    recipe, state = make_recipe(tmp_path, tokenized, "train.epochs=2", publish=published)
    with torch.no_grad():
        recipe.parts.model.classifier.weight[0, 0] = float("nan")  # diverged: every loss from step 1 on is NaN
    outcome = loop.fit(recipe, state)
    assert published.checkpoints == [] and published.reports == []
    with pytest.raises(NonFiniteError) as err:
        loop.raise_if_failed(outcome)
    assert isinstance(err.value, BertrayError)  # the CLI's exit 1, with the message
    message = str(err.value)
    assert "the training loss became nan at optimizer step 1 (epoch 1)" in message
    for hint in ("train.lr", "train.max_grad_norm", "train.amp=fp32"):
        assert hint in message
    loop.raise_if_failed(None)  # a finished run


def test_non_finite_weights_are_never_saved_or_exported(tmp_path, tokenized):
    recipe, _ = make_recipe(tmp_path, tokenized)
    p = recipe.parts
    good = tmp_path / "good"
    save_checkpoint(good, p.model, p.tokenizer, p.optimizer, p.scheduler, p.scaler, TrainState().to_json())
    export_model(good, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").exists()

    with torch.no_grad():
        p.model.bert.encoder.layer[0].output.dense.bias[3] = float("inf")  # frozen weights are checked too
    with pytest.raises(NonFiniteError, match="not finite"):
        save_checkpoint(tmp_path / "bad", p.model, p.tokenizer, p.optimizer, p.scheduler, p.scaler, "{}")
    assert not (tmp_path / "bad").exists()

    weights = load_file(good / "model.safetensors")
    weights["classifier.bias"][0] = float("nan")
    save_file(weights, good / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        export_model(good, tmp_path / "model2")
    assert not (tmp_path / "model2").exists()


def test_each_worker_redraws_the_same_batches_after_a_restart(ray_session, data_root):
    """What makes the resume skip exact with real Ray Data: a restarted worker group gets a new
    split of the training data, yet each rank receives the same rows in the same order, so
    its epoch's seed redraws the same batches."""
    from concurrent.futures import ThreadPoolExecutor

    from bertray.batches import epoch_seed, iterate
    from bertray.config import DataConfig
    from bertray.data import prepare
    from bertray.train import data_config

    cfg = DataConfig(train=str(data_root / "trec" / "train.parquet"), validation=str(data_root / "trec" / "test.parquet"),
                     max_train_rows=1200, tokenize_batch_size=100)  # 12 blocks to share between 2 workers
    ds = prepare(cfg, "default", 32, seed=0).train

    def draw():  # what Ray Train does when it (re)starts 2 workers
        shards = data_config(2).configure({"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)

        def batches(rank):
            it = iterate(shards[rank]["train"], 16, 64, True, epoch_seed(0, 1, rank))
            return [tuple(map(tuple, b.column("input_ids").to_pylist())) for b in it]

        with ThreadPoolExecutor(2) as pool:  # a streaming split is read by all its workers at once
            return list(pool.map(batches, range(2)))

    first, again = draw(), draw()
    assert first == again
    rows = [r for rank in first for b in rank for r in b]
    assert len(rows) == 1200 and sum(len(b) for b in first[0]) == sum(len(b) for b in first[1]) == 600

"""The per-worker training recipe: setup, one epoch, the end-of-epoch decision. No ``ray`` here.

A plain PyTorch loop written out in full: autocast, a ``GradScaler`` (enabled for fp16 only),
gradient accumulation, clipping, evaluation over all shards, checkpoints in Hugging Face
format with the run's :class:`TrainState`, and an exact mid-epoch resume. :func:`fit` runs
it; ``bertray.train.train_loop`` binds it to Ray Train (dataset shards, DDP, reports).

State lives in :class:`TrainState`; :func:`decide` (pure) ranks each evaluation, keeps the
best-K list, stops early and advances the epoch; :class:`Reporter` does the only I/O
(progress lines, TensorBoard, checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertray import calibration
from bertray import problem as bproblem
from bertray.batches import Digest, Prefetch, Timed, collate, collate_padding_free, epoch_seed, iterate
from bertray.checkpoint import load_checkpoint, save_checkpoint, unwrap, weights_finite
from bertray.config import RunConfig
from bertray.config_loader import config_from_dict
from bertray.dropout import FastDropout
from bertray.errors import NonFiniteError
from bertray.memory import keep_freed_memory
from bertray.metrics import is_better, scalar_metrics
from bertray.modeling import (
    INFERENCE_EAGER_MAX_WIDTH,
    AttentionSwitch,
    amp_dtype,
    enable_padding_free,
    load_classifier,
    load_tokenizer,
)
from bertray.problem import Problem
from bertray.report import TRAINING_FILE
from bertray.tracking import MetricLogger, Target

log = logging.getLogger(__name__)

TRAIN_EAGER_ATTENTION_MAX_WIDTH = 128
"""On CPU, training batches up to this many tokens wide use eager attention (faster than
SDPA there), wider ones SDPA."""

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
"""``train.scheduler`` -> the name ``transformers.get_scheduler`` knows (all warm up first)."""


# ----------------------------------------------------------------------------- state and decisions


@dataclass
class TrainState:
    """Everything a resumed worker needs besides weights, optimizer, scheduler and scaler;
    saved as ``trainer_state.json`` in every checkpoint."""

    epoch: int = 0
    """Epochs finished."""
    global_step: int = 0
    """Optimizer steps taken over the whole run."""
    step_in_epoch: int = 0
    """Optimizer steps taken in the current epoch."""
    batches_in_epoch: int = 0
    """Micro-batches trained in the current epoch: a resumed worker skips this many."""
    rows_in_epoch: int = 0
    """Rows in those micro-batches (checked against the rows skipped on resume)."""
    epoch_digest: str = ""
    """Fingerprint of those micro-batches, in order (:class:`bertray.batches.Digest`)."""
    best: float | None = None
    """Best value of ``checkpoint.metric`` so far."""
    best_k: list[dict] = field(default_factory=list)
    """The ``checkpoint.num_to_keep`` best evaluations, best first: ``epoch``, ``global_step``, ``value``."""
    stale_epochs: int = 0
    """Epochs since the metric last improved (early stopping)."""
    stopped_early: bool = False
    restores: int = 0
    """How many times the run was resumed from a checkpoint."""
    resumed_at_epoch: int | None = None
    """Finished epochs at the latest resume."""
    history: list[dict] = field(default_factory=list)
    """One record per evaluation: the metrics reported with its checkpoint."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        """A state saved by this or an earlier version (fields it lacks take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass(frozen=True)
class Rules:
    """What :func:`decide` reads from the config."""

    metric: str
    """``checkpoint.metric``."""
    epochs: int
    patience: int | None = None
    """``train.early_stopping_patience`` (None: never stop early)."""
    keep: int = 1
    """``checkpoint.num_to_keep``."""

    @classmethod
    def of(cls, cfg: RunConfig, problem: Problem | None = None) -> Rules:
        """``checkpoint.metric``, or when unset the problem type's default (single-label: accuracy)."""
        metric = cfg.checkpoint.metric or (problem.default_metric if problem else bproblem.SingleLabel.default_metric)
        return cls(metric, cfg.train.epochs, cfg.train.early_stopping_patience, cfg.checkpoint.num_to_keep)


@dataclass(frozen=True)
class Decision:
    improved: bool
    """This evaluation is the best so far."""
    stop_early: bool
    """Early stopping ends the run after this epoch."""


def update_best_k(best_k: list[dict], entry: dict, metric: str, keep: int) -> list[dict]:
    """``best_k`` with ``entry`` ranked in: at most ``keep`` entries, best first; of equal values
    the earlier evaluation ranks first."""
    at = next((i for i, e in enumerate(best_k) if is_better(metric, entry["value"], e["value"])), len(best_k))
    return [*best_k[:at], entry, *best_k[at:]][:max(keep, 1)]


def decide(state: TrainState, record: dict, rules: Rules, epoch_done: bool) -> tuple[TrainState, Decision]:
    """The state after an evaluation whose metrics are ``record``; pure (``state`` is not changed).

    Every evaluation may improve the best value and enter the best-K list; only an epoch's end
    counts towards early stopping and starts the next epoch (its counters back to 0).
    """
    value = record[rules.metric]
    improved = is_better(rules.metric, value, state.best)
    entry = {"epoch": record["epoch"], "global_step": record["global_step"], "value": value}
    new = dataclasses.replace(state, history=[*state.history, record],
                              best_k=update_best_k(state.best_k, entry, rules.metric, rules.keep))
    if improved:
        new.best, new.stale_epochs = value, 0
    elif epoch_done:
        new.stale_epochs += 1
    if not epoch_done:
        return new, Decision(improved, stop_early=False)
    new.epoch += 1
    new.step_in_epoch = new.batches_in_epoch = new.rows_in_epoch = 0
    new.epoch_digest = ""
    new.stopped_early = bool(rules.patience) and new.stale_epochs >= rules.patience and new.epoch < rules.epochs
    return new, Decision(improved, stop_early=new.stopped_early)


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)  # frozen, yet cached_property works: it writes the instance's __dict__
class Job:
    """What the driver computed for every worker: the ``train_loop_config``."""

    cfg: RunConfig
    label2id: dict[str, int]
    id2label: dict[int, str]
    train_rows: int
    class_weights: list[float] | None = None
    """Cross-entropy's ``weight`` or BCE's ``pos_weight``, one per label."""
    training_distribution: dict | None = None
    """The training labels' distribution, saved in every checkpoint (:mod:`bertray.report`)."""
    tracking: Target | None = None
    """The MLflow run rank 0 logs to (:mod:`bertray.tracking`)."""

    @classmethod
    def from_dict(cls, config: dict) -> Job:
        return cls(cfg=config_from_dict(config["cfg"]), label2id=config["label2id"],
                   id2label={int(k): v for k, v in config["id2label"].items()},
                   train_rows=config["train_rows"], class_weights=config.get("class_weights"),
                   training_distribution=config.get("training_distribution"),
                   tracking=Target.from_dict(config.get("mlflow")))

    def checkpoint_files(self) -> dict[str, str]:
        """Files every checkpoint carries beside the model (and the exported model with it)."""
        if self.training_distribution is None:
            return {}
        return {TRAINING_FILE: json.dumps(self.training_distribution, indent=2)}

    @functools.cached_property
    def problem(self) -> Problem:
        """The run's problem type with its label map (``cfg.model.problem_type``: resolved by the
        driver; ``auto`` here only in callers that train classes, such as the loop's tests)."""
        name = self.cfg.model.problem_type
        name = bproblem.SINGLE if name == bproblem.AUTO else name
        return bproblem.make(name, None if name == bproblem.REGRESSION else self.label2id,
                             label_separator=self.cfg.data.label_separator, label_name=self.id2label[0])


@dataclass(frozen=True)
class Worker:
    """Where this copy of the loop runs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""


@dataclass
class Parts:
    """The objects :func:`setup` builds and every step uses."""

    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    """autocast dtype (None: fp32)."""
    loss_weight: torch.Tensor | None
    attention: AttentionSwitch
    eval_attention: AttentionSwitch
    dropout_masks: Callable
    total_steps: int


_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")  # encoder.layer.3. (BERT), transformer.layer.3., layers.3.


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, layer_lr_decay: float = 1.0):
    """AdamW parameter groups.

    No weight decay on biases and LayerNorm weights (BERT's original recipe). With
    ``layer_lr_decay`` < 1, a parameter's lr is ``lr * layer_lr_decay ** k``, k its distance
    from the head (embeddings farthest): the pretrained lower layers move less than the top.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    indices = [int(m.group(1)) for name, _ in named if (m := _LAYER_INDEX.search(name))]
    head = max(indices) + 2 if indices else 1  # depth: embeddings 0, layer i at i + 1, head (pooler, classifier)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        m = _LAYER_INDEX.search(name)
        depth = int(m.group(1)) + 1 if m else (0 if "embeddings" in name else head)
        if layer_lr_decay == 1:
            depth = head  # one lr for all: two groups (decay / no decay), as without the option
        no_decay = p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias")
        group = groups.setdefault((depth, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr": lr * layer_lr_decay ** (head - depth)})
        group["params"].append(p)
    return list(groups.values())


def steps_per_epoch(train_rows: int, world: int, batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one worker's epoch (a partial accumulation at the end is a step)."""
    batches = math.ceil(math.ceil(train_rows / world) / batch_size)
    return max(1, math.ceil(batches / grad_accum_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_ratio: float, total_steps: int):
    """Hugging Face's schedule: warmup over ``ceil(warmup_ratio * total_steps)`` steps (as its
    Trainer counts them), then linear or cosine decay to 0, or constant."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[kind], optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _init_process(job: Job, worker: Worker) -> None:
    if worker.threads:
        torch.set_num_threads(worker.threads)
    _seed_everything(job.cfg.train.seed + worker.rank)
    if worker.device.type == "cpu" and job.cfg.scaling.keep_freed_memory:
        keep_freed_memory()  # reuse the embedding gradient's block every step instead of faulting it in anew


def _load_model(job: Job, prepare: Callable):
    m = job.cfg.model
    torch.manual_seed(job.cfg.train.seed)  # the same head initialisation on every rank
    model = load_classifier(m.name, job.label2id, job.id2label, m.num_hidden_layers, m.dropout, m.trust_remote_code,
                            problem=job.problem)
    if m.freeze_encoder:
        for p in model.base_model.parameters():
            p.requires_grad_(False)
    if job.cfg.train.padding_free:
        enable_padding_free(model)
    model = prepare(model)
    if job.cfg.train.torch_compile:
        model.compile()  # in place: the state dict keeps its names (no ``_orig_mod.``)
    return model


def setup(job: Job, worker: Worker, resume_dir: str | None = None, prepare: Callable = lambda m: m,
          ) -> tuple[Parts, TrainState]:
    """Model, optimizer (parameter groups), scheduler and scaler, restored from ``resume_dir``
    (a checkpoint directory) when given; ``prepare`` wraps the model for DDP."""
    t, device = job.cfg.train, worker.device
    _init_process(job, worker)
    dtype = amp_dtype(t.amp, device)
    tokenizer = load_tokenizer(job.cfg.model.name, job.cfg.model.trust_remote_code)
    tokenizer.model_max_length = t.max_length  # saved with every checkpoint: predict's default max_length
    model = _load_model(job, prepare)
    # The fused kernel does the whole update in one pass over the weights (Trainer's default too).
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, t.lr, t.layer_lr_decay), lr=t.lr,
                                  fused=device.type in ("cpu", "cuda"))
    total = steps_per_epoch(job.train_rows, worker.world, t.batch_size, t.grad_accum_steps) * t.epochs
    weight = torch.tensor(job.class_weights, dtype=torch.float32, device=device) if job.class_weights else None
    parts = Parts(model=model, tokenizer=tokenizer, optimizer=optimizer,
                  scheduler=build_scheduler(optimizer, t.scheduler, t.warmup_ratio, total),
                  scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                  dtype=dtype, loss_weight=weight,
                  **_cpu_kernels(model, t, device),
                  total_steps=total)
    if resume_dir is None:
        return parts, TrainState()
    saved = TrainState.from_json(load_checkpoint(resume_dir, model, optimizer, parts.scheduler, parts.scaler))
    state = dataclasses.replace(saved, restores=saved.restores + 1, resumed_at_epoch=saved.epoch)
    return parts, state


def _cpu_kernels(model, t, device: torch.device) -> dict:
    """The CPU-only kernel choices of :class:`Parts`: eager attention for narrow batches and
    fast dropout masks. A compiled model keeps one attention kernel and torch's dropout
    (switching either would recompile it); GPUs never switch."""
    switch = not t.torch_compile
    return {"attention": AttentionSwitch(model, TRAIN_EAGER_ATTENTION_MAX_WIDTH if switch else 0),
            "eval_attention": AttentionSwitch(model, INFERENCE_EAGER_MAX_WIDTH if switch else 0),
            "dropout_masks": FastDropout if switch and device.type == "cpu" and t.fast_dropout else nullcontext}


# ----------------------------------------------------------------------------- the steps


def _autocast(device: torch.device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _all_reduce(t: torch.Tensor, world: int, op=None) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


@dataclass
class Recipe:
    """One worker's run: what it trains, where, on what data, and where it reports."""

    job: Job
    worker: Worker
    parts: Parts
    train: Any
    """This worker's training shard (``iter_batches``)."""
    validation: Any
    """The whole validation set (every worker reads it; each scores every world-th batch)."""
    reporter: Reporter

    def epoch_batches(self, epoch: int) -> Iterator:
        return epoch_batches(self.job, self.worker, self.train, epoch)


def epoch_batches(job: Job, worker: Worker, shard, epoch: int) -> Iterator:
    """This worker's batches of ``epoch``: the same ones each time they are drawn (given the
    same shard order: the training dataset is read with ``preserve_order``)."""
    t = job.cfg.train
    return iterate(shard, t.batch_size, t.shuffle_buffer_rows, job.cfg.data.length_bucketing,
                   epoch_seed(t.seed, epoch, worker.rank))


def saved_epoch(resume_dir: str | None) -> int:
    """The epoch a run resumes in (0 for a fresh run), read before the model loads."""
    if resume_dir is None:
        return 0
    return TrainState.from_json((Path(resume_dir) / "trainer_state.json").read_text()).epoch


def evaluate(r: Recipe) -> dict:
    """Metrics over the whole validation set: each worker fills the problem type's
    :class:`~bertray.problem.EvalState` from its batches, the states are all-reduced across
    workers, then turned into metrics once. Inference's attention threshold, not training's."""
    p, w, problem = r.parts, r.worker, r.job.problem
    state = problem.new_state(w.device)
    kept = [] if r.job.cfg.train.calibrate and problem.calibrates else None
    p.model.eval()
    with torch.inference_mode():
        for i, table in enumerate(iterate(r.validation, r.job.cfg.train.batch_size * 2, 0, False, 0)):
            if i % w.world != w.rank:
                continue  # another worker scores this batch
            batch = collate(table, p.tokenizer.pad_token_id or 0, w.device, problem)
            labels = batch.pop("labels")
            p.eval_attention(batch["input_ids"].shape[1])
            with _autocast(w.device, p.dtype):
                logits = p.model(**batch).logits.float()
            problem.update(state, logits, labels, p.loss_weight)
            if kept is not None:
                kept.append(torch.cat([logits, labels.float().reshape(len(labels), -1)], dim=1))
    p.model.train()
    metrics = problem.metrics(state.all_reduce() if w.world > 1 else state)
    if kept is not None:
        metrics.update(_calibration(kept, problem, w))
    return metrics


def _calibration(kept: list[torch.Tensor], problem: Problem, w: Worker) -> dict:
    """Temperature and calibration metrics over every worker's validation logits (each worker
    fits the same temperature on the same gathered rows)."""
    n, multi = problem.num_labels, problem.name == bproblem.MULTI
    rows = torch.cat(kept) if kept else torch.zeros((0, 2 * n if multi else n + 1), device=w.device)
    if w.world > 1:
        rows = bproblem.all_gather_rows(rows)
    rows = rows.cpu()
    logits, labels = rows[:, :n], rows[:, n:]
    return calibration.calibrate(logits, labels if multi else labels[:, 0].long(), multi)


class LossWatch:
    """Notes the first optimizer step whose loss is not finite, without waiting on the device
    (no ``.item()`` per step); :meth:`check` reads it at progress lines and checkpoints."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), math.inf, dtype=torch.float64, device=device)
        self.value = torch.zeros((), dtype=torch.float64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) & torch.isinf(self.first_step)
        self.first_step = torch.where(bad, float(step), self.first_step)
        self.value = torch.where(bad, loss.double(), self.value)

    def check(self, r: Recipe, state: TrainState) -> None:
        """Raise :class:`NonFiniteError` on every worker when any worker saw a non-finite loss,
        or when the weights are not finite (so no checkpoint of them is ever written)."""
        first = _all_reduce(self.first_step.clone(), r.worker.world, _min_op())
        step = float(first.item())
        if math.isinf(step):
            if not weights_finite(r.parts.model):
                raise NonFiniteError(_non_finite_message(r.job.cfg, "the weights became non-finite",
                                                        state.global_step, state.epoch))
            return
        mine = torch.where(self.first_step == first, self.value, torch.zeros_like(self.value))
        value = float(_all_reduce(mine, r.worker.world).item())
        raise NonFiniteError(_non_finite_message(r.job.cfg, f"the training loss became {value}", int(step), state.epoch))


def _min_op():
    return torch.distributed.ReduceOp.MIN if torch.distributed.is_available() else None


def _non_finite_message(cfg: RunConfig, what: str, step: int, epoch: int) -> str:
    t = cfg.train
    return (f"{what} at optimizer step {step} (epoch {epoch + 1}); training stopped, and nothing from that step on "
            f"is saved or exported. Fix: lower train.lr (now {t.lr:g}), clip gradients with train.max_grad_norm=1.0 "
            f"(now {t.max_grad_norm}), or train in full precision with train.amp=fp32 (now {t.amp}); then rerun "
            "(it resumes from the last good checkpoint).")


def training_batch(r: Recipe, table) -> dict[str, torch.Tensor]:
    """One training micro-batch's tensors: padded, or packed with ``train.padding_free``."""
    t, pad_id = r.job.cfg.train, r.parts.tokenizer.pad_token_id or 0
    if t.padding_free:
        return collate_padding_free(table, pad_id, t.max_length, r.worker.device, r.job.problem)
    return collate(table, pad_id, r.worker.device, r.job.problem)


def micro_step(r: Recipe, table, boundary: bool) -> tuple[torch.Tensor, int]:
    """Forward and backward of one micro-batch; gradients accumulate until an optimizer step.
    Returns (loss, detached and on the device; rows)."""
    p, w, accum = r.parts, r.worker, r.job.cfg.train.grad_accum_steps
    batch = training_batch(r, table)
    labels = batch.pop("labels")
    p.attention(batch["input_ids"].shape[1])
    # DDP all-reduces gradients at the last micro-batch of an accumulation only.
    sync = nullcontext() if boundary or w.world == 1 else p.model.no_sync()
    with sync:
        with _autocast(w.device, p.dtype), p.dropout_masks():
            logits = p.model(**batch).logits
        loss = r.job.problem.loss(logits, labels, p.loss_weight)
        p.scaler.scale(loss / accum).backward()
    return loss.detach(), len(labels)


def optimizer_step(p: Parts, max_grad_norm: float | None) -> None:
    p.scaler.unscale_(p.optimizer)  # clip the true gradients, not the scaled ones (a no-op unless fp16)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), max_grad_norm)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- one epoch


@dataclass
class Meter:
    """Training loss (summed on the device: a ``.item()`` per step would make a GPU wait for
    every step before queuing the next) and throughput, over the epoch and the progress window."""

    device: torch.device
    batches: Timed
    loss_sum: torch.Tensor = field(init=False)
    loss_n: int = 0
    epoch_rows: int = 0
    window_rows: int = 0
    epoch_start: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    window_wait: float = 0.0

    def __post_init__(self):
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)

    def add(self, loss: torch.Tensor, rows: int) -> None:
        self.loss_sum += loss
        self.loss_n += 1
        self.epoch_rows += rows
        self.window_rows += rows

    def mean_loss(self) -> float:
        return self.loss_sum.item() / max(self.loss_n, 1)

    def window(self, world: int) -> tuple[float, float]:
        """(samples/s over all workers, share of time spent waiting for batches) since the last call."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        out = self.window_rows * world / elapsed, (self.batches.seconds - self.window_wait) / elapsed
        self.window_rows, self.window_start, self.window_wait = 0, time.perf_counter(), self.batches.seconds
        return out

    def epoch_rate(self, world: int) -> float:
        return self.epoch_rows * world / max(time.perf_counter() - self.epoch_start, 1e-9)


def skip_trained(batches: Iterator, state: TrainState, digest: Digest, reporter: Reporter) -> None:
    """Resuming mid-epoch: pass over the micro-batches trained before the restart, checking
    that they hold the same rows in the same order (the epoch is redrawn with its seed)."""
    for _ in range(state.batches_in_epoch):
        table = next(batches, None)
        if table is None:
            break
        digest.add(table)
    if not state.batches_in_epoch:
        return
    if (digest.rows, digest.hexdigest()) != (state.rows_in_epoch, state.epoch_digest):
        log.warning("resume of epoch %d is not exact: skipped %d rows where %d were trained (or other rows); "
                    "the training data or its order changed since the checkpoint",
                    state.epoch + 1, digest.rows, state.rows_in_epoch)
    else:
        reporter.progress(f"skipped the {digest.rows} rows of epoch {state.epoch + 1} trained before the restart")


def _log_window(r: Recipe, state: TrainState, meter: Meter) -> None:
    t = r.job.cfg.train
    mean_loss = meter.mean_loss()  # first: it waits for queued GPU work, so the rate is true
    rate, wait = meter.window(r.worker.world)
    lr = max(r.parts.scheduler.get_last_lr())  # the head's lr (lower layers are lower with layer_lr_decay)
    # data_wait: the share of the window spent waiting for input batches; well above a few
    # percent means the data pipeline, not the model, sets the pace.
    r.reporter.progress(f"epoch={state.epoch + 1}/{t.epochs} step={state.global_step}/{r.parts.total_steps} "
                        f"loss={mean_loss:.4f} lr={lr:.2e} samples/s={rate:.1f} data_wait={wait:.0%}")
    r.reporter.scalars("train", {"loss": mean_loss, "lr": lr, "samples_per_s": rate}, state.global_step)


def _after_step(r: Recipe, state: TrainState, meter: Meter, watch: LossWatch) -> TrainState:
    """Progress line and mid-epoch checkpoint, when due after an optimizer step."""
    t, every = r.job.cfg.train, r.job.cfg.checkpoint.every_n_steps
    if state.global_step % t.log_every_n_steps == 0:
        watch.check(r, state)
        if r.worker.rank == 0:
            _log_window(r, state, meter)
    if every and state.global_step % every == 0:
        watch.check(r, state)
        state, _ = checkpoint(r, state, meter.mean_loss(), 0.0, epoch_done=False)
    return state


def train_epoch(r: Recipe, state: TrainState, tables: Iterable) -> tuple[TrainState, Meter]:
    """Train the current epoch (its untrained part, when resuming): returns the state after its
    last optimizer step (a partial accumulation is flushed) and the epoch's meter."""
    t = r.job.cfg.train
    batches = Timed(tables)
    digest = Digest()
    skip_trained(batches, state, digest, r.reporter)
    meter, watch = Meter(r.worker.device, batches), LossWatch(r.worker.device)
    r.parts.model.train()
    for table in batches:
        boundary = (state.batches_in_epoch + 1) % t.grad_accum_steps == 0
        loss, rows = micro_step(r, table, boundary)
        watch.observe(loss, state.global_step + 1)
        meter.add(loss, rows)
        digest.add(table)
        state.batches_in_epoch += 1
        if boundary:
            optimizer_step(r.parts, t.max_grad_norm)
            state.global_step += 1
            state.step_in_epoch += 1
            state.rows_in_epoch, state.epoch_digest = digest.rows, digest.hexdigest()
            state = _after_step(r, state, meter, watch)
    if state.batches_in_epoch % t.grad_accum_steps:  # flush a partial accumulation at the end of the epoch
        optimizer_step(r.parts, t.max_grad_norm)
        state.global_step += 1
        state.step_in_epoch += 1
    watch.check(r, state)
    return state, meter


# ----------------------------------------------------------------------------- evaluation, decision, I/O


def checkpoint(r: Recipe, state: TrainState, train_loss: float, samples_per_s: float,
               epoch_done: bool) -> tuple[TrainState, Decision]:
    """Evaluate, decide, then report the metrics with a checkpoint of the decided state.

    The checkpoint's ``config.json`` gets what this evaluation tuned (multi-label: the
    threshold), so the exported best checkpoint carries its own."""
    metrics = evaluate(r)
    scalars = scalar_metrics(metrics)
    record = {"epoch": state.epoch + (1 if epoch_done else 0), "global_step": state.global_step,
              "train_loss": train_loss, "train_samples_per_s": samples_per_s, "restores": state.restores,
              "resumed_at_epoch": state.resumed_at_epoch, **scalars}
    state, decision = decide(state, record, Rules.of(r.job.cfg, r.job.problem), epoch_done)
    r.reporter.evaluation(record, metrics, state.global_step)
    # Tables (per_class, confusion_matrix) travel as JSON: Ray Train's reports hold flat values.
    report = {**record, **{k: json.dumps(v) for k, v in metrics.items() if k not in scalars}}
    r.job.problem.with_metrics(metrics).apply_to(unwrap(r.parts.model).config)
    r.reporter.checkpoint(r.parts, state, report)
    return state, decision


def fit(r: Recipe, state: TrainState, first: Iterable | None = None) -> dict | None:
    """Train until the last epoch or early stopping; ``first``: the current epoch's batches,
    already started. Returns None, or ``{"error": message}`` when a non-finite loss stopped
    the run (a return, not a raise: Ray Train would retry a raising worker from its last
    checkpoint, to the same end); :func:`raise_if_failed` turns it back into the error."""
    t = r.job.cfg.train
    upcoming = first if first is not None else Prefetch(r.epoch_batches(state.epoch))
    try:
        while state.epoch < t.epochs and not state.stopped_early:
            state, meter = train_epoch(r, state, upcoming)
            train_loss, rate = meter.mean_loss(), meter.epoch_rate(r.worker.world)
            if state.epoch + 1 < t.epochs:
                # Each epoch's pipeline starts afresh (a tokenizer actor, the first block):
                # started now, that start-up overlaps the evaluation and checkpoint.
                upcoming = Prefetch(r.epoch_batches(state.epoch + 1))
            state, decision = checkpoint(r, state, train_loss, rate, epoch_done=True)
            if decision.stop_early:
                r.reporter.progress(f"early stopping: {Rules.of(r.job.cfg, r.job.problem).metric} did not improve for "
                                    f"{t.early_stopping_patience} epoch(s)")
    except NonFiniteError as e:
        r.reporter.progress(f"error: {e}")
        return {"error": str(e)}
    finally:
        r.reporter.close()
    return None


def raise_if_failed(outcome: dict | None) -> None:
    """On the driver: raise the error a worker's :func:`fit` returned (None: it finished)."""
    if outcome and outcome.get("error"):
        raise NonFiniteError(outcome["error"])


class Reporter:
    """The loop's only I/O: progress lines, TensorBoard scalars and MLflow metrics (rank 0), checkpoints.

    ``publish(metrics, checkpoint_dir_or_None)`` hands a report to the caller (Ray Train's
    ``report`` in a worker); every rank publishes each report, only rank 0 with a checkpoint.
    """

    def __init__(self, rank: int, publish: Callable[[dict, str | None], None], tensorboard_dir: str | None = None,
                 files: dict[str, str] | None = None, mlflow: MetricLogger | None = None):
        self.rank = rank
        self.publish = publish
        self.files = files or {}
        self.mlflow = mlflow
        self.writer = None
        if rank == 0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def progress(self, message: str) -> None:
        # Ray Train patches print in workers to both print and log, so every line came out
        # twice; its root logger (console + the run's log file) shows a logged line once.
        if self.rank == 0:
            log.info("[bertray] %s", message)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        if self.mlflow:  # Hugging Face's names: eval_accuracy, train_loss
            self.mlflow.log({f"{prefix}_{k}": float(v) for k, v in values.items()}, step)

    def evaluation(self, record: dict, metrics: dict, step: int) -> None:
        self.progress(f"eval epoch={record['epoch']} step={step} {bproblem.headline(metrics)}")
        self.scalars("eval", {k: v for k, v in scalar_metrics(metrics).items() if k != "num_examples"},
                     step)
        if self.writer:
            self.writer.flush()

    def checkpoint(self, parts: Parts, state: TrainState, report: dict) -> None:
        if self.rank != 0:
            self.publish(report, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, parts.model, parts.tokenizer, parts.optimizer, parts.scheduler, parts.scaler,
                            state.to_json())
            for name, text in self.files.items():
                Path(tmp, name).write_text(text)
            self.publish(report, tmp)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def tensorboard_dir(cfg: RunConfig) -> str | None:
    """``<output_dir>/tensorboard`` where output_dir is a local or shared path."""
    return None if "://" in cfg.output_dir else str(Path(cfg.output_dir) / "tensorboard")

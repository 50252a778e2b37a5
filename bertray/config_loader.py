"""Loading a config: YAML, dotted ``key=value`` overrides, and every problem in one report.

pydantic validates (:mod:`bertray.config` holds the schema); this module turns its errors
into messages that name the dotted key, the bad value, what is allowed and "did you mean",
and keeps looking after the first failure so that one run reports every problem.

Pure: no ``ray``, nothing at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from bertray.config import LOAD, ConfigError, RunConfig


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), cls=RunConfig):
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate, check against the model, resolve paths.

    Raises:
        ConfigError: listing every unknown key, bad value and broken rule at once.
    """
    source = "overrides" if path is None else str(path)
    raw = {} if path is None else _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (example: train.lr=3e-5)")
            continue
        set_dotted(raw, key.strip(), _parse_scalar(value))
    cfg, found, _ = validate(cls, raw, LOAD)
    problems += found
    if problems:
        raise ConfigError(problems, source)
    return cfg.resolved()


def config_from_dict(raw: dict[str, Any], cls=RunConfig):
    """Build and validate a config from a plain dict (as from YAML). Raises ConfigError."""
    cfg, problems, _ = validate(cls, raw)
    if problems:
        raise ConfigError(problems)
    return cfg.resolved()


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg, values: dict[str, Any]):
    """Return a validated copy of ``cfg`` with dotted keys replaced (used by Tune trials)."""
    raw = to_dict(cfg)
    for key, value in values.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, type(cfg))


def dump_yaml(cfg, path: str | os.PathLike, header: str = "") -> None:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    Path(path).write_text((header + "\n" if header else "") + text)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"config file {path!s} does not exist; pass --config configs/<name>.yaml"], str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], str(path)) from e
    except ValueError as e:  # YAML reads 2024-13-01 as a date and fails building it
        raise ConfigError([f"{path}: a value that looks like a date is not one ({e}); "
                           "quote it or write a real YYYY-MM-DD date"], str(path)) from e
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping at the top level, got {type(raw).__name__}"], str(path))
    return raw


def _parse_scalar(value: str) -> Any:
    # YAML gives ints, bools, null and lists; "3e-5" stays a str in YAML 1.1 and pydantic reads it as a float.
    try:
        return yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):  # ValueError: a date-like value that is no date (2024-13-01)
        return value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def get_dotted(raw: dict, key: str):
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in raw.items():
        keys += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]
    return keys



def validate(cls, raw: dict, context: str | None = None) -> tuple[Any, list[str], list[str]]:
    """Validate ``raw`` as ``cls``: (the config or None, every problem, the keys set aside).

    pydantic runs a class's cross-field rules only once its fields are valid, so after a
    failure the bad keys are set back to their defaults and the rules run on the rest; what
    they say about keys already reported is dropped.
    """
    adapter = TypeAdapter(cls)
    try:
        return adapter.validate_python(raw, context=context), [], []
    except ValidationError as e:
        errors = e.errors()
    problems = _problems(cls, errors)
    bad = [_walk(cls, err["loc"])[3] for err in errors]
    if [] in bad:  # the top class's own rules ran: nothing else to find
        return None, problems, []
    repaired = copy.deepcopy(raw)
    for parts in bad:
        _drop(repaired, parts)
    keys = [".".join(parts) for parts in bad]
    try:
        return adapter.validate_python(repaired, context=context), problems, keys
    except ValidationError as e:
        more = [m for m in _problems(cls, e.errors()) if not mentions(m, keys)]
    return None, list(dict.fromkeys(problems + more)), keys


def _drop(raw: dict, parts: list[str]) -> None:
    node = raw
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def mentions(message: str, keys: list[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message) for k in keys)


def _problems(cls, errors: list[dict]) -> list[str]:
    """pydantic's errors as messages naming the dotted key, the bad value and what is allowed."""
    walks = [(err, *_walk(cls, err["loc"])) for err in errors]
    # A union (``'balanced' | list[float]``) fails once per member: an error inside the value is the
    # real one; else the members' messages join into one line ("should be 'balanced' or ...").
    inner = {path.split("[")[0] for _, path, *_ in walks if "[" in path}
    out: dict[str, list[str]] = {}
    for err, path, owner, info, _ in walks:
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            fields = list(owner.__pydantic_fields__)
            close = difflib.get_close_matches(path.rsplit(".", 1)[-1], fields)
            prefix = path.rpartition(".")[0] + "." if "." in path else ""
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            out[f"unknown key {path}{hint}; allowed: {', '.join(sorted(fields))}"] = []
        elif err["type"] == "value_error" and (info is None or _config_class(info.annotation)):
            prefix = f"{path}." if path else ""  # a class's cross-field rules, one per line
            out.update({prefix + line: [] for line in str(err["ctx"]["error"]).splitlines()})
        elif path not in inner:
            msg = err["msg"].removeprefix("Input ").removeprefix("String ").removeprefix("Value error, ")
            out.setdefault(f"{path}={err['input']!r}", []).append(msg)
    return [f"{k}: {' or '.join(dict.fromkeys(v))}" if v else k for k, v in out.items()]


def _walk(cls, loc) -> tuple[str, Any, Any, list[str]]:
    """A pydantic error location as (dotted key, the class holding its last part, that field, key parts)."""
    parts: list[str] = []
    path, owner, info, inner = "", cls, None, cls
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif inner is not None:  # else a union member's tag such as "list[constrained-float]"
            owner, parts = inner, [*parts, str(item)]
            path = f"{path}.{item}" if path else str(item)
            info = owner.__pydantic_fields__.get(item)
            inner = _config_class(info.annotation) if info else None
    return path, owner, info, parts


def _config_class(tp):
    return tp if hasattr(tp, "__pydantic_fields__") else None


"""Tune's search space: dotted config keys, one distribution each, checked like the keys.

Every value a distribution can sample (choice and grid values, range bounds, a non-integer
inside a float range) must pass the same checks as the key itself, so a bad space fails
before any trial starts. Pure: no ``ray``.
"""

from __future__ import annotations

import copy
import difflib

from bertray.config import RunConfig, TuneConfig
from bertray.config_loader import get_dotted, leaf_keys, mentions, set_dotted, to_dict, validate

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


def validate_search_space(tune: TuneConfig, cfg: RunConfig) -> list[str]:
    """A search space maps dotted RunConfig keys to one distribution each; every value it can
    sample (choice/grid values, range bounds, a non-integer inside a float range) must pass
    the same checks as the key itself."""
    p: list[str] = []
    base = {**to_dict(cfg), "tune": {}}
    for key, spec in tune.space.items():
        where = f"tune.space.{key}"
        node = get_dotted(base, key)
        if node is KeyError or isinstance(node, dict) or key.startswith("tune."):
            close = difflib.get_close_matches(key, leaf_keys(base))
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            p.append(f"{where}: unknown config key {key!r}{hint}; the space names keys like train.lr, train.epochs")
        elif key.startswith(("data.", "model.name")) or key == "train.max_length":
            # The data is read and tokenized once for all trials (a pipeline per trial would not fit
            # beside the trials' training workers), so keys that change it cannot vary per trial.
            p.append(f"{where}: {key} changes the data pipeline, which is prepared once for all trials; "
                     "search model and training keys (train.lr, train.epochs, ...) instead")
        elif not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            p.append(f"{where}={spec!r}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1e-5, 1e-4]}}")
        else:
            kind, args = next(iter(spec.items()))
            problem, values = _sampled_values(kind, args)
            found = [f"{where}.{problem}"] if problem else _probe(base, key, f"{where}.{kind}", values)
            p += found if kind in ("choice", "grid") else found[:1]  # a range is one problem
    return p


def _sampled_values(kind: str, args) -> tuple[str | None, list]:
    """(a problem with the distribution's shape, or None; the values to check against the key)."""
    if kind in ("choice", "grid"):
        ok = isinstance(args, list) and args
        return (None, args) if ok else (f"{kind} must be a non-empty list of values", [])
    if not isinstance(args, list) or len(args) != 2:
        return f"{kind} must be [low, high]", []
    try:  # YAML 1.1 reads 1e-5 as a string
        low, high = (v if type(v) is int else float(v) for v in args)
    except (TypeError, ValueError):
        return f"{kind}={args!r}: low and high must be numbers", []
    if not low < high:
        return f"{kind}=[{low}, {high}] is empty: low must be < high", []
    if kind == "randint":
        return None, [low, high]
    if kind == "loguniform" and low <= 0:
        return f"loguniform=[{low}, {high}]: bounds must be > 0 for a log scale", []
    # Float ranges sample floats: a whole-number key fails on a value between the bounds.
    inside = low * (high / low) ** 0.382 if kind == "loguniform" else low + 0.382 * (high - low)
    return None, [low, high, inside]


def _probe(base: dict, key: str, where: str, values: list) -> list[str]:
    problems = []
    for value in values:
        raw = copy.deepcopy(base)
        set_dotted(raw, key, value)
        _, found, _ = validate(RunConfig, raw)
        problems += [f"{where}: sampled value {value!r}: {m}" for m in found if mentions(m, [key])]
    return list(dict.fromkeys(problems))


"""The shared command line of jobs/*.py: ``--config FILE [key=value ...]``.

Exit status: 0 done; 1 bad input (data, model or output; the message says which and the
fix); 2 bad config (every problem listed); 130 interrupted, state saved (re-run to resume).
Ray is imported only once the config is valid.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from bertray.config import ConfigError, load_config
from bertray.errors import BertrayError, Interrupted


def main(doc: str, cls, runner: str, argv=None) -> int:
    """Parse arguments, load ``cls`` from YAML + overrides, call ``runner`` ("module:function")."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    module, _, func = runner.partition(":")
    run = getattr(importlib.import_module(module), func)
    try:
        result = run(cfg)
    except ConfigError as e:  # a check that needs more than the config (e.g. the model's size)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C before any work was saved: nothing to resume, nothing half-written
        print("interrupted: stopped before training started; re-run the same command", file=sys.stderr)
        return Interrupted.exit_status
    except BertrayError as e:  # the user's to fix; anything else keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return 0

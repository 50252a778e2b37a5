"""The shared command line of jobs/*.py: ``--config FILE [key=value ...]``.

Exit status: 0 done; 1 bad input (data, model or output; the message says which and the
fix); 2 bad config (every problem listed); 3 done with an alert (predict: the output and
its report were committed, but a ``report.max_*`` threshold was exceeded: drift or low
confidence); 130 interrupted, state saved (re-run to resume). Ray is imported only once
the config is valid.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from bertray.config_loader import load_config
from bertray.errors import BertrayError, Interrupted

ALERT_EXIT_STATUS = 3


def main(doc: str, cls, runner: str, argv=None) -> int:
    """Parse arguments, load ``cls`` from YAML + overrides, call ``runner`` ("module:function")."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls)
        module, _, func = runner.partition(":")
        result = getattr(importlib.import_module(module), func)(cfg)
    except KeyboardInterrupt:  # Ctrl-C outside the library's own handling
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return Interrupted.exit_status
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_status
    except BertrayError as e:  # the user's to fix (ConfigError: 2, late config checks included); else a traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
        if result.get("alerts"):
            print("alert (the output was written): " + "; ".join(result["alerts"]), file=sys.stderr)
            return ALERT_EXIT_STATUS
    return 0

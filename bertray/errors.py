"""The errors a user can act on, and the exit statuses the CLI gives them.

Every error that is the user's to fix (bad data, a bad model folder, an output that
cannot be written, a cluster too small) derives from :class:`BertrayError`; the CLI
prints its message and exits 1. Anything else is a programming error and keeps its
traceback. This module is pure: no ``ray``, no ``torch``.
"""

from __future__ import annotations


class BertrayError(Exception):
    """A problem with the user's input, model, output or cluster; the message names it and the fix."""

    exit_status = 1


class DataError(BertrayError):
    """Bad input data: the message names the file, column, row or label and the fix."""


class Interrupted(BertrayError):
    """A run stopped before its end with its state saved; re-running the command resumes it."""

    exit_status = 130


class NonFiniteError(BertrayError):
    """Training diverged: its loss or its weights became NaN or infinite. Nothing from that
    point on is saved as a checkpoint or exported."""

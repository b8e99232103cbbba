"""One base for the errors a user fixes, and how every command reports them.

A user error (a config, data, template, run directory, launch or file problem)
prints one message, ``<command>: error: <message>``, and exits 2. Anything else
is a bug: it keeps its traceback and exits 1. Hydra's compose errors (a typo, a
wrong type) are user errors too (``fttrain.__main__.cli``).
"""

from __future__ import annotations

import sys


class FttrainError(Exception):
    """A problem the user fixes: reported as one message, exit code 2, no traceback."""


class PeftSetupError(FttrainError, ValueError):
    """The chosen method does not fit this model; raised before training starts."""


def report(command: str, error: BaseException) -> int:
    """Print a user error the way every fttrain command does; returns the exit code."""
    print(f"{command}: error: {error}", file=sys.stderr, flush=True)
    return 2

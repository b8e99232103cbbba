"""Stop signals that arrive before a run's own handlers exist.

Imports, composing the config and the launch checks take seconds, and a
Slurm time-limit warning (USR1) or a preemption (TERM) can come then: by
default either would end the process at once, without a requeue. Installed
first thing by ``python -m fttrain``, these handlers only remember the
signal; ``fttrain.preemption.StopOnSignal`` takes it over, and the run stops
before its first step (``StopOnSignal.stop_before_training``) the way it
stops after any other: every rank together, requeued when asked.

Only the standard library here, so that installing them costs nothing.
"""

from __future__ import annotations

import signal
from typing import List, Optional

DEFAULT_STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")  # trainer.stop_signals' defaults
_received: List[int] = []


def _remember(signum, frame) -> None:
    _received.append(signum)


def catch_early(names=DEFAULT_STOP_SIGNALS) -> None:
    for name in names:
        signal.signal(getattr(signal, name), _remember)


def take() -> Optional[int]:
    """The first signal remembered so far (and forget them), or None."""
    first = _received[0] if _received else None
    _received.clear()
    return first

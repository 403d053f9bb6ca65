"""Preemption: on SIGTERM or SIGUSR1, finish the optimizer step, save a checkpoint, exit 128+signum.

A cloud or a cluster stops a job with SIGTERM (SLURM's ``--signal=USR1@60`` sends SIGUSR1
a set time before the end), then SIGKILL after a grace period. The handler only records
the signal; the training loop acts on it at the next step boundary (saving from inside
the handler would race the step, as Megatron and NeMo found). Under torchrun the signal
number is agreed across ranks at every step boundary (an all-reduce MAX), so one rank
receiving it is enough and every rank saves the same step. A second signal while the
checkpoint is being written is recorded and ignored: the save completes (and it commits
by a rename, so even a SIGKILL then leaves the previous checkpoints whole).

The handlers are installed for the training steps only (from the main thread; elsewhere
Python allows none and the signals keep their default action): before the first step
and after the last one a signal ends the process at once, which loses no step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + signum."""

    def __init__(self, signum: int, step: int, steps: int, saved: Path):
        self.signum, self.exit_code = signum, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step} of {steps}; checkpoint {str(saved)!r} saved: "
                         f"continue with the same command and --resume")


class Watch:
    """A context that records the first of ``SIGNALS`` received (``received``, 0: none)
    and restores the previous handlers on exit, unless a signal came: the process is then
    stopping, and a further signal must not kill it between the save and its exit."""

    def __init__(self) -> None:
        self.received = 0
        self.count = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if not self.received:
            self.received = signum

    def __enter__(self) -> "Watch":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.received:  # stopping: later signals are recorded too, and the exit code stays 128+signum
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

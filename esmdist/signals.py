"""Stop requests: SIGUSR1 and SIGTERM (Slurm's warning before a time limit or preemption) and
SIGINT (Ctrl-C) ask the run to stop after the current step and save; a second SIGINT aborts at
once (no save; the cleanup of `finally` blocks still runs).

This module imports nothing heavy, so that `launcher/pretrain.py` installs the handlers before
it imports torch: a signal in the seconds of start-up is then remembered instead of killing the
process with the signal's default action (which Slurm would not requeue).
"""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.requested: str | None = None
        """The name of the first stop signal received, if any."""
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        """Give the signals back to whoever handled them before (e.g. when train() returns)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = name
            if signum == signal.SIGINT:
                print("interrupted: stopping after this step and saving a checkpoint "
                      "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)  # fmt: skip


_early: StopRequest | None = None


def install_early() -> None:
    """Start remembering stop signals now (the launcher's first line)."""
    global _early
    if _early is None:
        _early = StopRequest()


def stop_request() -> StopRequest:
    """The request installed early, if any (with whatever arrived meanwhile), else a new one."""
    global _early
    request, _early = _early, None
    return request if request is not None else StopRequest()

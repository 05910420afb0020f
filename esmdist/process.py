"""Child processes that do not outlive their parent.

A worker or uploader whose parent was killed (SIGKILL, OOM killer, a node's job cleanup) would
otherwise go on writing for minutes: shards nobody will list, uploads nobody will commit. Each
such child watches its parent's pid from a thread and exits as soon as it changes (the child was
re-parented, so the parent is gone). Polling `getppid` works on every POSIX system, and, unlike
Linux's PR_SET_PDEATHSIG, does not fire when merely the parent *thread* that started the child
ends.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.5
_IMPORTED = time.monotonic()


def seconds_since_start() -> float:
    """Seconds since this process started (Linux: its start time in /proc; elsewhere: since
    this module was imported, which a trainer does within its first second)."""
    try:
        # Field 22 of /proc/self/stat, in clock ticks since boot; the fields after the
        # parenthesised command name start at field 3.
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def exit_with_parent(parent: int, cleanup: Callable[[], None] | None = None) -> None:
    """Exit this process (status 1, after `cleanup`) once `parent` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        try:
            if cleanup is not None:
                cleanup()
        finally:
            os._exit(1)

    if os.getppid() != parent:  # already gone before the watch began
        watch()
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()

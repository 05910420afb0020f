"""Child processes that do not outlive their parent.

A worker or uploader whose parent was killed (SIGKILL, OOM killer, a node's job cleanup) would
otherwise go on writing for minutes: shards nobody will list, uploads nobody will commit. Each
such child watches its parent's pid from a thread and exits as soon as it changes (the child was
re-parented, so the parent is gone). Polling `getppid` works on every POSIX system, and, unlike
Linux's PR_SET_PDEATHSIG, does not fire when merely the parent *thread* that started the child
ends.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

POLL_SECONDS = 0.5
_IMPORTED = time.monotonic()


def exit_process(code: int) -> NoReturn:
    """End this process with `code` as Python would — non-daemon threads joined, atexit
    handlers run (logging, wandb, multiprocessing's children), stdout and stderr flushed — but
    without the interpreter's finalization and the C++ static destructors after it. There a
    native thread of a library (pyarrow's scanner threads, seen in core dumps; any thread
    pool that calls back into Python) may still take the GIL: Python ends such a thread with
    pthread_exit, its unwinding crosses a noexcept C++ frame, and the whole process aborts
    (SIGABRT, "terminate called without an active exception") after its work was done — an
    exit status that fails a job, a requeue decision, a test. Every esmdist entry point ends
    here."""
    try:
        # What the interpreter itself does first at exit: the threading module's own exit
        # hooks (concurrent.futures tells its workers to stop), then non-daemon threads joined.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        os._exit(code)


def run_entry_point(name: str, main: Callable[[], int | None]) -> NoReturn:
    """`main()`'s status as this process's exit, through `exit_process`: its int (None: 0), or
    what it gave sys.exit; Ctrl-C 130. An exception that escapes it is a bug, not the user's
    doing: one line naming it, status 1 (ESMDIST_DEBUG=1: the traceback too)."""
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        code = 130
    except BaseException as exc:
        if os.environ.get("ESMDIST_DEBUG"):
            traceback.print_exc()
        print(f"{name}: internal error: {type(exc).__name__}: {exc} (a bug in esmdist: "
              "ESMDIST_DEBUG=1 shows where; please report it)", file=sys.stderr)  # fmt: skip
        code = 1
    exit_process(0 if code is None else int(code))


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

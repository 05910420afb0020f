"""Node-local scratch directories for staged uploads, DeepSpeed's files and verified downloads.

Each is named `esmdist-ckpt-{pid}-…`, so that one left behind by a process that no longer runs
(killed with SIGKILL, a node that lost power) is recognised and removed by the next process
that makes one on the machine: in /dev/shm it would hold host memory until a reboot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from esmdist.storage import Store

PREFIX = "esmdist-ckpt-"


def local_scratch(needed: int = 0) -> Path:
    """A fresh node-local directory: in host memory (/dev/shm) when it has room for twice
    `needed` bytes — no disk writeback then competes with training — else under TMPDIR."""
    base = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))
    memory = Path("/dev/shm")
    if needed and memory.is_dir():
        remove_orphans(memory)
        if shutil.disk_usage(memory).free > 2 * needed:
            base = memory
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))


def remove_orphans(base: Path) -> None:
    """Delete scratch directories under `base` of processes that no longer run."""
    for folder in base.glob(f"{PREFIX}*-*"):
        try:
            os.kill(int(folder.name.split("-")[2]), 0)
        except ProcessLookupError:
            remove_scratch(folder)
        except (ValueError, PermissionError):
            continue


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def local_path(store: Store, *parts: str) -> str:
    """Where an engine that writes only local files (DeepSpeed) saves: the checkpointer stages
    its saves to object storage in a node-local directory and uploads them."""
    if store.remote:
        raise ValueError(f"{store.url_of(*parts)}: this engine saves to local directories only")
    return store.path(*parts)

"""One rank's staged checkpoint files, uploaded in the caller or in the background.

In the background the upload runs in a child process (`python -m esmdist.storage upload`) at
the lowest CPU priority: it holds no lock training needs (the GIL included) and yields the cores
to training when they are contended. The child exits when its parent does (it watches the
parent's pid) and removes the staging directory on the way out; `abandon()` stops it at once
(Ctrl-C, an error in training), so neither a stray upload nor staged bytes in /dev/shm outlive
the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from esmdist.checkpoint.manifest import CheckpointError
from esmdist.checkpoint.scratch import remove_scratch
from esmdist.storage import Digests, Store


class Upload(threading.Thread):
    """Uploads `scratch` to `store/target` and remembers the digests, or the error instead of
    dying silently. `run()` uploads in the caller; `start()` in the background."""

    def __init__(self, store: Store, scratch: Path, target: str):
        super().__init__(name=f"upload-{target}", daemon=True)
        self.store, self.scratch, self.target = store, scratch, target
        self.digests: Digests = {}
        self.error: Exception | None = None
        self.child: subprocess.Popen | None = None
        self.in_background = False
        self.abandoned = False

    def start(self) -> None:
        self.in_background = True
        super().start()

    def run(self) -> None:
        try:
            if self.in_background:
                self.digests = self._run_child()
            else:
                self.digests = self.store.upload_dir(self.scratch, self.target)
        except Exception as exc:
            self.error = exc
        finally:
            remove_scratch(self.scratch)

    def _run_child(self) -> Digests:
        command = [sys.executable, "-m", "esmdist.storage", "upload", str(self.scratch),
                   self.store.url, self.target, str(self.store.retries), str(os.getpid())]  # fmt: skip
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as child:  # fmt: skip
            self.child = child
            if self.abandoned:  # abandoned while starting
                child.kill()
            out, err = child.communicate()
        if child.returncode != 0:
            reason = err.strip().splitlines()[-1:] or [f"exit code {child.returncode}"]
            raise CheckpointError(f"uploading {self.store.url_of(self.target)}: {reason[0]}")
        return {name: tuple(value) for name, value in json.loads(out).items()}

    def abandon(self) -> None:
        """Stop the upload now and remove the staging; the checkpoint stays uncommitted."""
        self.abandoned = True
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
        if self.is_alive():
            self.join()
        remove_scratch(self.scratch)

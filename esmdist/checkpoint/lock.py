"""One training run at a time per checkpoint root.

Two runs saving into one root would overwrite each other's step directories, and each one's
retention would delete the other's checkpoints. So rank 0 holds `ROOT/LOCK` while the run
lives: created atomically (O_EXCL locally, If-None-Match on object storage), refreshed by a
heartbeat, checked before every commit and removed on every exit that runs Python's
`finally`. A lock whose holder is gone is taken over: at once when the holder ran on this host
and its process no longer exists, or when it was an earlier attempt of the same Slurm job (a
requeue); otherwise once its heartbeat is older than the lease (a killed run on another node).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from esmdist.checkpoint.manifest import CheckpointError
from esmdist.storage import StorageError, Store

LOCK = "LOCK"
HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 180.0


@dataclass(frozen=True)
class Holder:
    id: str
    host: str
    pid: int
    slurm_job: str
    heartbeat: float

    def describe(self, now: float) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"{self.host} pid {self.pid}{job}, last seen {now - self.heartbeat:.0f} s ago"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, store: Store, lease: float = LEASE_SECONDS,
                 interval: float = HEARTBEAT_SECONDS):  # fmt: skip
        self.store, self.lease, self.interval = store, lease, interval
        self.id = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.store.url_of(LOCK)

    def _mine(self) -> bytes:
        holder = Holder(self.id, socket.gethostname(), os.getpid(),
                        os.environ.get("SLURM_JOB_ID", ""), time.time())  # fmt: skip
        return json.dumps(asdict(holder)).encode()

    def _holder(self) -> Holder | None:
        try:
            data = json.loads(self.store.read_bytes(LOCK))
            return Holder(str(data["id"]), str(data["host"]), int(data["pid"]),
                          str(data["slurm_job"]), float(data["heartbeat"]))  # fmt: skip
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # damaged: nobody can be holding it
            return Holder("", "", 0, "", 0.0)

    def _gone(self, holder: Holder) -> bool:
        if time.time() - holder.heartbeat > self.lease:
            return True
        if holder.host == socket.gethostname() and not _pid_exists(holder.pid):
            return True
        job = os.environ.get("SLURM_JOB_ID", "")
        return bool(job) and holder.slurm_job == job  # Slurm runs one attempt of a job at once

    def acquire(self) -> None:
        """Hold the lock, or raise CheckpointError naming the run that holds it."""
        for _ in range(5):
            if self.store.create(self._mine(), LOCK):
                break
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if holder.id == self.id:
                break  # our own create, answered by a retry
            if not self._gone(holder):
                raise CheckpointError(
                    f"{self.store.url}: in use by another run ({holder.describe(time.time())}; "
                    f"{self.url}). Two runs must not share a checkpoint root: give this one its "
                    f"own checkpoint.root. A run that died on another node frees it "
                    f"{self.lease:.0f} s after its last heartbeat."
                )
            self.store.remove(LOCK)  # its holder is gone: take it over
        else:
            raise CheckpointError(f"{self.url}: could not take the lock (contended)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="checkpoint-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._holder_id() == self.id:
                    self.store.write_bytes(self._mine(), LOCK)
            except StorageError:
                continue  # storage unreachable for now; check() decides at the next commit

    def _holder_id(self) -> str | None:
        holder = self._holder()
        return None if holder is None else holder.id

    def check(self) -> None:
        """Before a commit: raise if another run has taken the lock over."""
        if not self.held:
            return
        holder = self._holder()
        if holder is None or holder.id != self.id:
            taken = f" by {holder.describe(time.time())}" if holder else ""
            raise CheckpointError(
                f"{self.url}: this run's lock was taken over{taken}, so another run writes to "
                "this checkpoint root; stopping without committing"
            )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._holder_id() == self.id:
                self.store.remove(LOCK)
        except (StorageError, OSError):
            pass  # unreachable now: it expires with its lease

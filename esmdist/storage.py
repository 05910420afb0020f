"""Local directories and object storage (s3://…) behind one small interface, for checkpoints
and the sharder's outputs.

Endpoint, region and credentials come only from the standard AWS environment/config (never
from esmdist's config files, never logged). Transient errors are retried with exponential
backoff and jitter; missing files and refused credentials are not (retrying cannot fix them).
`python -m esmdist.storage upload SCRATCH URL TARGET RETRIES PARENT` is the background uploader
the checkpointer starts as a low-priority child process (no torch import: it starts in a
second); it exits, removing SCRATCH, when its parent does.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from esmdist.process import exit_with_parent, run_entry_point

T = TypeVar("T")
# Object-storage reads are ranged GETs of this size, this many in flight, hashed in order.
FETCH_CHUNK = 16 << 20
FETCH_PARALLEL = 4
# Local filesystem errors no retry can fix: fail at once, naming the file.
PERMANENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                    errno.ENAMETOOLONG}  # fmt: skip
Digests = dict[str, tuple[int, str]]
"""Relative file name → (size, sha256 hex)."""
_NAME_PART = re.compile(r"[A-Za-z0-9_.-]+")


class StorageError(RuntimeError):
    """A storage operation failed for good; the message names the operation and the object."""


def plain_relative(name: str, where: str, error: type[StorageError] = StorageError) -> str:
    """`name` when it is a relative path of plain parts (letters, digits, `_.-`; no `.` or `..`
    part) — the one rule for a name read from a listing or a manifest before it is joined to a
    local or remote directory; else `error` naming `where`."""
    parts = name.split("/")
    if not all(_NAME_PART.fullmatch(part) and part not in (".", "..") for part in parts):
        raise error(f"{where}: {name!r} is not a plain file name inside it (refusing a path "
                    "that could lead out of it)")  # fmt: skip
    return name


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Around code that writes the local file or directory `path`: its failure names it. A full
    disk (ENOSPC, EDQUOT) or an I/O error shows up in write() or close() as an OSError with no
    file name, and in torch.save's zip writer as a RuntimeError without even an errno; either
    would reach the user as "[Errno 28] No space left on device" about nothing in particular."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except RuntimeError as exc:
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OSError(errno.EIO, f"writing failed ({first}; {free / 2**20:.1f} MiB free there)",
                      str(path)) from None  # fmt: skip


def transient_errors() -> tuple[type[BaseException], ...]:
    """The failures a retry can cure: OSError (s3fs turns most HTTP errors into one), and the
    endpoint faults botocore raises as exceptions of its own — no connection, a closed
    connection, a timeout — which are not OSErrors. Refused credentials are not among them."""
    try:
        from botocore.exceptions import ConnectionError as Unreachable
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return (OSError,)
    return (OSError, Unreachable, HTTPClientError)


class Store:
    """A local directory or object-storage prefix through fsspec; every operation retried
    with backoff and jitter (a persistent failure raises StorageError naming the operation)."""

    def __init__(self, root: str, retries: int = 6):
        import fsspec

        self.url = root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.retries = retries
        self.remote = not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def retry(self, what: str, action: Callable[[], T]) -> T:
        delay = 0.5
        for attempt in range(1, self.retries + 1):
            try:
                return action()
            except FileNotFoundError:
                raise
            except PermissionError as exc:  # retrying cannot fix refused access
                raise StorageError(f"{what}: access denied ({exc}); {self.access_hint}") from None
            except transient_errors() as exc:
                permanent = getattr(exc, "errno", None) in PERMANENT_ERRORS
                if permanent or attempt == self.retries:
                    tries = "" if permanent else f" after {attempt} attempts"
                    raise StorageError(
                        f"{what}: failed{tries} ({type(exc).__name__}: {exc})"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 30.0)
                self.fs.invalidate_cache()
        raise AssertionError("unreachable")

    @property
    def location(self) -> tuple:
        """What identifies the root however it was spelled (relative or absolute, `s3://a/`
        or `s3://a`): the filesystem's protocol and its own path of the root."""
        protocol = self.fs.protocol
        root = self.root.rstrip("/") if self.remote else os.path.normpath(self.root)
        return (protocol if isinstance(protocol, str) else protocol[0], root)

    @property
    def access_hint(self) -> str:
        if self.remote:
            return ("check the credentials and endpoint in the environment (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE)")  # fmt: skip
        return "check the directory's permissions"

    def check_writable(self) -> None:
        """Write and delete a small probe object under the root, so that a read-only
        directory, refused credentials or a missing bucket fail before any work is done."""
        probe = f".esmdist-write-test-{os.getpid()}-{random.getrandbits(32):08x}"
        what = f"writing to {self.url}"
        try:
            self.write_bytes(b"esmdist write test\n", probe)
            self.remove(probe)
        except FileNotFoundError as exc:
            raise StorageError(f"{what}: {exc} (does the bucket exist?)") from None
        except OSError as exc:
            raise StorageError(f"{what}: {exc.strerror or exc}; {self.access_hint}") from None

    def free_bytes(self) -> int | None:
        """Free space of the local filesystem holding the root (None for object storage)."""
        if self.remote:
            return None
        existing = Path(self.root)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        return shutil.disk_usage(existing).free

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)
        if not self.remote:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.retry(f"writing {self.url_of(*parts)}", lambda: self.fs.pipe_file(path, data))

    def create(self, data: bytes, *parts: str) -> bool:
        """Write one object only if it does not exist yet, decided atomically by the filesystem
        (O_EXCL) or the object store (If-None-Match: *); False if it existed."""
        path = self.path(*parts)

        def write() -> bool:
            try:
                if self.remote:
                    self.fs.pipe_file(path, data, mode="create")
                else:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "xb") as out:
                        out.write(data)
            except FileExistsError:
                return False
            except OSError as exc:  # s3fs: 412 Precondition Failed
                if exc.errno == errno.EINVAL and "pre-condition" in str(exc).lower():
                    return False
                raise
            return True

        return self.retry(f"creating {self.url_of(*parts)}", write)

    def read_bytes(self, *parts: str) -> bytes:
        return self.retry(
            f"reading {self.url_of(*parts)}", lambda: self.fs.cat_file(self.path(*parts))
        )

    def exists(self, *parts: str) -> bool:
        return self.retry(
            f"checking {self.url_of(*parts)}", lambda: self.fs.exists(self.path(*parts))
        )

    def files(self, *parts: str) -> dict[str, int]:
        """Relative path → size of every file under a directory."""
        base = self.path(*parts)
        found = self.retry(f"listing {self.url_of(*parts)}",
                           lambda: self.fs.find(base, detail=True))  # fmt: skip
        return {k[len(base) + 1 :]: int(v["size"]) for k, v in found.items() if v["type"] == "file"}

    def download_tree(self, local: Path, *parts: str) -> None:
        """Copy a remote directory, subdirectories included, to `local`."""
        for name in self.files(*parts):
            target = local / plain_relative(name, self.url_of(*parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.path(*parts, name)
            self.retry(f"downloading {self.url_of(*parts, name)}",
                       lambda s=source, t=target: self.fs.get_file(s, str(t)))  # fmt: skip

    def sha256(self, *parts: str) -> str:
        def digest() -> str:
            with self.fs.open(self.path(*parts), "rb", block_size=8 << 20) as handle:
                return stream_sha256(handle)

        return self.retry(f"reading {self.url_of(*parts)}", digest)

    def fetch(self, local: Path, size: int, *parts: str) -> str:
        """Copy one remote file of `size` bytes to `local`, returning its sha256: ranged GETs
        run in parallel while the bytes are hashed and written in order, so every byte is read
        from the network once and verification costs no second pass."""
        path, url = self.path(*parts), self.url_of(*parts)
        h = hashlib.sha256()
        local.parent.mkdir(parents=True, exist_ok=True)
        ranges = deque(
            (start, min(start + FETCH_CHUNK, size)) for start in range(0, size, FETCH_CHUNK)
        )
        with open(local, "wb") as out, ThreadPoolExecutor(FETCH_PARALLEL) as pool:

            def get(start: int, end: int):
                return pool.submit(self.retry, f"reading {url}",
                                   lambda: self.fs.cat_file(path, start=start, end=end))  # fmt: skip

            inflight = deque(
                get(*ranges.popleft()) for _ in range(min(len(ranges), FETCH_PARALLEL))
            )
            while inflight:
                data = inflight.popleft().result()
                if ranges:
                    inflight.append(get(*ranges.popleft()))
                h.update(data)
                out.write(data)
        return h.hexdigest()

    def upload_dir(self, local: Path, *parts: str) -> Digests:
        """Upload every file under `local`; returns their sizes and sha256, hashed from the
        local copy while the upload runs (no read-back from storage)."""
        digests: Digests = {}
        with ThreadPoolExecutor(1) as hasher:
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                name = str(file.relative_to(local))
                target = self.path(*parts, name)
                if not self.remote:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                digest = hasher.submit(file_sha256, file)
                self.retry(
                    f"uploading {target}", lambda f=file, t=target: self.fs.put_file(str(f), t)
                )
                digests[name] = (file.stat().st_size, digest.result())
        return digests

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        self.retry(f"deleting {self.url_of(*parts)}", lambda: self.fs.rm(path, recursive=True))

    def publish(self, local: Path, *parts: str) -> None:
        """Move the finished local file `local` to `parts`, visible only once complete (a local
        rename, or an upload: an object appears only when its upload completes)."""
        target = self.path(*parts)
        if self.remote:
            self.retry(f"uploading {self.url_of(*parts)}",
                       lambda: self.fs.put_file(str(local), target))  # fmt: skip
            local.unlink()
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(local, target)
        except OSError:  # another filesystem: copy beside the target, then rename
            staged = Path(target + ".partial")
            shutil.copyfile(local, staged)
            os.replace(staged, target)
            local.unlink()


class HashingStream(io.RawIOBase):
    """Bytes passing through to (`mode` "w") or from ("r") the stream `inner`, their sha256
    and count taken on the way: a file verified or digested in the one pass that moves it."""

    def __init__(self, inner, mode: str):
        super().__init__()
        self.inner, self.mode = inner, mode
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return self.mode == "r"

    def writable(self) -> bool:
        return self.mode == "w"

    def _count(self, data) -> int:
        self.sha.update(data)
        size = memoryview(data).nbytes
        self.size += size
        return size

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return self._count(data)

    def write(self, data) -> int:
        self.inner.write(data)
        return self._count(data)

    def drain(self) -> None:
        """Read (and hash) what is left."""
        while self.read(1 << 20):
            pass

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self.writable():
            self.inner.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self.inner.close()


def stream_sha256(handle) -> str:
    h = hashlib.sha256()
    while chunk := handle.read(8 << 20):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return stream_sha256(handle)


def main(argv: list[str]) -> int:
    """`upload SCRATCH URL TARGET RETRIES PARENT`: upload SCRATCH's files under URL/TARGET at the
    lowest CPU priority and print their digests as JSON (errors: one line on stderr, exit 1).
    Exits, removing SCRATCH, as soon as process PARENT is gone."""
    command, scratch, url, target, retries, parent = argv
    if command != "upload":
        raise SystemExit(f"unknown command {command!r}")
    exit_with_parent(int(parent), lambda: shutil.rmtree(scratch, ignore_errors=True))
    os.nice(19)
    try:
        digests = Store(url, int(retries)).upload_dir(Path(scratch), target)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    json.dump(digests, sys.stdout)
    return 0


if __name__ == "__main__":
    run_entry_point("esmdist.storage", lambda: main(sys.argv[1:]))

"""What a committed checkpoint is, and the checks every load makes against it.

`ROOT/step_000001000/` is committed once `COMMITTED` exists in it: JSON with the size and
sha256 of every other file of the checkpoint, written last (by rank 0, after every rank
finished). Before anything of a checkpoint is used, its listing must match COMMITTED exactly —
no file missing, none of another size, none that COMMITTED does not list — and every file is
checked against its sha256 as it is read. Every name in COMMITTED is a plain relative path
inside the checkpoint, so a forged manifest cannot make a load read or write elsewhere.

What this protects against: corruption, truncation, a partial or concurrent write, files
replaced or added after the commit by accident. What it does not: COMMITTED is not signed, so
whoever can rewrite the checkpoint root can also rewrite COMMITTED; such a checkpoint still
cannot run code (every pickle is read through an allow-list, see `esmdist.checkpoint.dcp` and
`esmdist.checkpoint.safe_load`), but it can hold other weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esmdist.storage import Digests, StorageError, Store, file_sha256, plain_relative

COMMITTED = "COMMITTED"
STEP_DIR = re.compile(r"^step_(\d{9})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(StorageError):
    """A checkpoint cannot be saved or loaded; the message names the file or key."""


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def safe_relative(name: str, where: str) -> str:
    """`name` when it is a plain relative file name (storage.plain_relative); else
    CheckpointError naming `where`."""
    return plain_relative(name, where, CheckpointError)


def parse_manifest(data: bytes, url: str) -> Digests:
    """COMMITTED's `{"files": {name: [size, sha256]}}`, every entry checked."""
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"{url}: not valid JSON ({exc}): the marker is damaged") from None
    files = parsed.get("files") if isinstance(parsed, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{url}: no 'files' table: the marker is damaged")
    manifest: Digests = {}
    for name, entry in files.items():
        safe_relative(name, url)
        well_formed = (
            isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
            and entry[0] >= 0 and isinstance(entry[1], str) and _SHA256.match(entry[1])
        )  # fmt: skip
        if not well_formed:
            raise CheckpointError(f"{url}: the entry of {name!r} is not [size, sha256 hex]")
        manifest[name] = (entry[0], entry[1])
    return manifest


def model_optim_digests(manifest: Digests) -> Digests:
    """COMMITTED's entries for the files under `model_optim/`, by name within it."""
    prefix = "model_optim/"
    return {f[len(prefix) :]: entry for f, entry in manifest.items() if f.startswith(prefix)}


class CheckpointStore(Store):
    """A checkpoint root: the store plus the listing and verification checkpoints need."""

    def check_file(self, expected: Digests, *parts: str, copy_to: Path | None = None) -> None:
        """Check one file against `expected` (COMMITTED's entries for its directory), hashing
        it in place or, with `copy_to`, while fetching it there; CheckpointError names it."""
        name, url = parts[-1], self.url_of(*parts)
        safe_relative(name, url)
        if name not in expected:
            raise CheckpointError(f"{url}: not listed in {COMMITTED}")
        size, digest = expected[name]
        if copy_to is None:
            got = file_sha256(self.path(*parts))
        else:
            got = self.fetch(copy_to / name, size, *parts)
        if got != digest:
            raise CheckpointError(f"{url}: sha256 differs from {COMMITTED} (corrupted)")

    def download_dir(self, local: Path, *parts: str, expected: Digests | None = None) -> None:
        """Copy a remote directory to `local`; with `expected`, check every file against its
        sha256 (taken on the way) and raise CheckpointError naming the first that differs."""
        if expected is None:
            self.download_tree(local, *parts)
            return
        for name in self.files(*parts):
            self.check_file(expected, *parts, name, copy_to=local)

    def steps(self) -> tuple[list[int], list[int]]:
        """(committed steps, uncommitted steps), ascending."""
        self.fs.invalidate_cache()  # other ranks and runs write here: list afresh
        if not self.exists():
            return [], []
        entries = self.retry(f"listing {self.url}", lambda: self.fs.ls(self.root, detail=False))
        committed, partial = [], []
        for entry in entries:
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                step = int(match.group(1))
                if self.exists(step_name(step), COMMITTED):
                    committed.append(step)
                elif self.files(step_name(step)):
                    # Without files it is a deleted prefix that some servers (SeaweedFS) still
                    # list as an empty directory.
                    partial.append(step)
        return sorted(committed), sorted(partial)


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint whose listing matches its COMMITTED manifest."""

    store: CheckpointStore
    name: str
    manifest: Digests

    @property
    def url(self) -> str:
        return self.store.url_of(self.name)

    @property
    def step(self) -> int:
        return int(self.name.rsplit("_", 1)[1])

    @classmethod
    def open(cls, store: CheckpointStore, name: str) -> Committed:
        """Refuse an uncommitted checkpoint, and one whose files differ from COMMITTED's list
        (missing, another size, or not listed), naming every such file."""
        url = store.url_of(name)
        if not store.exists(name, COMMITTED):
            raise CheckpointError(f"{url}: not committed (no {COMMITTED}): refusing to load it")
        manifest = parse_manifest(store.read_bytes(name, COMMITTED), store.url_of(name, COMMITTED))
        stored = store.files(name)
        problems = []
        for file, (size, _) in sorted(manifest.items()):
            if file not in stored:
                problems.append(f"{url}/{file}: listed in {COMMITTED} but missing")
            elif stored[file] != size:
                problems.append(
                    f"{url}/{file}: {stored[file]} bytes, {COMMITTED} says {size} (truncated?)"
                )
        for file in sorted(set(stored) - set(manifest) - {COMMITTED}):
            problems.append(f"{url}/{file}: not listed in {COMMITTED} (added after the commit)")
        if problems:  # every rank lists the same files, so all raise together
            raise CheckpointError("; ".join(problems))
        return cls(store, name, manifest)

    def json(self, file: str) -> Any:
        """A JSON file of the checkpoint, checked against its sha256 first."""
        url = self.store.url_of(self.name, file)
        data = self.store.read_bytes(self.name, file)
        if file not in self.manifest or hashlib.sha256(data).hexdigest() != self.manifest[file][1]:
            raise CheckpointError(f"{url}: sha256 differs from {COMMITTED}")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CheckpointError(f"{url}: not valid JSON ({exc})") from None

    @property
    def model_optim(self) -> Digests:
        return model_optim_digests(self.manifest)


def open_checkpoint(where: str, retries: int = 6) -> Committed:
    """The committed checkpoint at `where` (`…/step_NNNNNNNNN`, local or s3://)."""
    root, _, name = where.rstrip("/").rpartition("/")
    if not STEP_DIR.match(name):
        raise CheckpointError(f"{where}: not a checkpoint directory (step_NNNNNNNNN)")
    return Committed.open(CheckpointStore(root or ".", retries), name)

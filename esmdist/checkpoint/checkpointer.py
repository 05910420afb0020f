"""Checkpoints in a local directory or object storage, committed atomically, resumed exactly.

Layout of one checkpoint, `ROOT/step_000001000/`:
- `model_optim/`  the model and optimizer, sharded per rank: torch DCP for single/DDP/FSDP2
  (reshardable to another world size), DeepSpeed's own files for ZeRO;
- `train_state.json`  step, tokens seen, every rank's data-loader state, RNG states, run ids,
  world size, backend, the dataset's fingerprint (`esmdist.train_state`);
- `config.json`  the resolved run config; `version.json`  esmdist version and git commit;
- `COMMITTED`  written last, by rank 0, after every rank finished (`esmdist.checkpoint.manifest`).

A root holds one run: its rank 0 holds `ROOT/LOCK` while it lives (`esmdist.checkpoint.lock`),
and a run may start in a root that holds checkpoints only by resuming the newest of them.

Object storage: `s3://bucket/prefix` through fsspec/s3fs; endpoint, region and credentials come
only from the standard AWS environment/config. Transient errors are retried with exponential
backoff and jitter; a persistent one fails the save loudly, and the previous checkpoint stays
the latest committed one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.distributed.checkpoint.api import CheckpointException

from esmdist.checkpoint.dcp import dcp_failures, dcp_writer, load_dcp
from esmdist.checkpoint.deepspeed_files import DEEPSPEED_TAG, verified_local_copy
from esmdist.checkpoint.full_state import load_full
from esmdist.checkpoint.lock import RunLock
from esmdist.checkpoint.manifest import (
    COMMITTED,
    STEP_DIR,
    CheckpointError,
    CheckpointStore,
    Committed,
    step_name,
)
from esmdist.checkpoint.safe_load import torch_pickles_without_code
from esmdist.checkpoint.scratch import local_path, local_scratch
from esmdist.checkpoint.upload import Upload
from esmdist.collectives import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    rank_world,
)
from esmdist.ranges import bounded, check_fields
from esmdist.storage import Digests, StorageError, Store
from esmdist.version import version_info as package_version


@dataclass(frozen=True)
class CheckpointConfig:
    root: str = ""
    """Local directory or s3://bucket/prefix; empty: `{train.output_dir}/checkpoints`."""
    every: int = bounded(1000, 0, 10**10)
    """Save every this many steps (and at the end, and on SIGUSR1/SIGTERM/SIGINT). 0: only then."""
    keep: int = bounded(3, 1, 10**6)
    """Keep the newest this many committed checkpoints…"""
    keep_every: int = bounded(0, 0, 10**10)
    """…and also every step that is a multiple of this (0: none)."""
    resume: str = "auto"
    """`auto`: the newest committed checkpoint under root, if any; `none`; or a path."""
    retries: int = bounded(6, 1, 100)
    """Attempts of each storage operation before a save fails."""
    async_upload: bool = True
    """Object storage: stage shards in host memory (or node-local disk) and upload them while
    training goes on."""

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")
        if not self.resume:
            raise ValueError("checkpoint.resume: give auto, none or a checkpoint path")


def _on_every_rank(action) -> None:
    """Run `action` on rank 0; if it fails (a storage or checkpoint error), every rank raises
    it as a CheckpointError, so no rank is left waiting in a collective."""
    message = None
    if rank_world()[0] == 0:
        try:
            action()
        except (StorageError, OSError) as exc:
            message = str(exc)
    message = broadcast_object(message)
    if message is not None:
        raise CheckpointError(message)


def version_info() -> dict[str, str]:
    return {**package_version(), "torch": torch.__version__}


class Checkpointer:
    """Saves, commits, prunes and finds checkpoints for one run (every rank holds one)."""

    def __init__(self, config: CheckpointConfig, root: str):
        self.config = config
        self.store = CheckpointStore(root, config.retries)
        self.lock = RunLock(self.store)
        self.pending: tuple[str, Upload] | None = None
        self.written: Digests = {}

    # ------------------------------------------------------------------- the run
    def begin(self, where: str | None) -> None:
        """Take the root for this run (rank 0 holds its lock; every rank learns a refusal):
        the root must be writable, free, and hold no checkpoint newer than where the run
        resumes from — retention would delete one run's checkpoints for the other's, and an
        automatic resume would go back to the other."""

        def take() -> None:
            self.store.check_writable()
            self.lock.acquire()
            committed, _ = self.store.steps()
            if not committed:
                return
            newest = step_name(committed[-1])
            if where is None or self._locate(where) != (self.store.location, newest):
                source = "starts fresh" if where is None else f"resumes from {where}"
                raise CheckpointError(
                    f"{self.store.url} holds checkpoints up to {newest}, but this run {source}: "
                    "one root holds one run (retention would delete the other's checkpoints). "
                    "Use another checkpoint.root, resume=auto to continue that run, or delete "
                    "its newer checkpoints first"
                )

        try:
            _on_every_rank(take)
        except CheckpointError:
            self.lock.release()
            raise

    def close(self) -> None:
        """On every exit: stop an unfinished background upload (its checkpoint stays
        uncommitted), remove its staging, release the root."""
        if self.pending is not None:
            self.pending[1].abandon()
            self.pending = None
        self.lock.release()

    # ---------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        engine: CheckpointedEngine,
        train_state: dict,
        job_config: dict,
        background: bool = False,
    ) -> None:
        """Write checkpoint `step` from every rank, then commit it (rank 0) and prune.

        Object storage: engines that can stream their files there do so, hashing on the way;
        with `background` (or for DeepSpeed, which writes local files) every rank writes its
        shards to node-local scratch, hashes and uploads them — never a read-back. In the
        background the upload runs in a low-priority child process, the staging is the only
        pause in training, and the checkpoint is committed by the next `save` or `wait`, which
        first waits for it. A crash in between leaves it uncommitted, and the
        previous one stays the latest."""
        self.wait()
        rank, _ = rank_world()
        name = step_name(step)

        def clear() -> None:
            if self.store.exists(name, COMMITTED):
                raise CheckpointError(f"{self.store.url_of(name)} is already committed: refusing "
                                      "to overwrite it (does another run write here?)")  # fmt: skip
            if self.store.exists(name):
                self.store.remove(name)  # an uncommitted leftover of a killed save

        _on_every_rank(clear)
        known: Digests = {}
        try:
            streams = engine.checkpoint_format == "dcp"  # DCP files can stream to storage
            if self.store.remote and (background or not streams):
                scratch = local_scratch(needed=engine.state_bytes())
                self.pending = (name, Upload(self.store, scratch, name))
                write_engine_state(engine, Store(str(scratch)), "model_optim")
            else:
                written = write_engine_state(engine, self.store, name, "model_optim")
                known = {f"model_optim/{file}": digest for file, digest in written.items()}
        except (OSError, CheckpointException) as exc:
            # A full disk often surfaces as a torch.save zip-writer error that lost the errno.
            free, needed = self.store.free_bytes(), engine.state_bytes()
            full = "" if free is None or free >= needed else (
                f"No space left on device: {free / 2**20:.1f} MiB free, a checkpoint needs up to "
                f"{needed / 2**20:.1f} MiB; ")  # fmt: skip
            raise CheckpointError(
                f"{self.store.url_of(name)}: saving failed ({full}{'; '.join(dcp_failures(exc))});"
                " the previous committed checkpoint is still the latest"
            ) from exc
        if self.pending is not None:
            if background:
                self.pending[1].start()
            else:
                self.pending[1].run()
        self.written = {}
        if rank == 0:
            for file, text in (
                ("train_state.json", json.dumps(train_state, indent=1)),
                ("config.json", json.dumps(job_config, indent=1, default=list)),
                ("version.json", json.dumps(version_info(), indent=1)),
            ):
                data = text.encode()
                self.store.write_bytes(data, name, file)
                self.written[file] = (len(data), hashlib.sha256(data).hexdigest())
        if self.pending is None:
            self._finish(name, known)
        elif not background:
            self.wait()

    def wait(self) -> None:
        """Finish (upload, commit, prune) the save in flight, if any."""
        if self.pending is None:
            return
        name, upload = self.pending
        if upload.is_alive():
            upload.join()
        self.pending = None
        failed = all_reduce_sum(torch.tensor([0.0 if upload.error is None else 1.0]))
        if failed.item():
            raise CheckpointError(
                f"{self.store.url_of(name)}: upload failed on {int(failed.item())} rank(s)"
                + (f" ({upload.error})" if upload.error else "")
                + "; the previous committed checkpoint is still the latest"
            )
        self._finish(name, upload.digests)

    def _finish(self, name: str, uploaded: Digests) -> None:
        rank, world = rank_world()
        barrier()
        self._commit(name, rank, world, {**uploaded, **self.written})
        barrier()
        if rank == 0:
            self.prune()

    def _commit(self, name: str, rank: int, world: int, known: Digests) -> None:
        """Rank 0 writes COMMITTED with the size and sha256 of every file in the checkpoint:
        those each rank hashed as it wrote them (`known`), the rest hashed now, a share per
        rank. A listed size that differs from what was written fails the save."""
        listing = broadcast_object(self.store.files(name) if rank == 0 else None)
        known = {f: v for part in gather_objects(known) for f, v in part.items()}
        rest = [(f, size) for f, size in sorted(listing.items()) if f not in known]
        mine = {f: (size, self.store.sha256(name, f)) for i, (f, size) in enumerate(rest)
                if i % world == rank}  # fmt: skip
        hashed = gather_objects(mine)

        def commit() -> None:
            manifest = {**known, **{f: v for part in hashed for f, v in part.items()}}
            for file, size in listing.items():
                if manifest[file][0] != size:
                    raise CheckpointError(f"{self.store.url_of(name, file)}: {size} bytes "
                                          f"stored, {manifest[file][0]} written")  # fmt: skip
            missing = sorted(set(manifest) - set(listing))
            if missing:
                raise CheckpointError(f"{self.store.url_of(name)}: written but not stored: "
                                      + ", ".join(missing))  # fmt: skip
            self.lock.check()
            files = {f: list(manifest[f]) for f in sorted(manifest)}
            if not self.store.create(json.dumps({"files": files}, indent=1).encode(), name,
                                     COMMITTED):  # fmt: skip
                raise CheckpointError(f"{self.store.url_of(name, COMMITTED)} appeared while "
                                      "this run saved: another run writes here")  # fmt: skip

        _on_every_rank(commit)

    def prune(self) -> None:
        """Delete all but the newest `keep` committed checkpoints (plus multiples of
        `keep_every`), and uncommitted leftovers older than the newest committed one."""
        committed, partial = self.store.steps()
        if not committed:
            return
        keep = set(committed[-max(1, self.config.keep) :])
        if self.config.keep_every:
            keep |= {s for s in committed if s % self.config.keep_every == 0}
        for step in committed:
            if step not in keep:
                self.store.remove(step_name(step))
        for step in partial:
            if step < committed[-1]:
                self.store.remove(step_name(step))

    # --------------------------------------------------------------------- loading
    def find(self) -> str | None:
        """The checkpoint to resume from per `config.resume`, as a step directory name or a
        full path; None to start fresh."""
        resume = self.config.resume
        if resume == "none":
            return None
        if resume == "auto":
            committed, _ = self.store.steps()
            return step_name(committed[-1]) if committed else None
        return resume

    def _store_for(self, where: str) -> tuple[CheckpointStore, str]:
        """(root, step directory) of `where`, a step name under this root or a path."""
        if STEP_DIR.match(where):
            return self.store, where
        root, _, name = where.rstrip("/").rpartition("/")
        if not STEP_DIR.match(name):
            raise CheckpointError(f"{where}: not a checkpoint directory (step_NNNNNNNNN)")
        store = CheckpointStore(root or ".", self.config.retries)
        return (self.store if store.location == self.store.location else store), name

    def _locate(self, where: str) -> tuple[tuple, str]:
        store, name = self._store_for(where)
        return store.location, name

    def open(self, where: str) -> Committed:
        """The committed checkpoint `where`, its files checked against COMMITTED's list."""
        return Committed.open(*self._store_for(where))

    def load(
        self, checkpoint: Committed, engine: CheckpointedEngine, convert: bool = False
    ) -> None:
        """Load the engine's model and optimizer state from `checkpoint`; the sha256 of each
        file is checked as it is read for loading (one pass over the bytes). `convert`: the
        checkpoint was written by another engine layout (world size, backend, ZeRO stage): rank
        0 reads its whole state and every rank takes its part."""
        parts = (checkpoint.name, "model_optim")
        if convert:
            load_full(engine, checkpoint.store, *parts, expected=checkpoint.model_optim)
        else:
            read_engine_state(engine, checkpoint.store, *parts, expected=checkpoint.model_optim)


class CheckpointedEngine(Protocol):
    """What the checkpointer needs of a training engine (`esmdist.parallel.Engine`)."""

    checkpoint_format: str
    """"dcp": the state dict below is saved and filled with DCP; "files": the engine writes and
    reads its own files in a local directory (DeepSpeed)."""

    def state_bytes(self) -> int: ...
    def checkpoint_state(self) -> dict: ...
    def load_checkpoint_state(self, state: dict) -> None: ...
    def save_files(self, directory: str, tag: str) -> None: ...
    def load_files(self, directory: str, tag: str) -> None: ...
    def full_shapes(self) -> dict[str, tuple[int, ...]]: ...
    def load_full_state(self, model: dict | None, moments: dict | None, step: float) -> None: ...


def write_engine_state(engine: CheckpointedEngine, store: Store, *parts: str) -> Digests:
    """Write the engine's model and optimizer, each rank its part, under `store/parts`; the
    (size, sha256) of the files this rank streamed to object storage, by name."""
    if engine.checkpoint_format == "dcp":
        import torch.distributed.checkpoint as dcp

        writer = dcp_writer(store, *parts)
        dcp.save(engine.checkpoint_state(), storage_writer=writer)
        return writer.digests
    engine.save_files(local_path(store, *parts), tag=DEEPSPEED_TAG)
    return {}


def read_engine_state(engine: CheckpointedEngine, store: CheckpointStore, *parts: str,
                      expected: Digests) -> None:  # fmt: skip
    """Restore what `write_engine_state` wrote, every file checked against `expected`
    (COMMITTED's sizes and sha256), no pickle able to run code."""
    url = store.url_of(*parts)
    if engine.checkpoint_format == "dcp":
        state = engine.checkpoint_state()
        load_dcp(state, store, *parts, expected=expected)
        engine.load_checkpoint_state(state)
        return
    with (
        verified_local_copy(store, *parts, expected=expected) as directory,
        torch_pickles_without_code(url),
    ):
        try:
            engine.load_files(directory, tag=DEEPSPEED_TAG)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{url}: {exc}") from None

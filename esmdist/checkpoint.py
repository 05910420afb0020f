"""Checkpoints in a local directory or object storage, committed atomically, resumed exactly.

Layout of one checkpoint, `ROOT/step_000001000/`:
- `model_optim/`  the model and optimizer, sharded per rank: torch DCP for single/DDP/FSDP2
  (reshardable to another world size), DeepSpeed's own files for ZeRO;
- `train_state.json`  step, tokens seen, LR schedule, every rank's data-loader state, RNG
  states, wandb run id, world size, backend;
- `config.json`  the resolved run config; `version.json`  esmdist version and git commit;
- `COMMITTED`  written last, by rank 0, after every rank finished: the size and sha256 of every
  file above. A directory without it is never loaded; `latest` is the newest committed step,
  found by listing (no mutable pointer that could be torn). Loading checks every file's size
  against COMMITTED up front and each sha256 as the file is read, so a truncated or corrupted
  file is named instead of silently loaded; DCP's `.metadata` pickle is read through an
  allow-list, so a checkpoint cannot run code.

Object storage: `s3://bucket/prefix` through fsspec/s3fs; endpoint, region and credentials come
only from the standard AWS environment/config. Transient errors are retried with exponential
backoff and jitter; a persistent one fails the save loudly, and the previous checkpoint stays
the latest committed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from esmdist.storage import Digests, StorageError, Store, file_sha256

COMMITTED = "COMMITTED"
STREAM_FILES = 8
STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(StorageError):
    """A checkpoint cannot be saved or loaded; the message names the file or key."""


@dataclass(frozen=True)
class CheckpointConfig:
    root: str = ""
    """Local directory or s3://bucket/prefix; empty: `{train.output_dir}/checkpoints`."""
    every: int = 1000
    """Save every this many steps (and at the end, and on SIGUSR1/SIGTERM). 0: only then."""
    keep: int = 3
    """Keep the newest this many committed checkpoints…"""
    keep_every: int = 0
    """…and also every step that is a multiple of this (0: none)."""
    resume: str = "auto"
    """`auto`: the newest committed checkpoint under root, if any; `none`; or a path."""
    retries: int = 6
    """Attempts of each storage operation before a save fails."""
    async_upload: bool = True
    """Object storage: stage shards in host memory (or node-local disk) and upload them while
    training goes on."""


def step_name(step: int) -> str:
    return f"step_{step:09d}"


class CheckpointStore(Store):
    """A checkpoint root: the store plus the listing and verification checkpoints need."""

    def check_file(self, expected: Digests, *parts: str, copy_to: Path | None = None) -> None:
        """Check one file against `expected` (COMMITTED's entries for its directory), hashing
        it in place or, with `copy_to`, while fetching it there; CheckpointError names it."""
        name, url = parts[-1], self.url_of(*parts)
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
        for name in self.files(*parts):
            if expected is not None:
                self.check_file(expected, *parts, name, copy_to=local)
                continue
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.path(*parts, name)
            self.retry(f"downloading {source}",
                       lambda s=source, t=target: self.fs.get_file(s, str(t)))  # fmt: skip

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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def version_info() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        esmdist_version = version("esmdist")
    except PackageNotFoundError:
        esmdist_version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "esmdist": esmdist_version,
        "git_commit": commit or "unknown",
        "torch": torch.__version__,
    }


def rng_state() -> dict[str, Any]:
    """The torch RNG states as JSON-able lists (the loop's randomness is all seeded by the data
    order; these restore anything else, e.g. dropout in a user's model variant)."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class _Upload(threading.Thread):
    """Uploads one rank's staged shards and remembers their digests, or the error instead of
    dying silently. `run()` uploads in the caller; `start()` in the background, from a child
    process at the lowest CPU priority: it holds no lock training needs (the GIL included)
    and yields the cores to training when they are contended."""

    def __init__(self, store: Store, scratch: Path, name: str):
        super().__init__(name=f"upload-{name}", daemon=True)
        self.store, self.scratch, self.target = store, scratch, name
        self.digests: Digests = {}
        self.error: Exception | None = None
        self.child = False

    def start(self) -> None:
        self.child = True
        super().start()

    def run(self) -> None:
        try:
            if self.child:
                self.digests = self._run_child()
            else:
                self.digests = self.store.upload_dir(self.scratch, self.target)
        except Exception as exc:
            self.error = exc
        finally:
            remove_scratch(self.scratch)

    def _run_child(self) -> Digests:
        done = subprocess.run(
            [sys.executable, "-m", "esmdist.storage", "upload", str(self.scratch),
             self.store.url, self.target, str(self.store.retries)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            raise CheckpointError(f"uploading {self.store.url_of(self.target)}: {reason[0]}")
        return {name: tuple(value) for name, value in json.loads(done.stdout).items()}


class Checkpointer:
    """Saves, commits, prunes and finds checkpoints for one run (every rank holds one)."""

    def __init__(self, config: CheckpointConfig, root: str):
        self.config = config
        self.store = CheckpointStore(root, config.retries)
        self.pending: tuple[str, _Upload] | None = None
        self.written: Digests = {}

    # ---------------------------------------------------------------------- saving
    def save(
        self, step: int, engine, train_state: dict, job_config: dict, background: bool = False
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
        rank, _ = _rank_world()
        name = step_name(step)
        if rank == 0 and self.store.exists(name):
            self.store.remove(name)  # an uncommitted leftover of a killed save
        _barrier()
        known: Digests = {}
        if self.store.remote and (background or not engine.streams_to_object_storage):
            scratch = local_scratch(needed=engine.state_bytes())
            engine.save(Store(str(scratch)), "model_optim")
            self.pending = (name, _Upload(self.store, scratch, name))
            if background:
                self.pending[1].start()
            else:
                self.pending[1].run()
        else:
            written = engine.save(self.store, name, "model_optim")
            known = {f"model_optim/{file}": digest for file, digest in written.items()}
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
        self.pending = None
        if upload.is_alive():
            upload.join()
        failed = torch.tensor([0.0 if upload.error is None else 1.0])
        if dist.is_initialized():
            dist.all_reduce(failed)
        if failed.item():
            raise CheckpointError(
                f"{self.store.url_of(name)}: upload failed on {int(failed.item())} rank(s)"
                + (f" ({upload.error})" if upload.error else "")
                + "; the previous committed checkpoint is still the latest"
            )
        self._finish(name, upload.digests)

    def _finish(self, name: str, uploaded: Digests) -> None:
        rank, world = _rank_world()
        _barrier()
        self._commit(name, rank, world, {**uploaded, **self.written})
        _barrier()
        if rank == 0:
            self.prune()

    def _commit(self, name: str, rank: int, world: int, known: Digests) -> None:
        """Rank 0 writes COMMITTED with the size and sha256 of every file in the checkpoint:
        those each rank hashed as it wrote them (`known`), the rest hashed now, a share per
        rank. A listed size that differs from what was written fails the save."""
        listing = [self.store.files(name) if rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(listing, src=0)
        known_parts = [known]
        if dist.is_initialized():
            known_parts = [None] * world
            dist.all_gather_object(known_parts, known)
        known = {f: v for part in known_parts for f, v in part.items()}
        rest = [(f, size) for f, size in sorted(listing[0].items()) if f not in known]
        mine = {f: (size, self.store.sha256(name, f)) for i, (f, size) in enumerate(rest)
                if i % world == rank}  # fmt: skip
        hashed = [mine]
        if dist.is_initialized():
            hashed = [None] * world
            dist.all_gather_object(hashed, mine)
        if rank == 0:
            manifest = {**known, **{f: v for part in hashed for f, v in part.items()}}
            for file, size in listing[0].items():
                if manifest[file][0] != size:
                    raise CheckpointError(f"{self.store.url_of(name, file)}: {size} bytes "
                                          f"stored, {manifest[file][0]} written")  # fmt: skip
            missing = sorted(set(manifest) - set(listing[0]))
            if missing:
                raise CheckpointError(f"{self.store.url_of(name)}: written but not stored: "
                                      + ", ".join(missing))  # fmt: skip
            manifest = {f: list(manifest[f]) for f in sorted(manifest)}
            self.store.write_bytes(
                json.dumps({"files": manifest}, indent=1).encode(), name, COMMITTED
            )

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
        if STEP_DIR.match(where):
            return self.store, where
        root, _, name = where.rstrip("/").rpartition("/")
        if not STEP_DIR.match(name):
            raise CheckpointError(f"{where}: not a checkpoint directory (step_NNNNNNNNN)")
        return CheckpointStore(root or ".", self.config.retries), name

    def load(self, where: str, engine) -> dict:
        """Check checkpoint `where` against its COMMITTED manifest, load the engine's state and
        return the train state. Sizes are checked for every file up front; the sha256 of each
        model/optimizer file is checked as it is read for loading (one pass over the bytes)."""
        store, name = self._store_for(where)
        url = store.url_of(name)
        if not store.exists(name, COMMITTED):
            raise CheckpointError(f"{url}: not committed (no {COMMITTED}): refusing to load it")
        manifest = json.loads(store.read_bytes(name, COMMITTED))["files"]
        sizes = store.files(name)
        problems = []
        for file, (size, _) in sorted(manifest.items()):
            if file not in sizes:
                problems.append(f"{url}/{file}: listed in {COMMITTED} but missing")
            elif sizes[file] != size:
                problems.append(
                    f"{url}/{file}: {sizes[file]} bytes, {COMMITTED} says {size} (truncated?)"
                )
        if problems:  # every rank lists the same files, so all raise together
            raise CheckpointError("; ".join(problems))
        train_state = verified_json(store, name, "train_state.json", manifest)
        expected = model_optim_digests(manifest)
        try:
            engine.load(store, name, "model_optim", train_state=train_state, expected=expected)
        except CheckpointException as exc:  # DCP gathers every rank's failure
            raise CheckpointError("; ".join(dcp_failures(exc))) from exc
        return train_state


def model_optim_digests(manifest: dict) -> Digests:
    """COMMITTED's entries for the files under `model_optim/`, by name within it."""
    prefix = "model_optim/"
    return {f[len(prefix) :]: (size, digest) for f, (size, digest) in manifest.items()
            if f.startswith(prefix)}  # fmt: skip


def verified_json(store: Store, name: str, file: str, manifest: dict) -> Any:
    data = store.read_bytes(name, file)
    if file not in manifest or hashlib.sha256(data).hexdigest() != manifest[file][1]:
        raise CheckpointError(f"{store.url_of(name, file)}: sha256 differs from {COMMITTED}")
    return json.loads(data)


def dcp_failures(exc: Exception) -> list[str]:
    """The messages of the CheckpointErrors inside DCP's CheckpointException, else its text."""
    found = []
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            found.append(str(inner))
    return sorted(set(found)) or [str(exc)]


def local_path(store: Store, *parts: str) -> str:
    """Where an engine that writes only local files (DeepSpeed) saves: the checkpointer stages
    its saves to object storage in a node-local directory and uploads them."""
    if store.remote:
        raise ValueError(f"{store.url_of(*parts)}: this engine saves to local directories only")
    return store.path(*parts)


class _HashingStream(io.RawIOBase):
    """A write stream that passes bytes through and takes their sha256 on the way."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.inner.write(data)
        self.sha.update(data)
        size = memoryview(data).nbytes
        self.size += size
        return size

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self.inner.close()


def dcp_writer(store: Store, *parts: str):
    """A DCP writer of `store/parts`. Object storage: it streams each file to storage, taking
    its sha256 on the way (the checkpointer commits with those, no read-back); `.digests`
    holds them by file name (DCP writes a flat directory) after the save."""
    from torch.distributed.checkpoint import FileSystemWriter

    if not store.remote:
        writer = FileSystemWriter(store.path(*parts))
        writer.digests = {}
        return writer
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

    digests: Digests = {}

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hashing = _HashingStream(stream)
                yield hashing
            digests[os.path.basename(path)] = (hashing.size, hashing.sha.hexdigest())

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            if os.path.basename(path) in digests:
                digests[os.path.basename(new_path)] = digests.pop(os.path.basename(path))

    # sync_files: fsync means nothing to object storage (DCP would call os.sync() instead).
    # Each file streams its parts one after another: several files per rank, written by
    # parallel threads, give the upload its concurrency.
    writer = FsspecWriter(store.url_of(*parts), sync_files=False, thread_count=STREAM_FILES)
    hashing_fs = HashingFileSystem()
    hashing_fs.fs = writer.fs.fs
    writer.fs = hashing_fs
    writer.digests = digests
    return writer


# What DCP's `.metadata` pickle may name; anything else is refused before it can run.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, url: str):
        super().__init__(file)
        self.url = url

    def find_class(self, module: str, name: str):
        allowed = module in _METADATA_MODULES or (module, name) in _METADATA_NAMES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise CheckpointError(
                f"{self.url}: refusing to unpickle {module}.{name} (DCP metadata holds only "
                "torch.distributed.checkpoint types; a checkpoint must not run code)"
            )
        return super().find_class(module, name)


def dcp_reader(store: Store, *parts: str, expected: Digests):
    """A DCP reader of `store/parts` that checks each file against `expected` (COMMITTED's
    size and sha256) just before reading it, and unpickles `.metadata` through an allow-list.
    From object storage each file this rank reads is first fetched to node-local scratch with
    parallel ranged GETs, hashed on the way: every byte crosses the network once. Call
    `close()` after loading."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.futures import Future

    class VerifiedReader(FileSystemReader):
        def __init__(self):
            needed = sum(size for size, _ in expected.values())
            self.scratch = local_scratch(needed) if store.remote else None
            super().__init__(str(self.scratch) if self.scratch else store.path(*parts))
            self.verified: set[str] = set()

        def verify(self, name: str) -> None:
            if name not in self.verified:
                store.check_file(expected, *parts, name, copy_to=self.scratch)
                self.verified.add(name)

        def read_metadata(self, *args, **kwargs):
            self.verify(".metadata")
            with open(Path(self.path) / ".metadata", "rb") as handle:
                metadata = _MetadataUnpickler(handle, store.url_of(*parts, ".metadata")).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            # File by file: the next files are fetched and hashed while this one is read.
            by_file: dict[str, list] = {}
            for item in plan.items:
                by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                    item
                )
            with ThreadPoolExecutor(2) as pool:
                ready = {name: pool.submit(self.verify, name) for name in sorted(by_file)}
                for name, verified in ready.items():
                    verified.result()
                    super().read_data(LoadPlan(by_file[name]), planner).wait()
            done: Future = Future()
            done.set_result(None)
            return done

        def close(self) -> None:
            if self.scratch:
                remove_scratch(self.scratch)

    return VerifiedReader()


def local_scratch(needed: int = 0) -> Path:
    """A fresh node-local directory for DeepSpeed's files and staged uploads: in host memory
    (/dev/shm) when it has room for twice `needed` bytes — no disk writeback then competes
    with training — else under TMPDIR."""
    base = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))
    memory = Path("/dev/shm")
    if needed and memory.is_dir():
        _remove_orphans(memory)
        if shutil.disk_usage(memory).free > 2 * needed:
            base = memory
    return Path(tempfile.mkdtemp(prefix=f"esmdist-ckpt-{os.getpid()}-", dir=base))


def _remove_orphans(base: Path) -> None:
    """Delete staging directories of processes that no longer run (killed mid-upload): in
    /dev/shm they would hold host memory until the node reboots."""
    for folder in base.glob("esmdist-ckpt-*-*"):
        try:
            os.kill(int(folder.name.split("-")[2]), 0)
        except ProcessLookupError:
            remove_scratch(folder)
        except (ValueError, PermissionError):
            continue


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def consolidated_weights(where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(ModelConfig, full fp32 state dict) of a committed checkpoint directory, local or
    s3://…, whatever engine and world size wrote it — for `esmdist export` and evaluation.
    Reads without executing pickled code for DCP checkpoints; DeepSpeed's own files are pickles
    (DeepSpeed loads them with `weights_only=False`), so they are checked against COMMITTED's
    sha256 first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from esmdist.model import ESM

    root, _, name = where.rstrip("/").rpartition("/")
    store = CheckpointStore(root or ".")
    url = store.url_of(name)
    if not STEP_DIR.match(name) or not store.exists(name, COMMITTED):
        raise CheckpointError(f"{url}: not a committed esmdist checkpoint (no {COMMITTED})")
    manifest = json.loads(store.read_bytes(name, COMMITTED))["files"]
    expected = model_optim_digests(manifest)
    from esmdist.config import ModelSpec, build_section

    job = verified_json(store, name, "config.json", manifest)
    model_config = build_section(ModelSpec, job["model"], "model.").build()
    train_state = verified_json(store, name, "train_state.json", manifest)
    if train_state["backend"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from esmdist.parallel.engine import DEEPSPEED_TAG

        scratch = local_scratch()
        try:
            store.download_dir(scratch, name, "model_optim", expected=expected)
            state = get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag=DEEPSPEED_TAG)
        finally:
            remove_scratch(scratch)
        model = ESM(model_config)
        full = model.state_dict()
        missing = sorted(set(full) - set(state))
        # The frozen contact regression is not an optimizer parameter: keep its saved buffer
        # values when DeepSpeed leaves it out.
        state = {
            **{k: full[k] for k in missing},
            **{k: v.float() for k, v in state.items() if k in full},
        }
        return model_config, state
    model = ESM(model_config)
    wanted = {"model": model.state_dict()}
    reader = dcp_reader(store, name, "model_optim", expected=expected)
    try:
        dcp.load(wanted, storage_reader=reader,
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)  # fmt: skip
    except CheckpointException as exc:
        raise CheckpointError("; ".join(dcp_failures(exc))) from exc
    finally:
        reader.close()
    return model_config, {k: v.float() for k, v in wanted["model"].items()}

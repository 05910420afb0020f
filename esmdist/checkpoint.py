"""Checkpoints in a local directory or object storage, committed atomically, resumed exactly.

Layout of one checkpoint, `ROOT/step_000001000/`:
- `model_optim/`  the model and optimizer, sharded per rank: torch DCP for single/DDP/FSDP2
  (reshardable to another world size), DeepSpeed's own files for ZeRO;
- `train_state.json`  step, tokens seen, LR schedule, every rank's data-loader state, RNG
  states, wandb run id, world size, backend;
- `config.json`  the resolved run config; `version.json`  esmdist version and git commit;
- `COMMITTED`  written last, by rank 0, after every rank finished: the size and sha256 of every
  file above. A directory without it is never loaded; `latest` is the newest committed step,
  found by listing (no mutable pointer that could be torn). Loading checks every file against
  COMMITTED, so a truncated or corrupted file is named instead of silently loaded.

Object storage: `s3://bucket/prefix` through fsspec/s3fs; endpoint, region and credentials come
only from the standard AWS environment/config. Transient errors are retried with exponential
backoff and jitter; a persistent one fails the save loudly, and the previous checkpoint stays
the latest committed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

COMMITTED = "COMMITTED"
STEP_DIR = re.compile(r"^step_(\d{9})$")
T = TypeVar("T")


class CheckpointError(RuntimeError):
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
    """Object storage: stage shards on node-local disk and upload while training goes on."""


def step_name(step: int) -> str:
    return f"step_{step:09d}"


class Store:
    """The checkpoint root through fsspec, every operation retried with backoff and jitter."""

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
            except (FileNotFoundError, PermissionError):
                raise
            except OSError as exc:
                if attempt == self.retries:
                    raise CheckpointError(
                        f"{what}: failed after {attempt} attempts ({type(exc).__name__}: {exc})"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 30.0)
                self.fs.invalidate_cache()
        raise AssertionError("unreachable")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)
        if not self.remote:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.retry(f"writing {self.url_of(*parts)}", lambda: self.fs.pipe_file(path, data))

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

    def sha256(self, *parts: str) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            with self.fs.open(self.path(*parts), "rb", block_size=8 << 20) as handle:
                while chunk := handle.read(8 << 20):
                    h.update(chunk)
            return h.hexdigest()

        return self.retry(f"reading {self.url_of(*parts)}", digest)

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

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        self.retry(f"deleting {self.url_of(*parts)}", lambda: self.fs.rm(path, recursive=True))

    def upload_dir(self, local: Path, *parts: str) -> None:
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            target = self.path(*parts, str(file.relative_to(local)))
            if not self.remote:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            self.retry(f"uploading {target}", lambda f=file, t=target: self.fs.put_file(str(f), t))

    def download_dir(self, local: Path, *parts: str) -> None:
        for name in self.files(*parts):
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.path(*parts, name)
            self.retry(
                f"downloading {source}", lambda s=source, t=target: self.fs.get_file(s, str(t))
            )


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
    """Uploads one rank's staged shards; remembers the error instead of dying silently."""

    def __init__(self, store: Store, scratch: Path, name: str):
        super().__init__(name=f"upload-{name}", daemon=True)
        self.store, self.scratch, self.target = store, scratch, name
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.store.upload_dir(self.scratch / "model_optim", self.target, "model_optim")
        except Exception as exc:
            self.error = exc
        finally:
            remove_scratch(self.scratch)


class Checkpointer:
    """Saves, commits, prunes and finds checkpoints for one run (every rank holds one)."""

    def __init__(self, config: CheckpointConfig, root: str):
        self.config = config
        self.store = Store(root, config.retries)
        self.pending: tuple[str, _Upload] | None = None

    # ---------------------------------------------------------------------- saving
    def save(
        self, step: int, engine, train_state: dict, job_config: dict, background: bool = False
    ) -> None:
        """Write checkpoint `step` from every rank, then commit it (rank 0) and prune.

        `background` (object storage only): every rank writes its shards to node-local scratch
        — the only pause in training — and uploads them in a thread; the checkpoint is
        committed by the next `save` or `wait`, which first waits for the upload. A crash in
        between leaves it uncommitted, and the previous one stays the latest."""
        self.wait()
        rank, _ = _rank_world()
        name = step_name(step)
        if rank == 0 and self.store.exists(name):
            self.store.remove(name)  # an uncommitted leftover of a killed save
        _barrier()
        if background and self.store.remote:
            scratch = local_scratch()
            engine.save(Store(str(scratch)), "model_optim")
            upload = _Upload(self.store, scratch, name)
            upload.start()
            self.pending = (name, upload)
        else:
            engine.save(self.store, name, "model_optim")
        if rank == 0:
            for file, data in (
                ("train_state.json", json.dumps(train_state, indent=1)),
                ("config.json", json.dumps(job_config, indent=1, default=list)),
                ("version.json", json.dumps(version_info(), indent=1)),
            ):
                self.store.write_bytes(data.encode(), name, file)
        if self.pending is None:
            self._finish(name)

    def wait(self) -> None:
        """Finish (upload, commit, prune) the background save in flight, if any."""
        if self.pending is None:
            return
        name, upload = self.pending
        self.pending = None
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
        self._finish(name)

    def _finish(self, name: str) -> None:
        rank, world = _rank_world()
        _barrier()
        self._commit(name, rank, world)
        _barrier()
        if rank == 0:
            self.prune()

    def _commit(self, name: str, rank: int, world: int) -> None:
        # Every rank hashes its share of the files; rank 0 writes the marker with all of them.
        listing = [self.store.files(name) if rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(listing, src=0)
        files = sorted(listing[0].items())
        mine = {f: (size, self.store.sha256(name, f)) for i, (f, size) in enumerate(files)
                if i % world == rank}  # fmt: skip
        gathered = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if rank == 0:
            manifest = {f: list(v) for part in gathered for f, v in sorted(part.items())}
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

    def _store_for(self, where: str) -> tuple[Store, str]:
        if STEP_DIR.match(where):
            return self.store, where
        root, _, name = where.rstrip("/").rpartition("/")
        if not STEP_DIR.match(name):
            raise CheckpointError(f"{where}: not a checkpoint directory (step_NNNNNNNNN)")
        return Store(root or ".", self.config.retries), name

    def load(self, where: str, engine) -> dict:
        """Verify checkpoint `where` against its COMMITTED manifest, load the engine's state and
        return the train state."""
        store, name = self._store_for(where)
        url = store.url_of(name)
        if not store.exists(name, COMMITTED):
            raise CheckpointError(f"{url}: not committed (no {COMMITTED}): refusing to load it")
        manifest = json.loads(store.read_bytes(name, COMMITTED))["files"]
        rank, world = _rank_world()
        sizes = store.files(name)
        problems = []
        for index, (file, (size, digest)) in enumerate(sorted(manifest.items())):
            if file not in sizes:
                problems.append(f"{url}/{file}: listed in {COMMITTED} but missing")
            elif sizes[file] != size:
                problems.append(
                    f"{url}/{file}: {sizes[file]} bytes, {COMMITTED} says {size} (truncated?)"
                )
            elif index % world == rank and store.sha256(name, file) != digest:
                problems.append(f"{url}/{file}: sha256 differs from {COMMITTED} (corrupted)")
        # Every rank checks a share of the files; all must agree before any enters the
        # collective load, or the ranks whose share was fine would wait forever.
        if dist.is_initialized():
            gathered = [None] * world
            dist.all_gather_object(gathered, problems)
            problems = sorted({p for part in gathered for p in part})
        if problems:
            raise CheckpointError("; ".join(problems))
        train_state = json.loads(store.read_bytes(name, "train_state.json"))
        engine.load(store, name, "model_optim", train_state=train_state)
        return train_state


def dcp_writer(store: Store, *parts: str):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    if store.remote:
        return FsspecWriter(store.url_of(*parts))
    return FileSystemWriter(store.path(*parts))


def dcp_reader(store: Store, *parts: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    if store.remote:
        return FsspecReader(store.url_of(*parts))
    return FileSystemReader(store.path(*parts))


def local_scratch() -> Path:
    """A fresh node-local directory: DeepSpeed's files and background uploads are staged here."""
    base = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix="esmdist-ckpt-", dir=base))


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
    store = Store(root or ".")
    url = store.url_of(name)
    if not STEP_DIR.match(name) or not store.exists(name, COMMITTED):
        raise CheckpointError(f"{url}: not a committed esmdist checkpoint (no {COMMITTED})")
    manifest = json.loads(store.read_bytes(name, COMMITTED))["files"]
    for file, (_, digest) in sorted(manifest.items()):
        if store.sha256(name, file) != digest:
            raise CheckpointError(f"{url}/{file}: sha256 differs from {COMMITTED} (corrupted)")
    from esmdist.config import ModelSpec, build_section

    job = json.loads(store.read_bytes(name, "config.json"))
    model_config = build_section(ModelSpec, job["model"], "model.").build()
    train_state = json.loads(store.read_bytes(name, "train_state.json"))
    if train_state["backend"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from esmdist.parallel.engine import DEEPSPEED_TAG

        scratch = local_scratch()
        try:
            store.download_dir(scratch, name, "model_optim")
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
    dcp.load(wanted, storage_reader=dcp_reader(store, name, "model_optim"),
             planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)  # fmt: skip
    return model_config, {k: v.float() for k, v in wanted["model"].items()}

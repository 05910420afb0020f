"""torch.distributed.checkpoint (DCP) files in a local directory or object storage, written
hashed on the way and read back verified, without executing anything the files contain.

DCP stores pickles in two places, and both are read here without running code:
- `.metadata` is one pickle of DCP's own types: it is unpickled through an allow-list of exact
  (module, name) pairs — never "anything from this module" (a module's globals include
  `os`, and protocol 4 resolves dotted names through them);
- each non-tensor value (an optimizer's learning rate, its betas) is a `torch.save` blob inside
  a `.distcp` file, which DCP's default planner reads with `weights_only=False`: the planner here
  reads them with `weights_only=True` (tensors, numbers, strings, containers only).
Loads also refuse checkpoint entries the caller did not ask for: a checkpoint of a larger model
does not load "partially" into a smaller one.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner

from esmdist.checkpoint.manifest import COMMITTED, CheckpointError, safe_relative
from esmdist.checkpoint.scratch import local_scratch, remove_scratch
from esmdist.model.convert import weights_only_refusal
from esmdist.storage import Digests, HashingStream, Store

STREAM_FILES = 8
_DCP_FILE = re.compile(r"^[A-Za-z0-9_.-]+$")

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
}
METADATA_GLOBALS = frozenset(
    _METADATA_CLASSES
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
)
"""Everything DCP's `.metadata` pickle may name: its metadata classes, dtypes, torch.Size,
layouts (by name), paths. Exact pairs; anything else is refused before it can run."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, url: str):
        super().__init__(file)
        self.url = url

    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise CheckpointError(
                f"{self.url}: refusing to unpickle {module}.{name} (DCP metadata holds only "
                "DCP's own types; a checkpoint must not run code)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.url}: refusing a persistent id in DCP metadata")


def read_metadata_pickle(path: Path | str, url: str):
    """DCP metadata from `.metadata`, through the allow-list; every storage file it names must be
    a plain file name in the same directory."""
    with open(path, "rb") as handle:
        try:
            metadata = _MetadataUnpickler(handle, url).load()
        except CheckpointError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise CheckpointError(f"{url}: unreadable DCP metadata ({exc})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{url}: holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        file = getattr(info, "relative_path", None)
        if not isinstance(file, str) or not _DCP_FILE.match(file) or file in (".", ".."):
            raise CheckpointError(f"{url}: names the storage file {file!r}, not a plain file name")
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that byte entries are read with `weights_only=True`
    and the checkpoint may hold no entry the caller did not ask for (unless its name starts
    with one of `ignored`, e.g. the optimizer's when only the model is wanted)."""

    def __init__(self, url: str, ignored: tuple[str, ...] = ()):
        super().__init__(allow_partial_load=bool(ignored))
        self.url, self.ignored = url, ignored

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        stored = set(metadata.state_dict_metadata)
        unexpected = sorted(k for k in stored - set(self.state_dict)
                            if not k.startswith(self.ignored))  # fmt: skip
        missing = sorted(set(self.state_dict) - stored)
        if unexpected or missing:
            described = [f"{len(unexpected)} entr(ies) this run does not have"
                         + (f" (e.g. {', '.join(unexpected[:3])})" if unexpected else ""),
                         f"{len(missing)} missing" + (f" (e.g. {', '.join(missing[:3])})"
                                                      if missing else "")]  # fmt: skip
            raise CheckpointError(
                f"{self.url}: the checkpoint's state does not match this model and optimizer: "
                + "; ".join(described)
            )

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{self.url}: refusing to unpickle the stored value {fqn} ({weights_only_refusal(exc)}; "
                "a checkpoint must not run code)"
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def dcp_failures(exc: Exception, where: str = "") -> list[str]:
    """The failures inside DCP's CheckpointException (one per failed rank), ours by their
    message (they name their file) and others with their type after `where`, without DCP's
    tracebacks; else the exception's text."""
    found = []
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            found.append(str(inner))
        elif isinstance(inner, BaseException):
            found.append(f"{where}{type(inner).__name__}: {inner}")
    return sorted(set(found)) or [f"{where}{exc}"]


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
                hashing = HashingStream(stream, "w")
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


def dcp_reader(store, *parts: str, expected: Digests):
    """A DCP reader of `store/parts` (a CheckpointStore) that checks each file against
    `expected` (COMMITTED's size and sha256) just before reading it, and reads `.metadata`
    through the allow-list. From object storage each file this rank reads is first fetched to
    node-local scratch with parallel ranged GETs, hashed on the way: every byte crosses the
    network once. Call `close()` after loading."""
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
                safe_relative(name, store.url_of(*parts))
                store.check_file(expected, *parts, name, copy_to=self.scratch)
                self.verified.add(name)

        def read_metadata(self, *args, **kwargs):
            if ".metadata" not in expected:
                raise CheckpointError(
                    f"{store.url_of(*parts)}: no DCP .metadata listed in {COMMITTED} (a DeepSpeed "
                    "checkpoint, or not a checkpoint of this engine)"
                )
            self.verify(".metadata")
            metadata = read_metadata_pickle(Path(self.path) / ".metadata",
                                            store.url_of(*parts, ".metadata"))  # fmt: skip
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


def read_dcp_entries(store, *parts: str, expected: Digests) -> dict[str, tuple[tuple, torch.dtype]]:
    """The (shape, dtype) of every tensor stored, by key, from the verified `.metadata` alone
    (no tensor data is read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp_reader(store, *parts, expected=expected)
    try:
        metadata = reader.read_metadata()
    finally:
        reader.close()
    return {key: (tuple(entry.size), entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)}  # fmt: skip


def read_dcp_shapes(store, *parts: str, expected: Digests, prefix: str) -> dict[str, tuple]:
    """The shape of every tensor stored under the key `prefix…`, by the rest of its key."""
    entries = read_dcp_entries(store, *parts, expected=expected)
    return {key[len(prefix) :]: shape for key, (shape, _) in entries.items()
            if key.startswith(prefix)}  # fmt: skip


def load_dcp(state: dict, store, *parts: str, expected: Digests, ignored=(), no_dist=False):
    """Fill `state` from the DCP checkpoint at `store/parts`, verified file by file, with the
    safe planner; DCP's gathered failures come out as one CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = dcp_reader(store, *parts, expected=expected)
    planner = SafeLoadPlanner(store.url_of(*parts), ignored)
    # A forged .metadata that names entries its files do not hold, offsets past them or
    # shapes that contradict them fails inside DCP with errors that name no file.
    where = f"{store.url_of(*parts)}: its DCP metadata does not describe the stored tensors: "
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as exc:  # DCP gathers every rank's failure
        raise CheckpointError("; ".join(dcp_failures(exc, where))) from exc
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, EOFError) as exc:
        raise CheckpointError(f"{where}{type(exc).__name__}: {exc}") from None
    finally:
        reader.close()

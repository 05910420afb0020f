"""The training stream: sharded split → ordered samples per reader slot → crop → pack → mask.

Shards are read with webdataset's own tar iteration (local paths, `s3://` through fsspec,
`pipe:` URLs). A shard listed in a dataset's `shards.parquet` is checked as it is read — its
sample count, size and sha256 (taken on the way, no second pass) against that table — and
every sample's content against the format (`>id` / sequence line pairs, residues of the ESM
alphabet): a changed, truncated or foreign shard is an error naming it (and the sample), never
trained on. Which samples a (rank, dataloader worker) reads, and when, is the pure function
of `esmdist.data.order`; every random draw (cluster member, crop window, masking) is seeded by
where it happens in that order (seed, epoch, shard or position), never by time or pid. The
state to resume from is a handful of integers per slot (`DataState`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from esmdist import alphabet
from esmdist.data.batch import MaskingConfig, PackedBatch, crop, pack, with_specials
from esmdist.data.format import (
    MANIFEST,
    SHARD_TABLE,
    SUPPORTED_FORMATS,
    check_shard_row,
    read_parquet,
)
from esmdist.data.order import EpochOrder, OrderState, count, rng, take
from esmdist.ranges import bounded, check_fields
from esmdist.storage import HashingStream, StorageError, Store

_RESIDUES = alphabet.RESIDUE_SYMBOLS.encode()


class DataError(RuntimeError):
    """Unreadable or inconsistent shards; the message names the shard."""


@dataclass(frozen=True)
class DataConfig(MaskingConfig):
    """How a split is streamed into packed micro-batches (and masked: `MaskingConfig`'s fields)."""

    path: str = ""
    """A sharded directory (local or s3://) written by `esmdist shard`, or webdataset shard
    URLs separated by `::` (`s3://…`, `pipe:…`, brace ranges) used as the train split."""
    max_tokens: int | Literal["auto"] = bounded(16384, 3, 2**24)
    """Token budget of one packed micro-batch (<cls>/<eos> included). "auto": the largest that
    fits the GPU, chosen at launch (esmdist.plan.auto_micro_batch), with activation
    recomputation turned on only if it must be; on a CPU, 16,384 or the step's share."""
    crop_length: int = bounded(1024, 3, 2**20)
    """Longest sequence fed to the model, in tokens: longer ones get a random window."""
    num_workers: int = bounded(2, 0, 256)
    """DataLoader worker processes per rank (0: read in the training process)."""
    seed: int = bounded(0, 0, 2**63 - 1)
    valid_split: str = "valid"
    valid_seed: int = bounded(12345, 0, 2**63 - 1)
    """Masking seed of the validation stream: the same masks every evaluation and run."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.max_tokens != "auto" and self.max_tokens < self.crop_length:
            raise ValueError(
                f"data.max_tokens ({self.max_tokens}) must be at least data.crop_length "
                f"({self.crop_length}) so that every sequence fits a micro-batch"
            )
        super().__post_init__()


# ------------------------------------------------------------------------------- shards


def _register_s3() -> None:
    """Let webdataset open s3:// URLs through fsspec/s3fs (credentials from the AWS env)."""
    import importlib

    # `webdataset.gopen` is also the name of a function the package re-exports: import the
    # module itself.
    gopen = importlib.import_module("webdataset.gopen")
    if "s3" not in gopen.gopen_schemes:

        def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
            import fsspec

            return fsspec.open(url, mode).open()

        gopen.gopen_schemes["s3"] = open_s3


@dataclass(frozen=True)
class ShardCheck:
    """What a shard must hold, from `shards.parquet`."""

    samples: int
    bytes: int | None = None
    sha256: str | None = None


@dataclass
class ShardSet:
    """The shards of one split, their sample counts, and what each is checked against as it is
    read (from a sharded directory: also its size and sha256)."""

    urls: list[str]
    sizes: list[int]
    split: str
    checks: list[ShardCheck]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def fingerprint(self) -> str:
        """A digest of the split's content — shard names, sample counts and sha256s — that a
        resumed run compares with its checkpoint's: the same data wherever it is stored."""
        rows = [[url.rsplit("/", 1)[-1], check.samples, check.sha256]
                for url, check in zip(self.urls, self.checks, strict=True)]  # fmt: skip
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    @classmethod
    def from_directory(cls, path: str, split: str) -> ShardSet:
        store = Store(path)
        base = path.rstrip("/")
        try:
            manifest = json.loads(store.retry(f"reading {base}/{MANIFEST}",
                                              lambda: store.fs.cat_file(store.path(MANIFEST))))  # fmt: skip
        except StorageError as exc:
            raise DataError(str(exc)) from None
        except FileNotFoundError:
            raise DataError(
                f"{path}: no {MANIFEST} — not a sharded dataset, or its sharding has not "
                "finished (run or rerun `esmdist shard`)"
            ) from None
        except PermissionError as exc:
            raise DataError(f"{base}/{MANIFEST}: access denied ({exc}); check the credentials "
                            "and endpoint (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                            "AWS_ENDPOINT_URL)") from None  # fmt: skip
        except ValueError as exc:
            raise DataError(f"{base}/{MANIFEST}: not valid JSON ({exc})") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version not in SUPPORTED_FORMATS:
            raise DataError(
                f"{path}: shard format version {version} is not supported (this esmdist reads "
                f"versions {SUPPORTED_FORMATS})"
            )
        try:
            data = store.retry(f"reading {base}/{SHARD_TABLE}",
                               lambda: store.fs.cat_file(store.path(SHARD_TABLE)))  # fmt: skip
            rows = [r for r in read_parquet(data).to_pylist() if r.get("split") == split]
        except StorageError as exc:
            raise DataError(str(exc)) from None
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{base}/{SHARD_TABLE}: unreadable ({exc})") from None
        try:
            for row in rows:
                check_shard_row(row, split, f"{base}/{SHARD_TABLE}")
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if not rows:
            raise DataError(f"{path}: the split {split!r} has no shards")
        return cls([f"{base}/{r['name']}" for r in rows], [r["samples"] for r in rows], split,
                   [ShardCheck(r["samples"], r["bytes"], r["sha256"]) for r in rows])  # fmt: skip

    @classmethod
    def from_urls(cls, urls: list[str], split: str = "train") -> ShardSet:
        """Shards given as webdataset URLs (local paths, `s3://…`, `pipe:COMMAND`, with brace
        ranges like `train-{000000..000041}.tar`). Without a manifest the sample counts the
        order needs are unknown, so every shard is read once here to count them (and the
        content checks are all there is: no size or sha256 to compare with)."""
        import braceexpand

        expanded = [u for url in urls for u in braceexpand.braceexpand(url)]
        if not expanded:
            raise DataError("no shard URLs given")
        sizes = [len(read_shard(u)) for u in expanded]
        return cls(expanded, sizes, split, [ShardCheck(size) for size in sizes])

    @classmethod
    def open(cls, path: str, split: str) -> ShardSet:
        """A sharded directory (with manifest.json), or one or more webdataset URLs separated
        by `::` (the URLs are then the split)."""
        urls = [u.strip() for u in path.split("::") if u.strip()]
        if len(urls) == 1 and not urls[0].startswith("pipe:") and not urls[0].endswith(".tar"):
            return cls.from_directory(urls[0], split)
        return cls.from_urls(urls, split)

    def read(self, shard: int) -> list[tuple[list[str], list[str]]]:
        return read_shard(self.urls[shard], self.checks[shard])


def _sample_members(url: str, key: str, text: bytes) -> tuple[list[str], list[str]]:
    """(ids, sequences) of one sample's `.fasta` member, checked against the format."""
    lines = text.split(b"\n")
    if len(lines) < 3 or lines[-1] != b"" or len(lines) % 2 == 0:
        raise DataError(f"{url}: sample {key}: not '>id' and sequence line pairs")
    headers, sequences = lines[0:-1:2], lines[1:-1:2]
    for header, sequence in zip(headers, sequences, strict=True):
        if len(header) < 2 or header[:1] != b">" or not header.isascii():
            raise DataError(f"{url}: sample {key}: bad header line {header[:60]!r}")
        bad = sequence.translate(None, _RESIDUES)
        if bad or not sequence:
            what = f"residue {bad[:1].decode('latin-1')!r} outside the ESM alphabet" if bad \
                else "an empty sequence"  # fmt: skip
            raise DataError(f"{url}: sample {key} ({header[1:41].decode()}): {what} — the shard "
                            "is damaged or was not written by esmdist shard")  # fmt: skip
    return [h[1:].decode() for h in headers], [q.decode() for q in sequences]


def read_shard(url: str, check: ShardCheck | None = None) -> list[tuple[list[str], list[str]]]:
    """(ids, sequences) of every sample of a shard, in tar order; with `check`, the shard's
    sample count, size and sha256 must match it."""
    import webdataset as wds

    if url.startswith("s3://"):
        _register_s3()
    samples = []
    try:
        stream = HashingStream(wds.gopen(url, "rb"), "r")
        with stream:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}],
                                                       handler=wds.reraise_exception)  # fmt: skip
            for sample in wds.tariterators.group_by_keys(files, handler=wds.reraise_exception):
                text = sample.get("fasta")
                if text is None:
                    raise DataError(f"{url}: sample {sample['__key__']} has no .fasta member")
                samples.append(_sample_members(url, sample["__key__"], text))
            stream.drain()  # the end-of-archive blocks tar iteration leaves unread
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{url}: shard listed in the manifest is missing") from None
    except Exception as exc:
        raise DataError(f"{url}: unreadable shard ({type(exc).__name__}: {exc})") from None
    if check is None:
        return samples
    if len(samples) != check.samples:
        raise DataError(f"{url}: holds {len(samples)} samples but {SHARD_TABLE} lists "
                        f"{check.samples} (truncated or replaced shard?)")  # fmt: skip
    if check.bytes is not None and stream.size != check.bytes:
        raise DataError(f"{url}: {stream.size} bytes, {SHARD_TABLE} lists {check.bytes} "
                        "(truncated or replaced shard?)")  # fmt: skip
    if check.sha256 is not None and stream.sha.hexdigest() != check.sha256:
        raise DataError(f"{url}: sha256 differs from {SHARD_TABLE} (the shard was changed "
                        "after sharding)")  # fmt: skip
    return samples


# ------------------------------------------------------------------------- slot stream


@dataclass
class SlotBatch:
    """A batch and where its slot stands after it."""

    batch: PackedBatch
    slot: int
    epoch: int
    read: int

    def pin_memory(self) -> SlotBatch:
        return SlotBatch(self.batch.pin_memory(), self.slot, self.epoch, self.read)


def slot_sequences(
    shards: ShardSet, config: DataConfig, state: OrderState, slot: int, epochs: int | None
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(epoch, read count after this sample, global position, tokens) for a slot's samples.

    One cluster member per sample per epoch and the crop window are drawn from a generator
    seeded by (seed, epoch, shard): the same draws whichever slot reads the shard.
    """
    epoch, read = state.slots[slot]
    stop = None if epochs is None else epoch + epochs
    while stop is None or epoch < stop:
        order = EpochOrder(shards.sizes, state.seed, epoch)
        run = state.run(shards.total, slot, epoch)
        for start, end in take(run, read, count(run) - read):
            position = start
            for shard, indices in order.runs(start, end):
                samples = shards.read(shard)
                draws = rng(state.seed, epoch, 2, shard).random((2, shards.sizes[shard]))
                for index in indices:
                    sequences = samples[index][1]
                    member = sequences[int(draws[0][index] * len(sequences))]
                    residues = alphabet.encode_residues(member)
                    read += 1
                    yield (
                        epoch,
                        read,
                        position,
                        with_specials(crop(residues, config.crop_length, draws[1][index])),
                    )
                    position += 1
        epoch, read = epoch + 1, 0


def slot_batches(
    shards: ShardSet,
    config: DataConfig,
    state: OrderState,
    slot: int,
    epochs: int | None = None,
    mask_seed: int | None = None,
) -> Iterator[SlotBatch]:
    """Packed, masked batches of one slot. A batch holds whole sequences up to
    `config.max_tokens` tokens.

    Training (`mask_seed` None): masks drawn for the whole batch at once from (seed, epoch,
    position of its first sample) — a pure function of the order, so a resumed slot masks
    identically. Validation (`mask_seed` given): drawn per sequence from (mask seed, position),
    so the masks — and the perplexity — do not depend on batch size or world size."""
    pending: list[np.ndarray] = []
    draws: list[np.ndarray] = []
    size = 0
    first = (0, 0)
    last = (0, 0)

    def batch() -> SlotBatch:
        if mask_seed is None:
            numbers = rng(state.seed, 3, *first).random((3, size))
        else:
            numbers = np.concatenate(draws, axis=1)
        return SlotBatch(pack(pending, config, numbers), slot, *last)

    for epoch, read, position, tokens in slot_sequences(shards, config, state, slot, epochs):
        if pending and size + len(tokens) > config.max_tokens:
            yield batch()
            pending, draws, size = [], [], 0
        if not pending:
            first = (epoch, position)
        pending.append(tokens)
        if mask_seed is not None:
            draws.append(rng(mask_seed, 3, epoch, position).random((3, len(tokens))))
        size += len(tokens)
        last = (epoch, read)
    if pending:
        yield batch()


class _SlotDataset(IterableDataset):
    def __init__(self, shards, config, state, rank, workers, rotation, epochs, mask_seed):
        self.args = (shards, config, state, rank, workers, rotation, epochs, mask_seed)

    def __iter__(self) -> Iterator[SlotBatch]:
        shards, config, state, rank, workers, rotation, epochs, mask_seed = self.args
        info = get_worker_info()
        logical = ((info.id if info else 0) + rotation) % workers
        slot = rank * workers + logical
        yield from slot_batches(shards, config, state, slot, epochs, mask_seed)


def merge_rank_states(rank_states: list[dict]) -> dict:
    """One resume state for the whole job from every rank's `TrainLoader.state_dict()`:
    the global order state (each slot's progress from the rank that owns it) and each rank's
    next logical worker."""
    merged = OrderState.from_dict(rank_states[0]["order"])
    for state in rank_states:
        owned = OrderState.from_dict(state["order"]).slots
        first = state["rank"] * state["workers"]
        merged.slots[first : first + state["workers"]] = owned[first : first + state["workers"]]
    rotations = [s["rotation"] for s in sorted(rank_states, key=lambda s: s["rank"])]
    return {"order": merged.to_dict(), "rotations": rotations}


class TrainLoader:
    """Infinite packed batches for one rank, resumable to the exact next batch.

    `resume` is a `merge_rank_states` result: with the same world size and workers every slot
    continues exactly; with another topology the rest of each open epoch is redistributed
    (see esmdist.data.order). `pin_memory` (for a GPU) hands out batches in page-locked host
    memory, pinned by the DataLoader's own thread, so that their copies to the GPU do not make
    the training process wait."""

    def __init__(
        self,
        shards: ShardSet,
        config: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        resume: dict | None = None,
        pin_memory: bool = False,
    ):
        self.shards, self.config, self.pin_memory = shards, config, pin_memory
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, config.num_workers)
        slots = world_size * self.workers
        order = OrderState.fresh(config.seed, slots)
        self.rotation = 0
        if resume is not None:
            order = OrderState.from_dict(resume["order"])
            try:
                order.check(shards.total)
            except ValueError as exc:
                raise DataError(
                    f"{shards.urls[0].rsplit('/', 1)[0]}: the checkpoint's {exc}"
                ) from None
            if len(order.slots) == slots and len(resume["rotations"]) == world_size:
                self.rotation = resume["rotations"][rank]
            order = order.resized(shards.total, slots)
        self.order = order

    def __iter__(self) -> Iterator[PackedBatch]:
        dataset = _SlotDataset(self.shards, self.config, self.order, self.rank, self.workers,
                               self.rotation, None, None)  # fmt: skip
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.config.num_workers,
            prefetch_factor=4 if self.config.num_workers else None,
            pin_memory=self.pin_memory,
            multiprocessing_context="spawn" if self.config.num_workers else None,
        )
        batches = iter(loader)
        try:
            for item in batches:
                self.order.slots[item.slot] = (item.epoch, item.read)
                self.rotation = (item.slot - self.rank * self.workers + 1) % self.workers
                yield item.batch
        finally:
            del batches  # stop the worker processes now, not whenever the iterator is collected

    def state_dict(self) -> dict:
        """This rank's part of the resume state (merge all ranks' with merge_rank_states)."""
        return {"rank": self.rank, "workers": self.workers, "rotation": self.rotation,
                "order": self.order.to_dict()}  # fmt: skip


def validation_batches(
    shards: ShardSet, config: DataConfig, rank: int = 0, world_size: int = 1
) -> Iterator[PackedBatch]:
    """The validation split once, this rank's disjoint part of it, in-process, with masks from
    `config.valid_seed`: identical batches at every evaluation, in every run."""
    state = OrderState.fresh(config.valid_seed, world_size)
    for item in slot_batches(shards, config, state, rank, epochs=1, mask_seed=config.valid_seed):
        yield item.batch

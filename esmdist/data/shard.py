"""The offline sharder: FASTA (+ optional cluster membership) → webdataset tar shards, a parquet
shard table and sequence index, and `manifest.json` written last as the commit point.

The format is specified in `shards/README.md` (format version `FORMAT_VERSION`).

Stages (each parallel over processes, each resumable after a crash). Records move between
them as Arrow columns — blocks parsed as arrays, spills as Arrow IPC, grouping by Arrow/numpy
sorts, tar headers filled for all members at once — so that no stage runs Python per record
on regular input:
1. read — the main process decompresses each input (ISA-L) and cuts it into blocks of whole
   records; workers validate and parse them and spill every record to a partition chosen by a
   keyed hash of its id (and every membership row by the same hash of its member id).
2. join — only with `--clusters` or `--dedupe`, per id partition: duplicate-id checks, the
   membership join, the group key of each record (its cluster, or its sequence digest); records
   are spilled again, by a hash of the group key. Without them a record is its own group and
   its id partition is already its group partition: no second spill.
3. group — per group partition: samples (a cluster with its members, or one sequence), their
   split and their order, both from the keyed hash of (seed, group key); written as one run per
   split: the samples' texts back to back, their sizes and keys, their index rows.
4. shards — the runs are cut into shards of `--shard-size` bytes or `--shard-samples` samples;
   each shard's tar is assembled from the runs, hashed and written in parallel, under a
   temporary name, then renamed (local) or uploaded (object storage, where an object is
   visible only once complete).

Memory is bounded by one partition per worker; partitions are sized from the input size.
Bytes of every output depend only on the inputs and options: the order inside a partition
comes from hashes and provenance, never from which worker ran first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmdist.data.fasta import (
    BLOCK_BYTES,
    FastaError,
    InputFile,
    OnInvalid,
    ReadReport,
    changed_inputs,
    input_stat,
    parse_block,
    parse_block_table,
    record_blocks,
)
from esmdist.data.spill import SpillWriter, read_partition, remove_writer
from esmdist.process import exit_with_parent
from esmdist.storage import Store

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARD_TABLE = "shards.parquet"
PARTITION_TARGET_BYTES = 128 << 20
MAX_PARTITIONS = 512
# A tar member is a 512-byte header plus its data padded to 512 bytes.
TAR_BLOCK = 512
# Room in a shared block buffer beyond BLOCK_BYTES for the record cut off the previous block;
# a larger block (one record longer than that) travels pickled instead.
SLOT_SLACK = 1 << 20
WRITE_CHUNK = 16 << 20


class ShardError(RuntimeError):
    """The sharding run cannot continue; the message names the input and the fix."""


@dataclass(frozen=True)
class ShardOptions:
    inputs: tuple[str, ...]
    out: str
    clusters: str | None = None
    splits: tuple[tuple[str, float], ...] = (("valid", 0.005), ("test", 0.0))
    seed: int = 0
    min_length: int = 1
    max_length: int | None = None
    on_invalid: OnInvalid = "error"
    on_missing_member: Literal["error", "skip"] = "error"
    dedupe: bool = False
    shard_bytes: int | None = 256 << 20
    shard_samples: int | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("shard: at least one INPUT is required")
        if (self.shard_bytes is None) == (self.shard_samples is None):
            raise ValueError("shard: give exactly one of --shard-size and --shard-samples")
        if self.on_invalid not in ("error", "skip", "map-x"):
            raise ValueError(f"--on-invalid must be error, skip or map-x, not {self.on_invalid}")
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError("--max-length must not be below --min-length")
        if self.min_length < 0:
            raise ValueError(f"--min-length must not be negative, got {self.min_length}")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError(f"--shard-size must be positive, got {self.shard_bytes} bytes")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ValueError(f"--shard-samples must be at least 1, got {self.shard_samples}")
        repeated = sorted({p for p in self.inputs if self.inputs.count(p) > 1})
        if repeated:
            raise ValueError(f"shard: INPUT given more than once: {', '.join(repeated)}")
        if self.on_missing_member not in ("error", "skip"):
            raise ValueError(f"--on-missing-member must be error or skip, not "
                             f"{self.on_missing_member}")  # fmt: skip

    def identity(self) -> dict:
        """Everything the output bytes depend on, besides the input bytes (not where they go)."""
        options = asdict(self)
        del options["out"]
        # Through JSON, so that it compares equal to the copy read back from a manifest.
        return json.loads(json.dumps({"format_version": FORMAT_VERSION, **options}))


def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
    """`valid=0.005,test=0.0` → (("valid", 0.005), ("test", 0.0)); train takes the rest."""
    splits = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "train":
            raise ValueError(
                f"--split: {part!r} is not NAME=FRACTION with a lowercase name other than train"
            )
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"--split: {part!r}: {value!r} is not a number") from None
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"--split: {part!r}: the fraction must be in [0, 1)")
        splits.append((name, fraction))
    if sum(f for _, f in splits) >= 1.0:
        raise ValueError(
            "--split: held-out fractions must sum to less than 1 (train gets the rest)"
        )
    if len({n for n, _ in splits}) != len(splits):
        raise ValueError("--split: a split name is repeated")
    return tuple(splits)


def parse_size(text: str) -> int:
    """`256MB`, `1GiB`, `512k`, `1000` → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"--shard-size: cannot read {text!r}; write e.g. 256MB")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit or "_"))


# ------------------------------------------------------------------------------ hashing

# Spilled rows. `hi`/`lo`: the two 64-bit lanes of `key_hashes(seed, key)` — of the id in
# spill1 records, of the group key in spill2 — which give the partition (`lo % P`), the split
# and order (`hi`, `lo`) and the sample key (`hi` and the top 32 bits of `lo`).
# The read workers number records within their block (`block`, `record` counting from 1
# there), so that the main process only cuts blocks; `_numbered` turns that into the record
# number within the input once all blocks are counted.
NUMBERED = pa.schema([("id", pa.string()), ("sequence", pa.string()), ("input", pa.int16()),
                      ("record", pa.int64()), ("hi", pa.uint64()), ("lo", pa.uint64())])  # fmt: skip
RECORDS = NUMBERED.append(pa.field("block", pa.int32()))
GROUPED = NUMBERED.append(pa.field("group", pa.string()))
MEMBERS = pa.schema([("member", pa.string()), ("cluster", pa.string()), ("line", pa.int64()),
                     ("hi", pa.uint64()), ("lo", pa.uint64())])  # fmt: skip


# murmur3's 64-bit finaliser (a bijection in which each input bit flips about half the output
# bits) and an odd multiplier per lane (Weyl/golden-ratio constants).
_FMIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_LANE = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX[0]
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX[1]
    return h ^ (h >> np.uint64(33))


def key_hashes(seed: int, keys: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """`hi`, `lo`: two 64-bit lanes of a seeded hash of every key's UTF-8 bytes, as array
    operations (a C call per key, as with hashlib, cost ~0.6 µs: a third of the read stage).

    Per lane: h = fmix(fmix(seed ^ LANE) ^ length * LANE); then for each little-endian 8-byte
    word w of the key (the last one zero-padded), h = fmix((h ^ w) * LANE); fmix is murmur3's
    64-bit finaliser; arithmetic mod 2^64. Each step is a bijection of (h ^ w), so keys of one word never collide, and the
    lanes differ in seed and multiplier. Part of the shard format (version 2): tests pin it."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    keys = keys.cast(pa.large_binary())
    count = len(keys)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[
        keys.offset : keys.offset + count + 1
    ]
    data = keys.buffers()[2]
    data = (
        np.frombuffer(data, dtype=np.uint8)
        if data is not None and data.size
        else np.zeros(1, np.uint8)
    )
    lengths = np.diff(offsets)
    words = np.maximum(1, (lengths + 7) // 8)
    lanes = [np.empty(count, dtype=np.uint64), np.empty(count, dtype=np.uint64)]
    seeded = np.array([seed & (2**64 - 1)], dtype=np.uint64)
    for width in np.unique(words).tolist():  # keys of one word count at a time
        rows = np.flatnonzero(words == width)
        span = np.arange(8 * width)
        positions = np.minimum(offsets[rows, None] + span, len(data) - 1)
        raw = np.where(span < lengths[rows, None], data[positions], 0).astype(np.uint8)
        values = raw.view("<u8")  # [rows, width]
        for lane, out in zip(_LANE, lanes, strict=True):
            h = _fmix64(np.broadcast_to(_fmix64(seeded ^ lane), len(rows))
                        ^ (lengths[rows].astype(np.uint64) * lane))  # fmt: skip
            for word in range(width):
                h = _fmix64((h ^ values[:, word]) * lane)
            out[rows] = h
    return lanes[0], lanes[1]


def split_indices(high: np.ndarray, splits: tuple[tuple[str, float], ...]) -> np.ndarray:
    """The split of each group, as an index into `split_names` (0 = train): the first 8 bytes
    of its hash (`high`, big-endian uint64) as a uniform number in [0, 1) against the
    cumulative held-out fractions."""
    u = high.astype(np.float64) / 2.0**64
    edges, edge = [], 0.0
    for _, fraction in splits:
        edge += fraction
        edges.append(edge)
    held_out = np.searchsorted(np.array(edges), u, side="right")  # first edge above u
    return np.where(held_out < len(splits), held_out + 1, 0)


def split_names(splits: tuple[tuple[str, float], ...]) -> list[str]:
    return ["train", *(name for name, _ in splits)]


def sample_keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The 24 hex digits of each sample's key (the digest's first 96 bits): uint8 [n, 24]."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    raw = np.stack([hi, lo], axis=1).astype(">u8").view(np.uint8).reshape(-1, 16)[:, :12]
    keys = np.empty((len(raw), 24), dtype=np.uint8)
    keys[:, 0::2] = digits[raw >> 4]
    keys[:, 1::2] = digits[raw & 15]
    return keys


def _publish_bytes(store: Store, data: bytes, name: str, work: Path) -> None:
    staged = work / "tmp" / name.replace("/", "_")
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(data)
    store.publish(staged, name)


# ------------------------------------------------------------------------ stage 1: read


@dataclass
class _ReadTask:
    kind: Literal["fasta", "file", "members"]
    """A block of FASTA cut by the main process, a whole FASTA input the worker reads itself,
    or a block of the membership table."""
    input_index: int
    path: str
    block: bytes = b""
    number: int = 0
    """FASTA: the block's number within its input; members: the block's first line number."""
    leading: int = 0
    """Blank lines before the block (only ever before an input's first block)."""
    slot: int | None = None
    """Where the block is instead (`block` then empty): this shared buffer's first `size` bytes."""
    size: int = 0


def _stage1_worker(
    number: int,
    options: ShardOptions,
    partitions: int,
    spill_root: str,
    slots: list,
    tasks: mp.Queue,
    results: mp.Queue,
    parent: int,
) -> None:
    exit_with_parent(parent)  # a killed main process leaves no worker writing on
    records = SpillWriter(Path(spill_root) / "records", partitions, f"w{number}")
    members = SpillWriter(Path(spill_root) / "members", partitions, f"w{number}")

    def spill_block(task: _ReadTask, block: bytes, index: int, leading: int) -> tuple | None:
        """Parse and spill one FASTA block, numbering its records from 1; report and return its
        (leading, records, lines). None: a record is bad (the caller words the error with the
        true numbers)."""
        report, lengths = ReadReport(), Counter()
        try:
            table = parse_block_table(task.path, block, 1, 1, options.on_invalid,
                                      options.min_length, options.max_length, report)  # fmt: skip
        except FastaError:
            return None
        hi, lo = key_hashes(options.seed, table["id"])
        count = len(table)
        table = pa.table(
            [table["id"], table["sequence"],
             pa.array(np.full(count, task.input_index, dtype=np.int16)),
             table["record"], pa.array(hi), pa.array(lo),
             pa.array(np.full(count, index, dtype=np.int32))],
            schema=RECORDS,
        )  # fmt: skip
        records.add(lo % partitions, table)
        residues = pc.utf8_length(table["sequence"]).to_numpy()
        # frexp's exponent is the bit length of a positive integer
        bins, counts = np.unique(np.frexp(residues)[1], return_counts=True)
        lengths.update(dict(zip(bins.tolist(), counts.tolist(), strict=True)))
        counted = (leading, report.records + sum(report.skipped.values()), block.count(b"\n"))
        results.put(("block", ((task.input_index, index), counted, len(block), report, lengths,
                               task.slot)))  # fmt: skip
        return counted

    try:
        while (task := tasks.get()) is not None:
            if task.slot is not None:
                task.block = bytes(memoryview(slots[task.slot]).cast("B")[: task.size])
            if task.kind == "members":
                table, report = _membership_table(task.path, task.block, task.number)
                hi, lo = key_hashes(options.seed, table["member"])
                table = table.append_column("hi", pa.array(hi)).append_column("lo", pa.array(lo))
                members.add(lo % partitions, table)
                results.put(("block", (None, None, len(task.block), report, Counter(), None)))
            elif task.kind == "fasta":
                if spill_block(task, task.block, task.number, task.leading) is None:
                    results.put(("reparse", ((task.input_index, task.number), task.block,
                                             task.slot, task.leading)))  # fmt: skip
            else:  # a whole input: this worker decompresses and cuts it too
                record, line = 1, 1
                with InputFile(task.path) as handle:
                    for index, (block, leading) in enumerate(record_blocks(task.path, handle)):
                        line += leading
                        counted = spill_block(task, block, index, leading)
                        if counted is None:
                            message = _bad_block_message(options, task.path, block, record, line)
                            results.put(("bad", ((task.input_index, index), message)))
                            break
                        record, line = record + counted[1], line + counted[2]
                    else:
                        results.put(("input", (task.input_index, handle.identity())))
        records.close()
        members.close()
        results.put(("done", number))
    except (FastaError, ShardError) as exc:
        results.put(("error", str(exc)))
    except BaseException as exc:  # report anything, then let the parent stop
        results.put(("error", f"worker {number}: {type(exc).__name__}: {exc}"))


# Column names a membership table's first line may hold (lowercase, letters only): such a line
# is a header, skipped and counted, not a cluster named "cluster".
_HEADER_WORDS = frozenset({
    "cluster", "clusterid", "clustername", "rep", "repid", "representative", "representativeid",
    "centroid", "member", "memberid", "members", "query", "target", "seq", "seqid", "sequence",
    "sequenceid", "id", "protein", "proteinid", "entry", "accession",
})  # fmt: skip


def _is_header(line: str) -> bool:
    fields = line.split("\t")
    return len(fields) == 2 and all(
        re.sub("[^a-z]", "", field.lower()) in _HEADER_WORDS for field in fields
    )


def _membership_table(path: str, block: bytes, first_line: int) -> tuple[pa.Table, ReadReport]:
    """`cluster<TAB>member` lines of one block as (member, cluster, line), and what was skipped
    (a header line at the top of the table, counted as `cluster_table_header`); blank lines and
    CR line ends are allowed, anything else is an error naming the line."""
    lines = pa.array(block.split(b"\n"), pa.binary())
    numbers = pa.array(np.arange(first_line, first_line + len(lines), dtype=np.int64))
    try:
        text = pc.utf8_rtrim(lines.cast(pa.string()), "\r")
    except pa.ArrowInvalid:  # not UTF-8: the same rules, line by line, with replacement
        text = pa.array([line.decode("utf-8", "replace").rstrip("\r")
                         for line in lines.to_pylist()], pa.string())  # fmt: skip
    filled = pc.not_equal(text, "")
    text, numbers = text.filter(filled), numbers.filter(filled)
    report = ReadReport()
    if first_line == 1 and len(text) and _is_header(text[0].as_py()):
        report.skipped["cluster_table_header"] = 1
        text, numbers = text.slice(1), numbers.slice(1)
    fields = pc.split_pattern(text, "\t")
    well_formed = pc.equal(pc.list_value_length(fields), 2)
    if pc.all(well_formed).as_py():  # then both fields exist, and must not be empty
        well_formed = pc.and_(pc.not_equal(pc.list_element(fields, 0), ""),
                              pc.not_equal(pc.list_element(fields, 1), ""))  # fmt: skip
    if not pc.all(well_formed).as_py():
        bad = pc.index(well_formed, False).as_py()
        raise ShardError(
            f"{path}: line {numbers[bad].as_py()}: expected 'cluster<TAB>member' (MMseqs2 createtsv / "
            f"UniRef membership), got {text[bad].as_py().encode()[:80]!r}"
        )
    members = {"member": pc.list_element(fields, 1), "cluster": pc.list_element(fields, 0)}
    return pa.table({**members, "line": numbers}), report


class _BadBlock(Exception):
    """A read worker met a bad record: stop reading, then report the first one exactly."""


def _bad_block_message(options: ShardOptions, path: str, block: bytes, record: int,
                       line: int) -> str:  # fmt: skip
    """The error of a block a read worker could not parse (its records numbered from 1),
    worded by the per-record parser with the block's true first record and line."""
    try:
        for _ in parse_block(path, block, record, line, options.on_invalid, options.min_length,
                             options.max_length):  # fmt: skip
            pass
    except FastaError as exc:
        return str(exc)
    return f"{path}: record {record} (line {line}) and after: a read worker failed on this block"


def _in_input_order(records: pa.Table, rows: np.ndarray) -> np.ndarray:
    """`rows` of `records` sorted by (input, record number)."""
    inputs, numbers = records["input"].to_numpy()[rows], records["record"].to_numpy()[rows]
    return rows[np.lexsort((numbers, inputs))]


def _reads_whole_inputs(options: ShardOptions, workers: int) -> bool:
    """Whether each worker reads whole inputs (decompressing them itself) rather than parsing
    blocks the main process cuts. One process decompresses ~0.33 GB/s of gzip and a worker
    parses ~0.2 GB/s, so with three or more inputs and workers (UniParc ships ~200 part files)
    reading inputs in parallel wins; with fewer, one stream feeding every worker does."""
    return min(len(options.inputs), workers) >= 3


def _block_starts(counted: dict[tuple[int, int], tuple[int, int, int]]) -> dict:
    """(first record, first line) of each counted block within its input, from the blocks
    before it: (input, block) → (record, line)."""
    starts, record, line, previous = {}, 1, 1, None
    for (index, block), (leading, records, lines) in sorted(counted.items()):
        if index != previous:
            record, line, previous = 1, 1, index
        line += leading
        starts[index, block] = (record, line)
        record, line = record + records, line + lines
    return starts


def _numbered(records: pa.Table, work: Path) -> pa.Table:
    """Spilled records with their record number within their input (workers wrote it within
    their block)."""
    per_input = _json(work / "stage1.json")["block_first_record"]
    first_block = np.cumsum([0] + [len(starts) for starts in per_input])
    starts = np.array([start for starts in per_input for start in starts], dtype=np.int64)
    block = first_block[records["input"].to_numpy()] + records["block"].to_numpy()
    number = starts[block] + records["record"].to_numpy() - 1
    return records.set_column(3, "record", pa.array(number)).drop_columns(["block"])


def _membership_blocks(handle: InputFile) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, its first line number) of the open membership table."""
    pending, line = b"", 1
    while True:
        chunk = handle.read_decompressed(BLOCK_BYTES)
        data = pending + chunk
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        block, pending = data[:cut], data[cut:]
        if block:
            yield block, line
            line += block.count(b"\n")
        if not chunk:
            return


class _Progress:
    """One status line: sequences/s and MB/s of uncompressed input."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.monotonic()
        self.last = 0.0
        self.bytes = 0
        self.records = 0
        self.tty = sys.stderr.isatty()

    def update(self, nbytes: int = 0, records: int = 0, force: bool = False) -> None:
        self.bytes += nbytes
        self.records += records
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 15.0):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"{self.label}: {self.records:,} sequences, {self.bytes / 1e6:,.1f} MB "
            f"({self.records / elapsed:,.0f} seq/s, {self.bytes / 1e6 / elapsed:,.1f} MB/s)"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)

    def finish(self) -> float:
        self.update(force=True)
        if self.tty:
            print(file=sys.stderr)
        return time.monotonic() - self.start


def _stage1(options: ShardOptions, partitions: int, work: Path, workers: int) -> dict:
    spill = work / "spill1"
    shutil.rmtree(spill, ignore_errors=True)
    context = mp.get_context("spawn")
    tasks: mp.Queue = context.Queue(maxsize=2 * workers)
    results: mp.Queue = context.Queue()
    # Blocks cut by the main process travel in shared buffers, not pickled through the task
    # pipe: the read stage went from 1.3 to 1.15 s per 200 MB with one worker.
    whole_inputs = _reads_whole_inputs(options, workers)
    slots = [] if whole_inputs else [context.RawArray("B", BLOCK_BYTES + SLOT_SLACK)
                                     for _ in range(2 * workers + 2)]  # fmt: skip
    free = list(range(len(slots)))
    procs = [
        context.Process(
            target=_stage1_worker,
            args=(i, options, partitions, str(spill), slots, tasks, results, os.getpid()),
            daemon=True,
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    report, lengths = ReadReport(), Counter()
    progress = _Progress("read")
    finished = 0
    # Blocks are keyed (input, block within it); counted: (lines before, records, lines).
    counted: dict[tuple[int, int], tuple[int, int, int]] = {}
    unread: dict[tuple[int, int], bytes] = {}  # blocks with a bad record, to word the error
    bad: dict[tuple[int, int], str] = {}  # the same, already worded by a worker
    checksums: dict[int, dict] = {}

    def drain(wait: float) -> None:
        """Handle every result that arrives within `wait` seconds; fail on errors and deaths."""
        nonlocal finished
        while True:
            try:
                kind, value = results.get(timeout=wait)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise ShardError(
                        f"a read worker died (exit code {dead[0].exitcode}); rerun the same "
                        "command to resume"
                    ) from None
                return
            wait = 0.0
            if kind == "error":
                raise ShardError(value)
            if kind == "done":
                finished += 1
            elif kind == "input":
                checksums[value[0]] = value[1]
            elif kind == "bad":
                bad[value[0]] = value[1]
            elif kind == "reparse":
                block, data, slot, leading = value
                unread[block] = data
                free.extend([] if slot is None else [slot])
                counted.setdefault(block, (leading, 0, 0))  # its start is all that is needed
            else:
                block, counts, nbytes, block_report, block_lengths, slot = value
                free.extend([] if slot is None else [slot])
                if block is not None:
                    counted[block] = counts
                report.merge(block_report)
                lengths.update(block_lengths)
                progress.update(nbytes, block_report.records)

    def submit(task: _ReadTask | None) -> None:
        if task is not None and task.kind == "fasta" and len(task.block) <= len(slots[0]):
            while not free:
                drain(0.05)
            task.slot, task.size = free.pop(), len(task.block)
            memoryview(slots[task.slot]).cast("B")[: task.size] = task.block
            task.block = b""
        while True:
            drain(0.0)
            if (bad or unread) and task is not None:
                raise _BadBlock
            try:
                tasks.put(task, timeout=0.2)
                return
            except queue.Full:
                continue

    try:
        try:
            for index, path in enumerate(options.inputs):
                if whole_inputs:
                    submit(_ReadTask("file", index, path))
                    continue
                with InputFile(path) as handle:
                    for number, (block, leading) in enumerate(record_blocks(path, handle)):
                        submit(_ReadTask("fasta", index, path, block, number, leading))
                checksums[index] = handle.identity()
            if options.clusters:
                with InputFile(options.clusters) as handle:
                    for block, line in _membership_blocks(handle):
                        submit(_ReadTask("members", -1, options.clusters, block, line))
                checksums[-1] = handle.identity()
        except _BadBlock:
            pass
        for _ in procs:
            submit(None)
        while finished < workers:
            drain(0.2)
    finally:
        for proc in procs:
            if proc.is_alive() and finished < workers:
                proc.kill()
            proc.join()
    starts = _block_starts(counted)
    for block, data in unread.items():
        bad[block] = _bad_block_message(options, options.inputs[block[0]], data, *starts[block])
    if bad:  # the first bad block in input order among those read
        raise ShardError(bad[min(bad)])
    elapsed = progress.finish()
    if report.records == 0:
        raise ShardError(
            "no valid sequences in the inputs"
            + (f" (skipped: {dict(report.skipped)})" if report.skipped else "")
        )
    first_records = [[] for _ in options.inputs]
    for (index, _), (record, _) in sorted(starts.items()):
        first_records[index].append(record)
    return {
        "inputs": [checksums[index] for index in range(len(options.inputs))],
        "cluster_table": checksums.get(-1),
        "block_first_record": first_records,
        "read": report.to_dict(),
        "length_log2_histogram": {str(k): v for k, v in sorted(lengths.items())},
        "seconds": elapsed,
    }


# ------------------------------------------------------------------------ stage 2: join


def _grouped(options: ShardOptions) -> bool:
    """Whether samples group records by something other than their id (stage 2 runs)."""
    return bool(options.clusters) or options.dedupe


def _unique_ids(options: ShardOptions, records: pa.Table) -> tuple[pa.Table, Counter]:
    """`records` (one id partition) in the order of their id hash, each id once: a repeat with
    the same sequence is counted (`duplicate_record`), one with another sequence is an error
    naming both records, or counted (`duplicate_id`) with `--on-invalid skip`; the first in
    input order is kept."""
    hi, lo = records["hi"].to_numpy(), records["lo"].to_numpy()
    by_hash = np.lexsort((lo, hi))
    repeat = (hi[by_hash][1:] == hi[by_hash][:-1]) & (lo[by_hash][1:] == lo[by_hash][:-1])
    skipped: Counter = Counter()
    if repeat.any():
        # Rare: only rows whose id hash repeats are looked at one by one, in input order.
        rows = _in_input_order(records, np.union1d(by_hash[1:][repeat], by_hash[:-1][repeat]))
        ids = records["id"].take(pa.array(rows)).to_pylist()
        sequences = records["sequence"].take(pa.array(rows)).to_pylist()
        where = [f"{options.inputs[i]}: record {n}"
                 for i, n in zip(records["input"].to_numpy()[rows],
                                 records["record"].to_numpy()[rows], strict=True)]  # fmt: skip
        first: dict[str, int] = {}
        drop = np.zeros(len(records), dtype=bool)
        for k, row in enumerate(rows.tolist()):
            kept = first.setdefault(ids[k], k)
            if kept == k:
                continue
            drop[row] = True
            if sequences[kept] == sequences[k]:
                skipped["duplicate_record"] += 1
            elif options.on_invalid == "error":
                raise ShardError(
                    f"{where[k]}: id {ids[k]!r} repeats {where[kept]} with a different "
                    "sequence; ids must be unique (use --on-invalid skip to keep the first and "
                    "count the rest)"
                )
            else:
                skipped["duplicate_id"] += 1
        by_hash = by_hash[~drop[by_hash]]
    return records.take(pa.array(by_hash)), skipped


def _cluster_of(options: ShardOptions, members: pa.Table, records: pa.Table) -> pa.ChunkedArray:
    """The cluster of each record (null where the table has none), after checking that no
    member is in two clusters."""
    members = members.take(pc.sort_indices(members, [("member", "ascending"),
                                                      ("line", "ascending")]))  # fmt: skip
    names, clusters = members["member"], members["cluster"]
    count = len(members)
    first = np.ones(count, dtype=bool)
    if count > 1:
        first[1:] = pc.not_equal(names.slice(1), names.slice(0, count - 1)).to_numpy()
    run_start = np.flatnonzero(first)[np.cumsum(first) - 1]
    conflict = pc.not_equal(clusters, clusters.take(pa.array(run_start))).to_numpy()
    if conflict.any():
        lines = members["line"].to_numpy()
        bad = np.flatnonzero(conflict)[np.argmin(lines[conflict])]
        seen = int(run_start[bad])
        raise ShardError(
            f"{options.clusters}: member {names[bad].as_py()!r} is in cluster "
            f"{clusters[seen].as_py()!r} (line {lines[seen]}) and in {clusters[bad].as_py()!r} "
            f"(line {lines[bad]}); a member belongs to one cluster"
        )
    unique = members.filter(pa.array(first))
    index = pc.index_in(records["id"], value_set=unique["member"].combine_chunks())
    return unique["cluster"].take(index)


def _stage2_join(options: ShardOptions, partitions: int, work: str, part: int) -> dict:
    """Ids made unique, the group key of each record (its cluster, or its sequence digest with
    `--dedupe`), records spilled again by a hash of the group key."""
    work_path = Path(work)
    records = _numbered(read_partition(work_path / "spill1" / "records", part, RECORDS), work_path)
    records, skipped = _unique_ids(options, records)
    if options.clusters:
        members = read_partition(work_path / "spill1" / "members", part, MEMBERS)
        groups = _cluster_of(options, members, records)
        missing = groups.is_null().to_numpy(zero_copy_only=False)
        if missing.any():
            row = int(_in_input_order(records, np.flatnonzero(missing))[0])
            if options.on_missing_member == "error":
                raise ShardError(
                    f"{options.inputs[records['input'][row].as_py()]}: record "
                    f"{records['record'][row].as_py()}: sequence {records['id'][row].as_py()!r} "
                    f"is not in the cluster table {options.clusters} (use --on-missing-member "
                    "skip to leave it out)"
                )
            skipped["missing_from_clusters"] += int(missing.sum())
            keep = pa.array(~missing)
            records, groups = records.filter(keep), groups.filter(keep)
    else:
        groups = pa.array(
            ["seq:" + hashlib.blake2b(sequence, digest_size=16).hexdigest()
             for sequence in records["sequence"].cast(pa.binary()).to_pylist()],
            pa.string(),
        )  # fmt: skip
    hi, lo = key_hashes(options.seed, groups)
    records = records.set_column(4, "hi", pa.array(hi)).set_column(5, "lo", pa.array(lo))
    records = records.append_column("group", groups)
    out = SpillWriter(work_path / "spill2", partitions, f"j{part}")
    out.add(lo % partitions, records)
    out.close()
    return {"skipped": dict(skipped)}


# ----------------------------------------------------------------------- stage 3: group


def _member_header_template() -> np.ndarray:
    """tarfile's own ustar header for our members (mode 0444, mtime 0, root, regular file) with
    the name, size and checksum fields blanked."""
    info = tarfile.TarInfo("")
    info.mode, info.mtime = 0o444, 0
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[0:100] = bytes(100)
    header[124:136] = bytes(12)
    header[148:156] = b" " * 8  # the checksum is computed with its own field as blanks
    return np.frombuffer(bytes(header), dtype=np.uint8)


_HEADER = _member_header_template()
# tarfile ends an archive with two zero blocks, then pads it to whole 20-block records.
_RECORD = TAR_BLOCK * tarfile.RECORDSIZE // TAR_BLOCK
# A run (one partition's samples of one split, in order) holds the samples' texts back to back
# (`.fasta`), their index rows (`.arrow`) and these int64 columns per sample (`.npy`).
RUN_COLUMNS = ("text_bytes", "residues", "members", "hi", "lo")


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII octal digits of non-negative `values`, zero-padded to `width`: uint8 [n, width]."""
    shifts = 3 * np.arange(width - 1, -1, -1)
    return (48 + ((values[:, None] >> shifts) & 7)).astype(np.uint8)


def _binary_array(offsets: np.ndarray, data) -> pa.Array:
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def tar_members(names: np.ndarray, contents: pa.Array) -> tuple[pa.Buffer, np.ndarray]:
    """The bytes `tarfile` writes for regular files named by the rows of `names` (uint8
    [n, width], width ≤ 100) holding `contents` (binary): header, data, zero padding to 512
    each; and each member's size in the archive. All array operations: a header is the
    template's constant runs around three filled fields (name, octal size, checksum), and
    Arrow joins those pieces with the contents and padding into the archive in one pass
    (tarfile's addfile costs ~45 µs a member, which at UniParc's 250M samples would dominate).
    A test holds the two equal."""
    count, width = names.shape
    if width > 100:
        raise ValueError("tar member names must be at most 100 bytes")
    sizes = pc.binary_length(contents).to_numpy(zero_copy_only=False).astype(np.int64)
    size_field = np.zeros((count, 12), dtype=np.uint8)  # 11 octal digits and a NUL
    size_field[:, :11] = _octal_digits(sizes, 11)
    # The checksum sums the header with its own field as blanks (as the template holds it),
    # then is written as six octal digits, a NUL and a blank.
    checksums = (
        int(_HEADER[width:124].sum()) + int(_HEADER[136:].sum())
        + names.sum(axis=1, dtype=np.int64) + size_field.sum(axis=1, dtype=np.int64)
    )  # fmt: skip
    checksum_field = np.empty((count, 8), dtype=np.uint8)
    checksum_field[:, :6] = _octal_digits(checksums, 6)
    checksum_field[:, 6:] = (0, ord(" "))
    pads = -sizes % TAR_BLOCK
    zeros = np.zeros(int(pads.sum()), dtype=np.uint8)  # calloc: pages that cost nothing

    def rows(matrix: np.ndarray) -> pa.Array:
        matrix = np.ascontiguousarray(matrix)
        return _binary_array(np.arange(count + 1, dtype=np.int64) * matrix.shape[1], matrix)

    def constant(start: int, end: int) -> pa.Scalar:
        return pa.scalar(_HEADER[start:end].tobytes(), pa.large_binary())

    joined = pc.binary_join_element_wise(
        rows(names), constant(width, 124), rows(size_field), constant(136, 148),
        rows(checksum_field), constant(156, TAR_BLOCK), contents.cast(pa.large_binary()),
        _binary_array(np.concatenate([[0], np.cumsum(pads)]), zeros),
        pa.scalar(b"", pa.large_binary()),
    )  # fmt: skip
    data = joined.buffers()[2] if count else pa.py_buffer(b"")
    return data, TAR_BLOCK + sizes + pads


def tar_end(archive_bytes: int) -> bytes:
    """End-of-archive blocks and record padding for an archive of `archive_bytes` so far."""
    end = archive_bytes + 2 * TAR_BLOCK
    return bytes(2 * TAR_BLOCK + (-end % _RECORD))


def member_fasta(ids: pa.Array, sequences: pa.Array) -> pa.Array:
    """`>id\\nSEQUENCE\\n` of each member, unwrapped (a sample's content is its members', in
    order: one tar member per sample keeps the tar overhead to one per cluster)."""
    named = pc.binary_join_element_wise(">", ids, "")
    texts = pc.binary_join_element_wise(named, sequences, "", "\n").cast(pa.large_binary())
    return texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts


def _run_path(work: Path, part: int, split: str, suffix: str) -> Path:
    return work / "runs" / f"q{part:05d}.{split}.{suffix}"


def _stage3_group(options: ShardOptions, work: str, part: int) -> dict:
    """Samples of one partition: grouped, split and ordered by their hash, written as one run
    per split (the samples' texts, their sizes and keys, their index rows), all as array
    operations. Without clusters or --dedupe a record is its own group: its spill1 partition
    is already its group partition, so the id check happens here and stage 2 does not run."""
    work_path = Path(work)
    if _grouped(options):
        table = read_partition(work_path / "spill2", part, GROUPED)
        skipped: Counter = Counter()
        split_of_row = split_indices(table["hi"].to_numpy(), options.splits)
        table = table.append_column("split", pa.array(split_of_row.astype(np.int8)))
        # Split by split, samples in the order of their hash, a sample's members by id.
        keys = ["split", "hi", "lo", "group", "id"]
        table = table.take(pc.sort_indices(table, [(key, "ascending") for key in keys]))
    else:
        records = read_partition(work_path / "spill1" / "records", part, RECORDS)
        table, skipped = _unique_ids(options, _numbered(records, work_path))
        split_of_row = split_indices(table["hi"].to_numpy(), options.splits)
        table = table.take(pa.array(np.argsort(split_of_row, kind="stable")))
    count = len(table)
    hi, lo = table["hi"].to_numpy(), table["lo"].to_numpy()
    starts_group = np.ones(count, dtype=bool)
    if count > 1:
        starts_group[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        if _grouped(options):
            groups = table["group"]
            starts_group[1:] |= pc.not_equal(groups.slice(1), groups.slice(0, count - 1)).to_numpy()
    if options.dedupe and count:
        # Members of a group share a sequence digest; each repeat of the first is dropped.
        first_row = np.flatnonzero(starts_group)[np.cumsum(starts_group) - 1]
        sequences = table["sequence"]
        repeat = pc.equal(sequences, sequences.take(pa.array(first_row))).to_numpy()
        repeat &= ~starts_group
        skipped["duplicate_sequence"] += int(repeat.sum())
        table, starts_group = table.filter(pa.array(~repeat)), starts_group[~repeat]
        hi, lo, count = hi[~repeat], lo[~repeat], int((~repeat).sum())
    owner = np.cumsum(starts_group) - 1  # the sample of each member row
    firsts = np.flatnonzero(starts_group)
    sample_hi, sample_lo = hi[firsts], lo[firsts]
    same_key = (sample_hi[1:] == sample_hi[:-1]) & (sample_lo[1:] >> 32 == sample_lo[:-1] >> 32)
    if same_key.any():
        raise ShardError("two groups share a 96-bit sample key; rerun with another --seed")
    split_of = split_indices(sample_hi, options.splits)
    clusters = (table["group"] if options.clusters else table["id"]).take(pa.array(firsts))
    lengths = pc.utf8_length(table["sequence"]).to_numpy(zero_copy_only=False)
    texts = member_fasta(table["id"], table["sequence"])
    text_offsets = (
        np.frombuffer(texts.buffers()[1], dtype=np.int64)[: count + 1]
        if count
        else np.zeros(1, dtype=np.int64)
    )
    sample_text = np.diff(text_offsets[np.append(firsts, count)])
    # Splits are contiguous: samples [first, end) and their rows [row, row_end) of each.
    sample_bounds = np.searchsorted(split_of, np.arange(len(options.splits) + 2))
    row_bounds = np.append(firsts, count)[sample_bounds]
    (work_path / "runs").mkdir(exist_ok=True)
    counts = {}
    for number, split in enumerate(split_names(options.splits)):
        first, end = sample_bounds[number], sample_bounds[number + 1]
        row, row_end = row_bounds[number], row_bounds[number + 1]
        data = texts.buffers()[2] if count else pa.py_buffer(b"")
        _atomic_write(_run_path(work_path, part, split, "fasta"),
                      data.slice(int(text_offsets[row]), int(text_offsets[row_end] - text_offsets[row])))  # fmt: skip
        local = owner[row:row_end] - first  # the sample of each row, in this run
        residues = np.bincount(local, weights=lengths[row:row_end], minlength=end - first)
        run = np.stack(
            [sample_text[first:end], residues.astype(np.int64),
             np.bincount(local, minlength=end - first),
             sample_hi[first:end].view(np.int64), sample_lo[first:end].view(np.int64)], axis=1,
        )  # fmt: skip
        buffer = io.BytesIO()
        np.save(buffer, run.reshape(-1, len(RUN_COLUMNS)))
        _atomic_write(_run_path(work_path, part, split, "npy"), buffer.getvalue())
        rows = table.slice(row, row_end - row)
        index = pa.table({
            "id": rows["id"],
            "cluster": clusters.slice(first, end - first).take(pa.array(local)),
            "length": pa.array(lengths[row:row_end].astype(np.int32)),
            "input": rows["input"],
            "record": rows["record"],
            "sample": pa.array(local.astype(np.int64)),
        })  # fmt: skip
        staged = _run_path(work_path, part, split, "arrow.partial")
        with pa.OSFile(str(staged), "wb") as sink, pa.ipc.new_file(sink, index.schema) as out:
            out.write_table(index)
        os.replace(staged, _run_path(work_path, part, split, "arrow"))
        counts[split] = int(end - first)
    return {"skipped": dict(skipped), "samples": counts}


def _atomic_write(path: Path, data) -> None:
    staged = path.with_name(path.name + ".partial")
    with open(staged, "wb") as out:
        out.write(data)
    os.replace(staged, path)


# ---------------------------------------------------------------------- stage 4: shards


@dataclass
class ShardPlan:
    name: str
    split: str
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (partition, start, end)


def _plan_shards(options: ShardOptions, partitions: int, work: Path) -> list[ShardPlan]:
    """Each split's runs, partition after partition, cut into shards: every `shard_samples`
    samples, or greedily while the tar stays within `shard_bytes` (at least one sample)."""
    plans: list[ShardPlan] = []
    for split in split_names(options.splits):
        runs = [np.load(_run_path(work, part, split, "npy")) for part in range(partitions)]
        run_starts = np.cumsum([0] + [len(run) for run in runs])
        member_bytes = np.concatenate([_member_bytes(run) for run in runs])
        total = len(member_bytes)
        if options.shard_samples:
            cuts = [*range(0, total, options.shard_samples), total]
        else:
            before = np.concatenate([[0], np.cumsum(member_bytes)])
            limit = options.shard_bytes - 2 * TAR_BLOCK  # the end-of-archive blocks
            cuts = [0]
            while cuts[-1] < total:
                fits = int(np.searchsorted(before, before[cuts[-1]] + limit, side="right")) - 1
                cuts.append(min(total, max(fits, cuts[-1] + 1)))
        for number, (start, end) in enumerate(itertools.pairwise(cuts)):
            plan = ShardPlan(f"{split}-{number:06d}", split)
            for part in range(partitions):
                low, high = max(start, run_starts[part]), min(end, run_starts[part + 1])
                if low < high:
                    offset = int(run_starts[part])
                    plan.pieces.append((part, int(low) - offset, int(high) - offset))
            plans.append(plan)
    return plans


def _member_bytes(run: np.ndarray) -> np.ndarray:
    """Each sample's bytes in the tar: header plus content padded to whole blocks."""
    return TAR_BLOCK + -(-run[:, 0] // TAR_BLOCK) * TAR_BLOCK


def _stage4_write(options: ShardOptions, work: str, plan: ShardPlan) -> dict:
    work_path = Path(work)
    store = Store(options.out)
    staged = work_path / "tmp" / f"{plan.name}.tar"
    name = f"{plan.name}.tar"
    digest = hashlib.sha256()
    written = samples = residues = 0
    tables = []
    suffix = np.frombuffer(b".fasta", dtype=np.uint8)[None, :]
    # A thread writes while this one hashes the next chunk and builds the next piece: writing
    # waits on the disk (the tar is 3.2x the FASTA); the join, hash and write release the GIL.
    with open(staged, "wb") as out, ThreadPoolExecutor(1) as writer:
        writing = None
        for part, start, end in plan.pieces:
            whole = np.load(_run_path(work_path, part, plan.split, "npy"))
            run = whole[start:end]
            offsets = np.concatenate([[0], np.cumsum(whole[:, 0])])
            with pa.memory_map(str(_run_path(work_path, part, plan.split, "fasta"))) as texts:
                data = texts.read_at(int(offsets[end] - offsets[start]), int(offsets[start]))
            keys = sample_keys(run[:, 3].view(np.uint64), run[:, 4].view(np.uint64))
            names = np.concatenate([keys, np.repeat(suffix, len(run), axis=0)], axis=1)
            tar, _ = tar_members(
                names, _binary_array(offsets[start : end + 1] - offsets[start], data)
            )
            view = memoryview(tar)
            for chunk in range(0, tar.size, WRITE_CHUNK):  # hash a chunk, write the one before
                piece = view[chunk : chunk + WRITE_CHUNK]
                digest.update(piece)
                if writing is not None:
                    writing.result()
                writing = writer.submit(out.write, piece)
            written += tar.size
            samples += end - start
            residues += int(run[:, 1].sum())
            with pa.memory_map(str(_run_path(work_path, part, plan.split, "arrow"))) as source:
                rows = pa.ipc.open_file(source).read_all()
            sample = rows["sample"].to_numpy()
            low, high = np.searchsorted(sample, [start, end])
            rows = rows.slice(low, high - low)
            key_strings = pa.StringArray.from_buffers(
                len(run), pa.py_buffer(np.arange(len(run) + 1, dtype=np.int32) * 24),
                pa.py_buffer(keys.tobytes()),
            )  # fmt: skip
            key = key_strings.take(pa.array(sample[low:high] - start))
            tables.append(rows.drop_columns(["sample"]).append_column("key", key))
        if writing is not None:
            writing.result()
        end_blocks = tar_end(written)
        out.write(end_blocks)
        digest.update(end_blocks)
    index = pa.concat_tables(tables)
    index = index.append_column("split", pa.repeat(pa.scalar(plan.split), len(index)))
    index = index.append_column("shard", pa.repeat(pa.scalar(name), len(index)))
    index = index.select(["id", "cluster", "length", "split", "shard", "key", "input", "record"])
    index_file = work_path / "tmp" / f"{plan.name}.parquet"
    # Dictionary pages only where values repeat (ids and keys are unique: trying a
    # dictionary for them costs more than the whole rest of the write).
    repeated = ["split", "shard", *(["cluster"] if options.clusters else [])]
    pq.write_table(index, index_file, compression="zstd", use_dictionary=repeated)
    lengths = index["length"]
    row = {
        "name": name,
        "split": plan.split,
        "samples": samples,
        "sequences": len(index),
        "residues": residues,
        "bytes": staged.stat().st_size,
        "min_length": pc.min(lengths).as_py(),
        "max_length": pc.max(lengths).as_py(),
        "sha256": digest.hexdigest(),
    }
    store.publish(index_file, f"index/{plan.name}.parquet")
    store.publish(staged, name)
    return row


# ---------------------------------------------------------------------------- the run


def _partition_count(options: ShardOptions) -> int:
    """From the stored input sizes (compressed inputs counted ×4): deterministic for given
    inputs, independent of the machine and of --workers."""

    estimate = 0
    for path in (*options.inputs, *([options.clusters] if options.clusters else [])):
        try:
            size = input_stat(path)["bytes"]
        except FastaError as exc:
            raise ShardError(str(exc)) from None
        estimate += size * (4 if path.lower().endswith((".gz", ".zst", ".zstd")) else 1)
    return max(1, min(MAX_PARTITIONS, math.ceil(estimate / PARTITION_TARGET_BYTES)))


def default_work_dir(out: str) -> Path:
    store = Store(out)
    if not store.remote:
        return Path(store.root) / "_work"
    name = hashlib.sha256(out.encode()).hexdigest()[:16]
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"esmdist-shard-{name}"


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_sharding(
    options: ShardOptions, workers: int = 1, work_dir: Path | None = None, keep_work: bool = False
) -> dict:
    """Shard `options.inputs` into `options.out`; returns the manifest. Resumes a crashed run
    with the same options from its work directory."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    store = Store(options.out)
    identity = options.identity()
    if store.exists(MANIFEST):
        return _already_sharded(options, json.loads(store.read_bytes(MANIFEST)))
    partitions = _partition_count(options)  # every input exists (sizes)
    store.check_writable()  # a read-only --out or refused credentials fail now, not at the end
    work = work_dir or default_work_dir(options.out)
    work.mkdir(parents=True, exist_ok=True)
    with _work_lock(work):
        plan_file = work / "plan.json"
        plan = _json(plan_file)
        if plan is not None and plan["options"] != identity:
            raise ShardError(f"{work} holds an unfinished run with other options; delete it or "
                             "use the same options")  # fmt: skip
        if plan is None:
            plan = {"options": identity, "partitions": partitions}
            _atomic_write(plan_file, json.dumps(plan, indent=1).encode())
        elif plan["partitions"] != partitions:
            raise ShardError(f"the input sizes changed since the unfinished run in {work} "
                             f"started: delete {work} to start over")  # fmt: skip
        started = time.monotonic()
        (work / "tmp").mkdir(exist_ok=True)
        with _worker_environment():
            read = _json(work / "stage1.json")
            if read is None:
                read = _stage1(options, partitions, work, workers)
                _atomic_write(work / "stage1.json", json.dumps(read).encode())
            elif changed := changed_inputs(_recorded_inputs(read)):
                raise ShardError(f"the inputs changed since the unfinished run in {work} read "
                                 f"them ({'; '.join(changed)}): delete {work} to start over")  # fmt: skip
            rows, joins, groups = _stages_2_to_4(options, partitions, work, workers)
        print(f"finished in {time.monotonic() - started:,.1f} s", file=sys.stderr)
        manifest = _manifest(options, read, joins, groups, rows)
        _write_shard_table(store, rows, work)
        _publish_bytes(store, json.dumps(manifest, indent=1).encode(), MANIFEST, work)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _recorded_inputs(read: dict) -> list[dict]:
    """The identities of the FASTA inputs and the cluster table as read (stage 1, manifest)."""
    return [*read["inputs"], *([read["cluster_table"]] if read.get("cluster_table") else [])]


def _already_sharded(options: ShardOptions, manifest: dict) -> dict:
    """The existing manifest when it was made from these options and these inputs, as they
    are now; else ShardError saying what differs."""
    if manifest.get("options") != options.identity():
        raise ShardError(f"{options.out} already holds a sharded dataset made with other "
                         "options; choose another --out or delete it")  # fmt: skip
    changed = changed_inputs(_recorded_inputs(manifest))
    if changed:
        raise ShardError(
            f"{options.out} holds shards of other versions of the inputs ({'; '.join(changed)}): "
            "delete it or choose another --out to shard them as they are now"
        )
    print(f"{options.out}: already sharded with these options", file=sys.stderr)
    return manifest


@contextlib.contextmanager
def _work_lock(work: Path) -> Iterator[None]:
    """One sharding run per work directory: a second one would write the same spills and runs.
    An OS file lock, released by the kernel when its holder exits, however it exits."""
    import fcntl

    with open(work / "LOCK", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ShardError(f"another esmdist shard (pid {holder}) is running on {work}; wait "
                             "for it, or give this run another --out or --work-dir") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def _stages_2_to_4(options: ShardOptions, partitions: int, work: Path, workers: int):
    """(shard rows, join results, group results), each stage resuming where a crash left it.
    What a finished step leaves behind that no later step reads (a partition's spill once it is
    grouped, a run once every shard cut from it is written) is deleted at once: most of it then
    never reaches the disk, and the work directory peaks lower."""
    spill1 = [work / "spill1" / kind for kind in ("records", "members")]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:  # fmt: skip
        joins = []
        if _grouped(options):  # else a record's id partition is already its group partition
            joins = _resumable_stage(pool, work / "stage2", "join", range(partitions),
                                     lambda p: pool.submit(_stage2_join, options, partitions,
                                                           str(work), p),
                                     lambda p: remove_writer(work / "spill2", f"j{p}"),
                                     lambda p, _: _remove_partition(spill1, p))  # fmt: skip
        grouped_from = [work / "spill2"] if _grouped(options) else spill1
        groups = _resumable_stage(pool, work / "stage3", "group", range(partitions),
                                  lambda p: pool.submit(_stage3_group, options, str(work), p),
                                  done=lambda p, _: _remove_partition(grouped_from, p))  # fmt: skip
        plans = {plan.name: plan for plan in _shard_plans(options, partitions, work)}
        readers = Counter((part, plan.split) for plan in plans.values()
                          for part, _, _ in plan.pieces)  # fmt: skip
        progress = _Progress("shards")

        def shard_done(name: str, row: dict) -> None:
            progress.update(records=row["samples"])
            for part, _, _ in plans[name].pieces:
                readers[part, plans[name].split] -= 1
                if readers[part, plans[name].split] == 0:
                    for path in work.glob(f"runs/q{part:05d}.{plans[name].split}.*"):
                        path.unlink()

        rows = _resumable_stage(pool, work / "done", "shard", list(plans),
                                lambda name: pool.submit(_stage4_write, options, str(work),
                                                         plans[name]),
                                done=shard_done)  # fmt: skip
        progress.finish()
    return rows, joins, groups


def _remove_partition(roots: list[Path], part: int) -> None:
    for root in roots:
        shutil.rmtree(root / f"p{part:05d}", ignore_errors=True)


def _shard_plans(options: ShardOptions, partitions: int, work: Path) -> list[ShardPlan]:
    """The shard plan, made once and kept: on a resume, runs of finished shards are gone."""
    saved = _json(work / "shards.json")
    if saved is None:
        plans = _plan_shards(options, partitions, work)
        _atomic_write(work / "shards.json", json.dumps([asdict(plan) for plan in plans]).encode())
        return plans
    return [ShardPlan(plan["name"], plan["split"], [tuple(piece) for piece in plan["pieces"]])
            for plan in saved]  # fmt: skip


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """Worker processes started inside get their large buffers on transparent huge pages:
    Arrow's allocator (mimalloc) and glibc's malloc ask for them only when told, and first
    touching fresh memory page by page cost more than the work done on it (a fresh 400 MB Arrow
    result: 1.0 s in 4 KB pages, 0.23 s in huge pages — docs/PERFORMANCE.md). The variables
    are read when a process starts, so they are set for the children and restored after."""
    saved = {name: os.environ.get(name) for name in ("MIMALLOC_ALLOW_LARGE_OS_PAGES",
                                                     "GLIBC_TUNABLES")}  # fmt: skip
    os.environ.setdefault("MIMALLOC_ALLOW_LARGE_OS_PAGES", "1")
    tunables = saved["GLIBC_TUNABLES"] or ""
    if "glibc.malloc.hugetlb" not in tunables:
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _resumable_stage(
    pool, folder: Path, label, parts, submit, before=None, done=None
) -> list[dict]:
    """Run `submit(part)` for every part without a result file; return all results in order.
    `done(part, result)` runs once a part's result is on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    futures = {}
    for part in parts:
        if not (folder / f"{part}.json").exists():
            if before is not None:
                before(part)
            futures[part] = submit(part)
    parts_of = {future: part for part, future in futures.items()}
    try:
        # As each finishes, not in order: a part done but not yet recorded is redone on resume.
        for future in as_completed(parts_of):
            part, result = parts_of[future], future.result()
            _atomic_write(folder / f"{part}.json", json.dumps(result).encode())
            if done is not None:
                done(part, result)
    except FastaError as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{label} stage failed: {type(exc).__name__}: {exc}; rerun the same "
                         "command to resume") from exc  # fmt: skip
    return [json.loads((folder / f"{part}.json").read_text()) for part in parts]


def _write_shard_table(store: Store, rows: list[dict], work: Path) -> None:
    table = pa.Table.from_pylist(rows)
    local = work / "tmp" / SHARD_TABLE
    local.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, local)
    store.publish(local, SHARD_TABLE)


def _manifest(options, read, joins, groups, rows) -> dict:
    skipped = Counter(read["read"]["skipped"])
    for result in (*joins, *groups):
        skipped.update(result["skipped"])
    per_split = {}
    for split in split_names(options.splits):
        mine = [r for r in rows if r["split"] == split]
        per_split[split] = {
            "shards": len(mine),
            "samples": sum(r["samples"] for r in mine),
            "sequences": sum(r["sequences"] for r in mine),
            "residues": sum(r["residues"] for r in mine),
        }
    histogram = read["length_log2_histogram"]
    return {
        "format_version": FORMAT_VERSION,
        "options": options.identity(),
        "inputs": read["inputs"],
        "cluster_table": read.get("cluster_table"),
        "counts": {
            "records_read": read["read"]["records"] + sum(read["read"]["skipped"].values()),
            "sequences": sum(s["sequences"] for s in per_split.values()),
            "samples": sum(s["samples"] for s in per_split.values()),
            "residues": sum(s["residues"] for s in per_split.values()),
            "skipped": dict(sorted(skipped.items())),
            "normalised": read["read"]["normalised"],
            "splits": per_split,
        },
        "length_histogram": {
            "bins": "log2: bin b holds lengths in [2^(b-1), 2^b)",
            "counts": histogram,
        },
        "length": {
            "min": min(r["min_length"] for r in rows),
            "max": max(r["max_length"] for r in rows),
            "mean": round(
                sum(s["residues"] for s in per_split.values())
                / max(1, sum(s["sequences"] for s in per_split.values())),
                3,
            ),
        },
        "shards": [r["name"] for r in rows],
    }


def format_report(manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        f"read {counts['records_read']:,} records → {counts['sequences']:,} sequences in "
        f"{counts['samples']:,} samples ({counts['residues']:,} residues)",
    ]
    for split, numbers in counts["splits"].items():
        lines.append(
            f"  {split:<6} {numbers['shards']:>5} shards {numbers['samples']:>12,} samples "
            f"{numbers['sequences']:>12,} sequences {numbers['residues']:>15,} residues"
        )
    for title, table in (("skipped", counts["skipped"]), ("normalised", counts["normalised"])):
        if table:
            lines.append(f"  {title}: " + ", ".join(f"{k}={v:,}" for k, v in table.items()))
    return "\n".join(lines)

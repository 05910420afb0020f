"""The offline sharder: FASTA (+ optional cluster membership) → webdataset tar shards, a parquet
shard table and sequence index, and `manifest.json` written last as the commit point.

The format is specified in `shards/README.md` (format version `FORMAT_VERSION`).

Stages (each parallel over processes, each resumable after a crash):
1. read — the main process decompresses each input and cuts it into blocks of whole records;
   workers validate and parse them and spill every record to a partition chosen by a hash of
   its id (and every membership row by a hash of its member id).
2. join — per id partition: the membership join, duplicate-id checks, the group key of each
   record (its cluster, its sequence digest with `--dedupe`, else its id); records are spilled
   again, by a hash of the group key.
3. group — per group partition: samples (a cluster with its members, or one sequence), their
   split and their order, both from a keyed hash of (seed, group key); written as sorted runs.
4. shards — the runs are cut into shards of `--shard-size` bytes or `--shard-samples` samples
   and written in parallel, each under a temporary name, then renamed (local) or uploaded
   (object storage, where an object is visible only once complete).

Memory is bounded by one partition per worker; partitions are sized from the input size.
Bytes of every output depend only on the inputs and options: the order inside a partition
comes from hashes and provenance, never from which worker ran first.
"""

from __future__ import annotations

import hashlib
import io
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from esmdist.data.fasta import (
    BLOCK_BYTES,
    FastaError,
    InputFile,
    OnInvalid,
    ReadReport,
    input_error,
    parse_block,
    raw_blocks,
)
from esmdist.data.spill import SpillWriter, read_partition, remove_writer
from esmdist.storage import Store

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_TABLE = "shards.parquet"
PARTITION_TARGET_BYTES = 128 << 20
MAX_PARTITIONS = 512
# A tar member is a 512-byte header plus its data padded to 512 bytes.
TAR_BLOCK = 512


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


def _digest(seed: int, key: str) -> bytes:
    return hashlib.blake2b(
        key.encode("utf-8"), digest_size=16, key=seed.to_bytes(8, "little", signed=True)
    ).digest()


def _partition(digest: bytes, partitions: int) -> int:
    return int.from_bytes(digest[8:16], "big") % partitions


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


def _publish_bytes(store: Store, data: bytes, name: str, work: Path) -> None:
    staged = work / "tmp" / name.replace("/", "_")
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(data)
    store.publish(staged, name)


# ------------------------------------------------------------------------ stage 1: read


@dataclass
class _ReadTask:
    kind: Literal["fasta", "members"]
    input_index: int
    path: str
    block: bytes
    first_record: int
    first_line: int


def _stage1_worker(
    number: int,
    options: ShardOptions,
    partitions: int,
    spill_root: str,
    tasks: mp.Queue,
    results: mp.Queue,
) -> None:
    records = SpillWriter(Path(spill_root) / "records", partitions, f"w{number}")
    members = SpillWriter(Path(spill_root) / "members", partitions, f"w{number}")
    try:
        while (task := tasks.get()) is not None:
            report = ReadReport()
            lengths = Counter()
            if task.kind == "fasta":
                for record in parse_block(
                    task.path, task.block, task.first_record, task.first_line,
                    options.on_invalid, options.min_length, options.max_length, report,
                ):  # fmt: skip
                    item = (record.id, record.sequence, task.input_index, record.number)
                    records.add(_partition(_digest(0, record.id), partitions), item,
                                len(record.sequence) + 64)  # fmt: skip
                    lengths[len(record.sequence).bit_length()] += 1
            else:
                for offset, line in enumerate(task.block.split(b"\n")):
                    line = line.rstrip(b"\r")
                    if not line:
                        continue
                    fields = line.split(b"\t")
                    where = f"{task.path}: line {task.first_line + offset}"
                    if len(fields) != 2 or not all(fields):
                        raise ShardError(
                            f"{where}: expected 'cluster<TAB>member' (MMseqs2 createtsv / UniRef "
                            f"membership), got {line[:80]!r}"
                        )
                    cluster, member = (f.decode("utf-8", "replace") for f in fields)
                    item = (member, cluster, task.first_line + offset)
                    members.add(_partition(_digest(0, member), partitions), item, len(line) + 48)
            results.put(("block", len(task.block), report, lengths))
        records.close()
        members.close()
        results.put(("done", number, None, None))
    except (FastaError, ShardError) as exc:
        results.put(("error", str(exc), None, None))
    except BaseException as exc:  # report anything, then let the parent stop
        results.put(("error", f"worker {number}: {type(exc).__name__}: {exc}", None, None))


def _membership_blocks(path: str) -> Iterator[tuple[bytes, int]]:
    with InputFile(path) as handle:
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
    procs = [
        context.Process(
            target=_stage1_worker,
            args=(i, options, partitions, str(spill), tasks, results),
            daemon=True,
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    report, lengths = ReadReport(), Counter()
    progress = _Progress("read")
    finished = 0

    def drain(wait: float) -> None:
        """Handle every result that arrives within `wait` seconds; fail on errors and deaths."""
        nonlocal finished
        while True:
            try:
                kind, value, block_report, block_lengths = results.get(timeout=wait)
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
            else:
                report.merge(block_report)
                lengths.update(block_lengths)
                progress.update(value, block_report.records)

    def submit(task: _ReadTask | None) -> None:
        while True:
            drain(0.0)
            try:
                tasks.put(task, timeout=0.2)
                return
            except queue.Full:
                continue

    checksums = []
    try:
        for index, path in enumerate(options.inputs):
            with InputFile(path) as handle:
                for block, record, line in raw_blocks(path, handle):
                    submit(_ReadTask("fasta", index, path, block, record, line))
            checksums.append({"path": path, "bytes": handle.stored_bytes,
                              "sha256": handle.sha256.hexdigest()})  # fmt: skip
        if options.clusters:
            for block, line in _membership_blocks(options.clusters):
                submit(_ReadTask("members", -1, options.clusters, block, 0, line))
        for _ in procs:
            submit(None)
        while finished < workers:
            drain(0.2)
    finally:
        for proc in procs:
            if proc.is_alive() and finished < workers:
                proc.kill()
            proc.join()
    elapsed = progress.finish()
    if report.records == 0:
        raise ShardError(
            "no valid sequences in the inputs"
            + (f" (skipped: {dict(report.skipped)})" if report.skipped else "")
        )
    return {
        "inputs": checksums,
        "read": report.to_dict(),
        "length_log2_histogram": {str(k): v for k, v in sorted(lengths.items())},
        "seconds": elapsed,
    }


# ------------------------------------------------------------------------ stage 2: join


def _stage2_join(options: ShardOptions, partitions: int, work: str, part: int) -> dict:
    work_path = Path(work)
    records = read_partition(work_path / "spill1" / "records", part)
    records.sort(key=lambda r: (r[2], r[3]))  # input order: (input index, record number)
    membership: dict[str, tuple[str, int]] = {}
    if options.clusters:
        for member, cluster, line in sorted(
            read_partition(work_path / "spill1" / "members", part), key=lambda m: m[2]
        ):
            seen = membership.setdefault(member, (cluster, line))
            if seen[0] != cluster:
                raise ShardError(
                    f"{options.clusters}: member {member!r} is in cluster {seen[0]!r} (line "
                    f"{seen[1]}) and in {cluster!r} (line {line}); a member belongs to one cluster"
                )
    out = SpillWriter(work_path / "spill2", partitions, f"j{part}")
    skipped: Counter = Counter()
    first: dict[str, tuple[str, int, int]] = {}
    for record_id, seq, input_index, number in records:
        where = f"{options.inputs[input_index]}: record {number}"
        if record_id in first:
            kept_seq, kept_input, kept_number = first[record_id]
            kept = f"{options.inputs[kept_input]}: record {kept_number}"
            if kept_seq == seq:
                skipped["duplicate_record"] += 1
                continue
            if options.on_invalid == "error":
                raise ShardError(
                    f"{where}: id {record_id!r} repeats {kept} with a different sequence; ids "
                    "must be unique (use --on-invalid skip to keep the first and count the rest)"
                )
            skipped["duplicate_id"] += 1
            continue
        first[record_id] = (seq, input_index, number)
        if options.clusters:
            entry = membership.get(record_id)
            if entry is None:
                if options.on_missing_member == "error":
                    raise ShardError(
                        f"{where}: sequence {record_id!r} is not in the cluster table "
                        f"{options.clusters} (use --on-missing-member skip to leave it out)"
                    )
                skipped["missing_from_clusters"] += 1
                continue
            group = entry[0]
        elif options.dedupe:
            group = "seq:" + hashlib.blake2b(seq.encode(), digest_size=16).hexdigest()
        else:
            group = record_id
        item = (group, record_id, seq, input_index, number)
        out.add(_partition(_digest(options.seed, group), partitions), item, len(seq) + 96)
    out.close()
    return {"skipped": dict(skipped)}


# ----------------------------------------------------------------------- stage 3: group


def _member_header_template() -> bytes:
    """tarfile's own ustar header for our members (mode 0444, mtime 0, root, regular file) with
    the name, size and checksum fields blanked."""
    info = tarfile.TarInfo("")
    info.mode, info.mtime = 0o444, 0
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[0:100] = bytes(100)
    header[124:136] = bytes(12)
    header[148:156] = b" " * 8  # the checksum is computed with its own field as blanks
    return bytes(header)


_HEADER = _member_header_template()
# tarfile ends an archive with two zero blocks, then pads it to whole 20-block records.
_RECORD = TAR_BLOCK * tarfile.RECORDSIZE // TAR_BLOCK


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII octal digits of non-negative `values`, zero-padded to `width`: uint8 [n, width]."""
    shifts = 3 * np.arange(width - 1, -1, -1)
    return (48 + ((values[:, None] >> shifts) & 7)).astype(np.uint8)


def tar_members(names: list[str], datas: list[bytes]) -> bytes:
    """The bytes `tarfile` writes for regular files `names` (all of one length) holding
    `datas`: header, data, zero padding to 512 each. Headers come from a template and are
    filled for all members at once (name, octal size, checksum as array operations): tarfile's
    addfile costs ~45 µs a member, which at UniParc's 250M samples would dominate. A test holds
    the two equal."""
    if not names:
        return b""
    encoded = "".join(names).encode()
    width = len(encoded) // len(names)
    if width * len(names) != len(encoded) or width > 100:
        raise ValueError("tar member names must all have one length of at most 100 bytes")
    sizes = np.fromiter(map(len, datas), dtype=np.int64, count=len(datas))
    headers = np.tile(np.frombuffer(_HEADER, dtype=np.uint8), (len(names), 1))
    headers[:, :width] = np.frombuffer(encoded, dtype=np.uint8).reshape(-1, width)
    headers[:, 124:135] = _octal_digits(sizes, 11)
    headers[:, 135] = 0
    # The checksum counts its own field as blanks (as the template holds it), then is written
    # as six octal digits and a NUL, the field's last byte staying a blank.
    headers[:, 148:154] = _octal_digits(headers.sum(axis=1, dtype=np.int64), 6)
    headers[:, 154] = 0
    rows = headers.tobytes()
    pads = [bytes(n) for n in range(TAR_BLOCK)]
    return b"".join(
        piece
        for i, data in enumerate(datas)
        for piece in (rows[i * TAR_BLOCK : (i + 1) * TAR_BLOCK], data, pads[-len(data) % TAR_BLOCK])
    )


def tar_end(archive_bytes: int) -> bytes:
    """End-of-archive blocks and record padding for an archive of `archive_bytes` so far."""
    end = archive_bytes + 2 * TAR_BLOCK
    return bytes(2 * TAR_BLOCK + (-end % _RECORD))


def sample_fasta(members: list[tuple]) -> bytes:
    """A sample's content: every member (id, sequence, …) unwrapped, `>id\nSEQ\n` each. One tar
    member per sample keeps the tar overhead (header and padding) to one per cluster."""
    return "".join([f">{member[0]}\n{member[1]}\n" for member in members]).encode()


def _run_path(work: Path, part: int, split: str, suffix: str) -> Path:
    return work / "runs" / f"q{part:05d}.{split}.{suffix}"


def _stage3_group(options: ShardOptions, work: str, part: int) -> dict:
    """Samples of one partition: grouped, split and ordered by their hash, written as one run
    per split (tar members, their sizes, index rows). Per-sample work is array operations
    except building each sample's text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work_path = Path(work)
    groups: dict[str, list[tuple]] = {}
    for group, record_id, seq, input_index, number in read_partition(work_path / "spill2", part):
        groups.setdefault(group, []).append((record_id, seq, input_index, number))
    skipped: Counter = Counter()
    samples, clusters = [], []
    for group, members in groups.items():
        if len(members) > 1:
            members.sort()
            if options.dedupe:
                unique, seen = [], set()
                for member in members:
                    if member[1] in seen:
                        skipped["duplicate_sequence"] += 1
                        continue
                    seen.add(member[1])
                    unique.append(member)
                members = unique
        samples.append(members)
        clusters.append(members[0][0] if group.startswith("seq:") else group)
    raw = b"".join([_digest(options.seed, group) for group in groups])
    digests = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 16)
    high = digests[:, :8].copy().view(">u8")[:, 0]
    low = digests[:, 8:].copy().view(">u8")[:, 0]
    split_of = split_indices(high, options.splits)
    (work_path / "runs").mkdir(exist_ok=True)
    counts = {}
    for number, split in enumerate(split_names(options.splits)):
        chosen = np.flatnonzero(split_of == number)
        chosen = chosen[np.lexsort((low[chosen], high[chosen]))]  # by hash, bytewise
        keys = [raw[16 * i : 16 * i + 12].hex() for i in chosen.tolist()]
        if len(set(keys)) != len(keys):
            raise ShardError("two groups share a 96-bit sample key; rerun with another --seed")
        picked = [samples[i] for i in chosen.tolist()]
        datas = [sample_fasta(members) for members in picked]
        members = [member for group in picked for member in group]
        per_sample = np.fromiter(map(len, picked), dtype=np.int64, count=len(picked))
        lengths = np.fromiter((len(m[1]) for m in members), dtype=np.int32, count=len(members))
        owner = np.repeat(np.arange(len(picked), dtype=np.int64), per_sample)
        blob_bytes = np.fromiter(map(len, datas), dtype=np.int64, count=len(datas))
        blob_bytes = TAR_BLOCK + -(-blob_bytes // TAR_BLOCK) * TAR_BLOCK
        residues = np.bincount(owner, weights=lengths, minlength=len(picked)).astype(np.int64)
        _atomic_write(_run_path(work_path, part, split, "tar"),
                      tar_members([f"{key}.fasta" for key in keys], datas))  # fmt: skip
        buffer = io.BytesIO()
        np.save(buffer, np.stack([blob_bytes, residues, per_sample], axis=1).reshape(-1, 3))
        _atomic_write(_run_path(work_path, part, split, "npy"), buffer.getvalue())
        take = pa.array(owner)
        table = pa.table({
            "id": pa.array([m[0] for m in members], pa.string()),
            "cluster": pa.array([clusters[i] for i in chosen.tolist()], pa.string()).take(take),
            "length": pa.array(lengths, pa.int32()),
            "key": pa.array(keys, pa.string()).take(take),
            "input": pa.array([m[2] for m in members], pa.int16()),
            "record": pa.array([m[3] for m in members], pa.int64()),
            "sample": pa.array(owner, pa.int64()),
        })  # fmt: skip
        staged = _run_path(work_path, part, split, "parquet.partial")
        pq.write_table(table, staged)
        os.replace(staged, _run_path(work_path, part, split, "parquet"))
        counts[split] = len(picked)
    return {"skipped": dict(skipped), "samples": counts}


def _atomic_write(path: Path, data: bytes) -> None:
    staged = path.with_name(path.name + ".partial")
    staged.write_bytes(data)
    os.replace(staged, path)


# ---------------------------------------------------------------------- stage 4: shards


@dataclass
class ShardPlan:
    name: str
    split: str
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (partition, start, end)


def _plan_shards(options: ShardOptions, partitions: int, work: Path) -> list[ShardPlan]:
    plans: list[ShardPlan] = []
    for split in split_names(options.splits):
        current: ShardPlan | None = None
        size = count = 0
        for part in range(partitions):
            sizes = np.load(_run_path(work, part, split, "npy"))
            start = 0
            for index, sample_bytes in enumerate(sizes[:, 0]):
                full = (
                    count >= options.shard_samples
                    if options.shard_samples
                    else count > 0 and size + sample_bytes + 2 * TAR_BLOCK > options.shard_bytes
                )
                if current is None or full:
                    if current is not None and index > start:
                        current.pieces.append((part, start, index))
                    current = ShardPlan(
                        f"{split}-{sum(p.split == split for p in plans):06d}", split
                    )
                    plans.append(current)
                    start, size, count = index, 0, 0
                size += int(sample_bytes)
                count += 1
            if current is not None and len(sizes) > start:
                current.pieces.append((part, start, len(sizes)))
    return plans


def _stage4_write(options: ShardOptions, work: str, plan: ShardPlan) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    work_path = Path(work)
    store = Store(options.out)
    staged = work_path / "tmp" / f"{plan.name}.tar"
    name = f"{plan.name}.tar"
    digest = hashlib.sha256()
    written = samples = residues = 0
    tables = []
    with open(staged, "wb") as out:
        for part, start, end in plan.pieces:
            sizes = np.load(_run_path(work_path, part, plan.split, "npy"))
            offsets = np.concatenate([[0], np.cumsum(sizes[:, 0])])
            with open(_run_path(work_path, part, plan.split, "tar"), "rb") as run:
                run.seek(int(offsets[start]))
                data = run.read(int(offsets[end] - offsets[start]))
            out.write(data)
            digest.update(data)
            written += len(data)
            samples += end - start
            residues += int(sizes[start:end, 1].sum())
            rows = pq.read_table(_run_path(work_path, part, plan.split, "parquet"))
            keep = pc.and_(pc.greater_equal(rows["sample"], start), pc.less(rows["sample"], end))
            tables.append(rows.filter(keep).drop_columns(["sample"]))
        end_blocks = tar_end(written)
        out.write(end_blocks)
        digest.update(end_blocks)
    index = pa.concat_tables(tables)
    index = index.append_column("split", pa.array([plan.split] * len(index), pa.string()))
    index = index.append_column("shard", pa.array([name] * len(index), pa.string()))
    index = index.select(["id", "cluster", "length", "split", "shard", "key", "input", "record"])
    index_file = work_path / "tmp" / f"{plan.name}.parquet"
    pq.write_table(index, index_file, compression="zstd")
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
    import fsspec

    estimate = 0
    for path in (*options.inputs, *([options.clusters] if options.clusters else [])):
        try:
            fs, root = fsspec.core.url_to_fs(path)
            size = fs.size(root)
        except OSError as exc:
            raise ShardError(str(input_error(path, exc))) from None
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
        manifest = json.loads(store.read_bytes(MANIFEST))
        if manifest.get("options") == identity:
            print(f"{options.out}: already sharded with these options", file=sys.stderr)
            return manifest
        raise ShardError(
            f"{options.out} already holds a sharded dataset made with other options; "
            "choose another --out or delete it"
        )
    work = work_dir or default_work_dir(options.out)
    plan_file = work / "plan.json"
    plan = _json(plan_file)
    if plan is not None and plan["options"] != identity:
        raise ShardError(
            f"{work} holds an unfinished run with other options; delete it or use the same options"
        )
    if plan is None:
        plan = {"options": identity, "partitions": _partition_count(options)}
        work.mkdir(parents=True, exist_ok=True)
        _atomic_write(plan_file, json.dumps(plan, indent=1).encode())
    partitions = plan["partitions"]
    started = time.monotonic()
    (work / "tmp").mkdir(exist_ok=True)

    read = _json(work / "stage1.json")
    if read is None:
        read = _stage1(options, partitions, work, workers)
        _atomic_write(work / "stage1.json", json.dumps(read).encode())

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        joins = _resumable_stage(pool, work / "stage2", "join", range(partitions),
                                 lambda p: pool.submit(_stage2_join, options, partitions,
                                                       str(work), p),
                                 lambda p: remove_writer(work / "spill2", f"j{p}"))  # fmt: skip
        groups = _resumable_stage(pool, work / "stage3", "group", range(partitions),
                                  lambda p: pool.submit(_stage3_group, options, str(work), p))  # fmt: skip
        plans = {p.name: p for p in _plan_shards(options, partitions, work)}
        progress = _Progress("shards")
        rows = _resumable_stage(pool, work / "done", "shard", list(plans),
                                lambda name: pool.submit(_stage4_write, options, str(work),
                                                         plans[name]),
                                on_result=lambda row: progress.update(records=row["samples"]))  # fmt: skip
        progress.finish()
    print(f"finished in {time.monotonic() - started:,.1f} s", file=sys.stderr)

    manifest = _manifest(options, read, joins, groups, rows)
    _write_shard_table(store, rows, work)
    _publish_bytes(store, json.dumps(manifest, indent=1).encode(), MANIFEST, work)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _resumable_stage(
    pool, folder: Path, label, parts, submit, before=None, on_result=None
) -> list[dict]:
    """Run `submit(part)` for every part without a result file; return all results in order."""
    folder.mkdir(parents=True, exist_ok=True)
    futures = {}
    for part in parts:
        if not (folder / f"{part}.json").exists():
            if before is not None:
                before(part)
            futures[part] = submit(part)
    try:
        for part, future in futures.items():
            result = future.result()
            _atomic_write(folder / f"{part}.json", json.dumps(result).encode())
            if on_result is not None:
                on_result(result)
    except FastaError as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{label} stage failed: {type(exc).__name__}: {exc}; rerun the same "
                         "command to resume") from exc  # fmt: skip
    return [json.loads((folder / f"{part}.json").read_text()) for part in parts]


def _write_shard_table(store: Store, rows: list[dict], work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

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

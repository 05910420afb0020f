"""Stage 1, read: inputs decompressed and cut into blocks of whole records (by the main process,
or with three or more inputs by the workers, each reading whole inputs), parsed by workers into
Arrow columns and spilled to id partitions; the membership table likewise. The first bad
record in input order is reported with its true record and line numbers."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esmdist.data.fasta import (
    BLOCK_BYTES,
    ReadReport,
    parse_block,
    parse_block_table,
    record_blocks,
)
from esmdist.data.format import key_hashes
from esmdist.data.inputs import FastaError, InputFile
from esmdist.process import exit_with_parent
from esmdist.shard.options import ShardError, ShardOptions
from esmdist.shard.report import Progress
from esmdist.shard.spill import SpillWriter
from esmdist.shard.work import RECORDS, read_json

# Room in a shared block buffer beyond BLOCK_BYTES for the record cut off the previous block;
# a larger block (one record longer than that) travels pickled instead.
BUFFER_SLACK = 1 << 20


@dataclass
class ReadTask:
    """What the main process hands a read worker (None instead: no more work)."""

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
    buffer: int | None = None
    """Where the block is instead (`block` then empty): this shared buffer's first `size` bytes."""
    size: int = 0


# What a read worker tells the main process, one message per event. A block is keyed
# (input, its number within the input).
@dataclass(frozen=True)
class BlockRead:
    """A block parsed and spilled. FASTA: `counted` is (blank lines before it, records,
    lines); a block of the membership table has neither key nor counts."""

    block: tuple[int, int] | None
    counted: tuple[int, int, int] | None
    nbytes: int
    report: ReadReport
    lengths: Counter
    buffer: int | None


@dataclass(frozen=True)
class BlockToReword:
    """A block cut by the main process holds a bad record: the main process words the error
    once it knows the block's true first record and line (and only its start counts)."""

    block: tuple[int, int]
    data: bytes
    buffer: int | None
    leading: int


@dataclass(frozen=True)
class BadBlock:
    """A bad record in a whole input the worker read itself, already worded."""

    block: tuple[int, int]
    message: str


@dataclass(frozen=True)
class InputRead:
    """A whole input read to its end: what was read (`InputFile.identity`)."""

    index: int
    identity: dict


@dataclass(frozen=True)
class WorkerDone:
    number: int


@dataclass(frozen=True)
class WorkerFailed:
    message: str


class _Worker:
    """One read worker's spill writers and the blocks it parses."""

    def __init__(self, number: int, options: ShardOptions, partitions: int, spill_root: str,
                 results: mp.Queue):  # fmt: skip
        self.options, self.partitions, self.results = options, partitions, results
        self.records = SpillWriter(Path(spill_root) / "records", partitions, f"w{number}")
        self.members = SpillWriter(Path(spill_root) / "members", partitions, f"w{number}")

    def spill_block(self, task: ReadTask, block: bytes, index: int,
                    leading: int) -> tuple | None:  # fmt: skip
        """Parse and spill one FASTA block, numbering its records from 1; report and return its
        (leading, records, lines). None: a record is bad (the caller words the error with the
        true numbers)."""
        options = self.options
        report, lengths = ReadReport(), Counter()
        try:
            table = parse_block_table(task.path, block, 1, 1, options.read_policy, report)
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
        self.records.add(lo % self.partitions, table)
        residues = pc.utf8_length(table["sequence"]).to_numpy()
        # frexp's exponent is the bit length of a positive integer
        bins, counts = np.unique(np.frexp(residues)[1], return_counts=True)
        lengths.update(dict(zip(bins.tolist(), counts.tolist(), strict=True)))
        counted = (leading, report.records + sum(report.skipped.values()), block.count(b"\n"))
        self.results.put(BlockRead((task.input_index, index), counted, len(block), report,
                                   lengths, task.buffer))  # fmt: skip
        return counted

    def spill_members(self, task: ReadTask) -> None:
        table, report = membership_table(task.path, task.block, task.number)
        hi, lo = key_hashes(self.options.seed, table["member"])
        table = table.append_column("hi", pa.array(hi)).append_column("lo", pa.array(lo))
        self.members.add(lo % self.partitions, table)
        self.results.put(BlockRead(None, None, len(task.block), report, Counter(), None))

    def read_input(self, task: ReadTask) -> None:
        """A whole input: this worker decompresses and cuts it too."""
        record, line = 1, 1
        with InputFile(task.path) as handle:
            for index, (block, leading) in enumerate(record_blocks(task.path, handle)):
                line += leading
                counted = self.spill_block(task, block, index, leading)
                if counted is None:
                    message = bad_block_message(self.options, task.path, block, record, line)
                    self.results.put(BadBlock((task.input_index, index), message))
                    return
                record, line = record + counted[1], line + counted[2]
            self.results.put(InputRead(task.input_index, handle.identity()))

    def close(self) -> None:
        self.records.close()
        self.members.close()


def read_worker(number: int, options: ShardOptions, partitions: int, spill_root: str,
                buffers: list, tasks: mp.Queue, results: mp.Queue, parent: int) -> None:  # fmt: skip
    exit_with_parent(parent)  # a killed main process leaves no worker writing on
    worker = _Worker(number, options, partitions, spill_root, results)
    try:
        while (task := tasks.get()) is not None:
            if task.buffer is not None:
                task.block = bytes(memoryview(buffers[task.buffer]).cast("B")[: task.size])
            if task.kind == "members":
                worker.spill_members(task)
            elif task.kind == "fasta":
                if worker.spill_block(task, task.block, task.number, task.leading) is None:
                    results.put(BlockToReword((task.input_index, task.number), task.block,
                                              task.buffer, task.leading))  # fmt: skip
            else:
                worker.read_input(task)
        worker.close()
        results.put(WorkerDone(number))
    except (FastaError, ShardError) as exc:
        results.put(WorkerFailed(str(exc)))
    except BaseException as exc:  # report anything, then let the parent stop
        results.put(WorkerFailed(f"worker {number}: {type(exc).__name__}: {exc}"))


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


def membership_table(path: str, block: bytes, first_line: int) -> tuple[pa.Table, ReadReport]:
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


def bad_block_message(options: ShardOptions, path: str, block: bytes, record: int,
                       line: int) -> str:  # fmt: skip
    """The error of a block a read worker could not parse (its records numbered from 1),
    worded by the per-record parser with the block's true first record and line."""
    try:
        for _ in parse_block(path, block, record, line, options.read_policy):
            pass
    except FastaError as exc:
        return str(exc)
    return f"{path}: record {record} (line {line}) and after: a read worker failed on this block"


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


def numbered(records: pa.Table, work: Path) -> pa.Table:
    """Spilled records with their record number within their input (workers wrote it within
    their block)."""
    per_input = read_json(work / "stage1.json")["block_first_record"]
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


class _ReadStage:
    """The main process of stage 1: starts the workers, feeds them blocks (or whole inputs),
    collects their messages, and fails on the first error, a worker's death or — once every
    block before it is counted — the first bad record in input order."""

    def __init__(self, options: ShardOptions, partitions: int, spill: Path, workers: int):
        self.options = options
        context = mp.get_context("spawn")
        self.tasks: mp.Queue = context.Queue(maxsize=2 * workers)
        self.results: mp.Queue = context.Queue()
        # Blocks cut by the main process travel in shared buffers, not pickled through the task
        # pipe: the read stage went from 1.3 to 1.15 s per 200 MB with one worker.
        self.whole_inputs = _reads_whole_inputs(options, workers)
        self.buffers = [] if self.whole_inputs else [
            context.RawArray("B", BLOCK_BYTES + BUFFER_SLACK) for _ in range(2 * workers + 2)
        ]  # fmt: skip
        self.free = list(range(len(self.buffers)))
        arguments = (options, partitions, str(spill), self.buffers, self.tasks, self.results,
                     os.getpid())  # fmt: skip
        self.procs = [context.Process(target=read_worker, args=(i, *arguments), daemon=True)
                      for i in range(workers)]  # fmt: skip
        self.report, self.lengths = ReadReport(), Counter()
        self.progress = Progress("read")
        self.finished = 0
        # Per block: (lines before, records, lines).
        self.counted: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.unread: dict[tuple[int, int], bytes] = {}  # blocks with a bad record, to word
        self.bad: dict[tuple[int, int], str] = {}  # the same, already worded by a worker
        self.identities: dict[int, dict] = {}  # by input index; -1: the membership table

    def handle(self, message) -> None:
        if isinstance(message, WorkerFailed):
            raise ShardError(message.message)
        if isinstance(message, WorkerDone):
            self.finished += 1
        elif isinstance(message, InputRead):
            self.identities[message.index] = message.identity
        elif isinstance(message, BadBlock):
            self.bad[message.block] = message.message
        elif isinstance(message, BlockToReword):
            self.unread[message.block] = message.data
            self.free.extend([] if message.buffer is None else [message.buffer])
            # Its start is all that is needed of its counts.
            self.counted.setdefault(message.block, (message.leading, 0, 0))
        else:
            self.free.extend([] if message.buffer is None else [message.buffer])
            if message.block is not None:
                self.counted[message.block] = message.counted
            self.report.merge(message.report)
            self.lengths.update(message.lengths)
            self.progress.update(message.nbytes, message.report.records)

    def drain(self, wait: float) -> None:
        """Handle every message that arrives within `wait` seconds; fail on a worker's death."""
        while True:
            try:
                message = self.results.get(timeout=wait)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise ShardError(
                        f"a read worker died (exit code {dead[0].exitcode}); rerun the same "
                        "command to resume"
                    ) from None
                return
            wait = 0.0
            self.handle(message)

    def submit(self, task: ReadTask | None) -> None:
        if task is not None and task.kind == "fasta" and len(task.block) <= len(self.buffers[0]):
            while not self.free:
                self.drain(0.05)
            task.buffer, task.size = self.free.pop(), len(task.block)
            memoryview(self.buffers[task.buffer]).cast("B")[: task.size] = task.block
            task.block = b""
        while True:
            self.drain(0.0)
            if (self.bad or self.unread) and task is not None:
                raise _BadBlock
            try:
                self.tasks.put(task, timeout=0.2)
                return
            except queue.Full:
                continue

    def feed(self) -> None:
        """Every input (and the membership table) to the workers, in order."""
        options = self.options
        for index, path in enumerate(options.inputs):
            if self.whole_inputs:
                self.submit(ReadTask("file", index, path))
                continue
            with InputFile(path) as handle:
                for number, (block, leading) in enumerate(record_blocks(path, handle)):
                    self.submit(ReadTask("fasta", index, path, block, number, leading))
            self.identities[index] = handle.identity()
        if options.clusters:
            with InputFile(options.clusters) as handle:
                for block, line in _membership_blocks(handle):
                    self.submit(ReadTask("members", -1, options.clusters, block, line))
            self.identities[-1] = handle.identity()

    def run(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Read everything; (first record, first line) of every block."""
        for proc in self.procs:
            proc.start()
        try:
            with contextlib.suppress(_BadBlock):
                self.feed()
            for _ in self.procs:
                self.submit(None)
            while self.finished < len(self.procs):
                self.drain(0.2)
        finally:
            for proc in self.procs:
                if proc.is_alive() and self.finished < len(self.procs):
                    proc.kill()
                proc.join()
        starts = _block_starts(self.counted)
        for block, data in self.unread.items():
            self.bad[block] = bad_block_message(self.options, self.options.inputs[block[0]], data,
                                                *starts[block])  # fmt: skip
        if self.bad:  # the first bad block in input order among those read
            raise ShardError(self.bad[min(self.bad)])
        return starts


def read_stage(options: ShardOptions, partitions: int, work: Path, workers: int) -> dict:
    """Stage 1; what it read (identities of the inputs, each block's first record number,
    counts, length histogram), to be kept as `stage1.json`."""
    spill = work / "spill1"
    shutil.rmtree(spill, ignore_errors=True)
    stage = _ReadStage(options, partitions, spill, workers)
    starts = stage.run()
    elapsed = stage.progress.finish()
    report = stage.report
    if report.records == 0:
        raise ShardError(
            "no valid sequences in the inputs"
            + (f" (skipped: {dict(report.skipped)})" if report.skipped else "")
        )
    first_records = [[] for _ in options.inputs]
    for (index, _), (record, _) in sorted(starts.items()):
        first_records[index].append(record)
    return {
        "inputs": [stage.identities[index] for index in range(len(options.inputs))],
        "cluster_table": stage.identities.get(-1),
        "block_first_record": first_records,
        "read": report.to_dict(),
        "length_log2_histogram": {str(k): v for k, v in sorted(stage.lengths.items())},
        "seconds": elapsed,
    }

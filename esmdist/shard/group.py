"""Stage 3, group, per group partition: samples (a cluster with its members, or one sequence),
their split and order from the keyed hash of their group, written as one run per split — the
samples' texts back to back, their sizes and keys, their index rows — all as array operations."""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esmdist.data.format import split_indices, split_names
from esmdist.shard.join import unique_ids
from esmdist.shard.options import ShardError, ShardOptions
from esmdist.shard.read import numbered
from esmdist.shard.spill import read_partition
from esmdist.shard.tar import member_fasta
from esmdist.shard.work import GROUPED, RECORDS, RUN_COLUMNS, atomic_write, run_path


def _sorted_rows(options: ShardOptions, work: Path, part: int) -> tuple[pa.Table, Counter]:
    """The partition's rows split by split, samples in the order of their hash, a sample's
    members by id; and what was skipped on the way. Without clusters or --dedupe a record is
    its own group: its spill1 partition is already its group partition, so the id check
    happens here and stage 2 does not run."""
    if options.needs_join:
        table = read_partition(work / "spill2", part, GROUPED)
        split_of_row = split_indices(table["hi"].to_numpy(), options.splits)
        table = table.append_column("split", pa.array(split_of_row.astype(np.int8)))
        keys = ["split", "hi", "lo", "group", "id"]
        return table.take(pc.sort_indices(table, [(key, "ascending") for key in keys])), Counter()
    records = read_partition(work / "spill1" / "records", part, RECORDS)
    table, skipped = unique_ids(options, numbered(records, work))
    split_of_row = split_indices(table["hi"].to_numpy(), options.splits)
    return table.take(pa.array(np.argsort(split_of_row, kind="stable"))), skipped


def _group_starts(options: ShardOptions, table: pa.Table, skipped: Counter):
    """(rows, where each sample's rows start) — with --dedupe each repeat of a group's first
    sequence dropped and counted."""
    count = len(table)
    hi, lo = table["hi"].to_numpy(), table["lo"].to_numpy()
    starts_group = np.ones(count, dtype=bool)
    if count > 1:
        starts_group[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        if options.needs_join:
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
    return table, starts_group


@dataclass
class _Samples:
    """The partition's samples: their rows (members) and what each run needs of them."""

    table: pa.Table
    owner: np.ndarray
    """The sample of each row."""
    firsts: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    clusters: pa.Array
    lengths: np.ndarray
    texts: pa.Array
    text_offsets: np.ndarray
    sample_text: np.ndarray

    @classmethod
    def of(cls, options: ShardOptions, table: pa.Table, starts_group: np.ndarray) -> _Samples:
        count = len(table)
        hi, lo = table["hi"].to_numpy(), table["lo"].to_numpy()
        firsts = np.flatnonzero(starts_group)
        sample_hi, sample_lo = hi[firsts], lo[firsts]
        same_key = (sample_hi[1:] == sample_hi[:-1]) & (sample_lo[1:] >> 32 == sample_lo[:-1] >> 32)
        if same_key.any():
            raise ShardError("two groups share a 96-bit sample key; rerun with another --seed")
        texts = member_fasta(table["id"], table["sequence"])
        text_offsets = (
            np.frombuffer(texts.buffers()[1], dtype=np.int64)[: count + 1]
            if count
            else np.zeros(1, dtype=np.int64)
        )
        return cls(
            table, np.cumsum(starts_group) - 1, firsts, sample_hi, sample_lo,
            (table["group"] if options.clusters else table["id"]).take(pa.array(firsts)),
            pc.utf8_length(table["sequence"]).to_numpy(zero_copy_only=False), texts,
            text_offsets, np.diff(text_offsets[np.append(firsts, count)]),
        )  # fmt: skip


def _write_run(work: Path, part: int, split: str, samples: _Samples, first: int, end: int,
               row: int, row_end: int) -> None:  # fmt: skip
    """Samples [first, end) of the partition, rows [row, row_end), as split `split`'s run."""
    table, count = samples.table, len(samples.table)
    offsets = samples.text_offsets
    data = samples.texts.buffers()[2] if count else pa.py_buffer(b"")
    atomic_write(run_path(work, part, split, "fasta"),
                 data.slice(int(offsets[row]), int(offsets[row_end] - offsets[row])))  # fmt: skip
    local = samples.owner[row:row_end] - first  # the sample of each row, in this run
    lengths = samples.lengths[row:row_end]
    residues = np.bincount(local, weights=lengths, minlength=end - first)
    run = np.stack(
        [samples.sample_text[first:end], residues.astype(np.int64),
         np.bincount(local, minlength=end - first),
         samples.hi[first:end].view(np.int64), samples.lo[first:end].view(np.int64)], axis=1,
    )  # fmt: skip
    buffer = io.BytesIO()
    np.save(buffer, run.reshape(-1, len(RUN_COLUMNS)))
    atomic_write(run_path(work, part, split, "npy"), buffer.getvalue())
    rows = table.slice(row, row_end - row)
    index = pa.table({
        "id": rows["id"],
        "cluster": samples.clusters.slice(first, end - first).take(pa.array(local)),
        "length": pa.array(lengths.astype(np.int32)),
        "input": rows["input"],
        "record": rows["record"],
        "sample": pa.array(local.astype(np.int64)),
    })  # fmt: skip
    staged = run_path(work, part, split, "arrow.partial")
    with pa.OSFile(str(staged), "wb") as sink, pa.ipc.new_file(sink, index.schema) as out:
        out.write_table(index)
    os.replace(staged, run_path(work, part, split, "arrow"))


def group_partition(options: ShardOptions, work: str, part: int) -> dict:
    """Samples of one partition: grouped, split and ordered by their hash, written as one run
    per split (the samples' texts, their sizes and keys, their index rows)."""
    work_path = Path(work)
    table, skipped = _sorted_rows(options, work_path, part)
    table, starts_group = _group_starts(options, table, skipped)
    samples = _Samples.of(options, table, starts_group)
    split_of = split_indices(samples.hi, options.splits)
    # Splits are contiguous: samples [first, end) and their rows [row, row_end) of each.
    sample_bounds = np.searchsorted(split_of, np.arange(len(options.splits) + 2))
    row_bounds = np.append(samples.firsts, len(table))[sample_bounds]
    (work_path / "runs").mkdir(exist_ok=True)
    counts = {}
    for number, split in enumerate(split_names(options.splits)):
        first, end = int(sample_bounds[number]), int(sample_bounds[number + 1])
        _write_run(work_path, part, split, samples, first, end, int(row_bounds[number]),
                   int(row_bounds[number + 1]))  # fmt: skip
        counts[split] = end - first
    return {"skipped": dict(skipped), "samples": counts}

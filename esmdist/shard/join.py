"""Stage 2, join (only with `--clusters` or `--dedupe`), per id partition: ids made unique,
each record's group key (its cluster, or its sequence digest with `--dedupe`), and the records
spilled again by a hash of that key."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esmdist.data.format import key_hashes
from esmdist.shard.options import ShardError, ShardOptions
from esmdist.shard.read import numbered
from esmdist.shard.spill import SpillWriter, read_partition
from esmdist.shard.work import MEMBERS, RECORDS


def in_input_order(records: pa.Table, rows: np.ndarray) -> np.ndarray:
    """`rows` of `records` sorted by (input, record number)."""
    inputs, numbers = records["input"].to_numpy()[rows], records["record"].to_numpy()[rows]
    return rows[np.lexsort((numbers, inputs))]


def unique_ids(options: ShardOptions, records: pa.Table) -> tuple[pa.Table, Counter]:
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
        rows = in_input_order(records, np.union1d(by_hash[1:][repeat], by_hash[:-1][repeat]))
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


def join_partition(options: ShardOptions, partitions: int, work: str, part: int) -> dict:
    """Ids made unique, the group key of each record (its cluster, or its sequence digest with
    `--dedupe`), records spilled again by a hash of the group key."""
    work_path = Path(work)
    records = numbered(read_partition(work_path / "spill1" / "records", part, RECORDS), work_path)
    records, skipped = unique_ids(options, records)
    if options.clusters:
        members = read_partition(work_path / "spill1" / "members", part, MEMBERS)
        groups = _cluster_of(options, members, records)
        # Table lines naming a member that no input holds (a table of a larger database).
        absent = pc.invert(pc.is_in(members["member"], value_set=records["id"].combine_chunks()))
        if absent_count := int(pc.sum(absent).as_py() or 0):
            skipped["cluster_member_without_sequence"] += absent_count
        missing = groups.is_null().to_numpy(zero_copy_only=False)
        if missing.any():
            row = int(in_input_order(records, np.flatnonzero(missing))[0])
            if options.on_missing_member == "error":
                raise ShardError(
                    f"{options.inputs[records['input'][row].as_py()]}: record "
                    f"{records['record'][row].as_py()}: sequence {records['id'][row].as_py()!r} "
                    f"is not in the cluster table {options.clusters} (looked up by that id: "
                    "UniProt sp|ACC|NAME headers by the accession, other headers by their first "
                    "word; shards/README.md 'Record ids'). Use --on-missing-member skip to "
                    "leave such sequences out"
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

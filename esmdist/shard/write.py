"""Stage 4, shards: each split's runs cut into shards by size or sample count (the plan is made
once and kept for resumes), each shard's tar assembled from the runs, hashed and written, then
published with its index; and the shard table."""

from __future__ import annotations

import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmdist.data.format import SHARD_TABLE, sample_keys, split_names
from esmdist.shard.options import ShardOptions
from esmdist.shard.tar import TAR_BLOCK, binary_array, member_bytes, tar_end, tar_members
from esmdist.shard.work import atomic_write, read_json, run_path
from esmdist.storage import Store

WRITE_CHUNK = 16 << 20


@dataclass
class ShardPlan:
    name: str
    split: str
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (partition, start, end)


def plan_shards(options: ShardOptions, partitions: int, work: Path) -> list[ShardPlan]:
    """Each split's runs, partition after partition, cut into shards: every `shard_samples`
    samples, or greedily while the tar stays within `shard_bytes` (at least one sample)."""
    plans: list[ShardPlan] = []
    for split in split_names(options.splits):
        runs = [np.load(run_path(work, part, split, "npy")) for part in range(partitions)]
        run_starts = np.cumsum([0] + [len(run) for run in runs])
        sizes = np.concatenate([member_bytes(run) for run in runs])
        total = len(sizes)
        if options.shard_samples:
            cuts = [*range(0, total, options.shard_samples), total]
        else:
            before = np.concatenate([[0], np.cumsum(sizes)])
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


def write_shard(options: ShardOptions, work: str, plan: ShardPlan) -> dict:
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
            whole = np.load(run_path(work_path, part, plan.split, "npy"))
            run = whole[start:end]
            offsets = np.concatenate([[0], np.cumsum(whole[:, 0])])
            with pa.memory_map(str(run_path(work_path, part, plan.split, "fasta"))) as texts:
                data = texts.read_at(int(offsets[end] - offsets[start]), int(offsets[start]))
            keys = sample_keys(run[:, 3].view(np.uint64), run[:, 4].view(np.uint64))
            names = np.concatenate([keys, np.repeat(suffix, len(run), axis=0)], axis=1)
            tar, _ = tar_members(
                names, binary_array(offsets[start : end + 1] - offsets[start], data)
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
            with pa.memory_map(str(run_path(work_path, part, plan.split, "arrow"))) as source:
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


def kept_shard_plans(options: ShardOptions, partitions: int, work: Path) -> list[ShardPlan]:
    """The shard plan, made once and kept: on a resume, runs of finished shards are gone."""
    saved = read_json(work / "shards.json")
    if saved is None:
        plans = plan_shards(options, partitions, work)
        atomic_write(work / "shards.json", json.dumps([asdict(plan) for plan in plans]).encode())
        return plans
    return [ShardPlan(plan["name"], plan["split"], [tuple(piece) for piece in plan["pieces"]])
            for plan in saved]  # fmt: skip


def write_shard_table(store: Store, rows: list[dict], work: Path) -> None:
    table = pa.Table.from_pylist(rows)
    local = work / "tmp" / SHARD_TABLE
    local.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, local)
    store.publish(local, SHARD_TABLE)

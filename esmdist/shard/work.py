"""The work directory of a sharding run: the schemas of its spill files and runs, where runs
live, atomic writes, and publishing finished files to the output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from esmdist.storage import Store

# Spilled rows. `hi`/`lo`: the two 64-bit lanes of `key_hashes(seed, key)` — of the id in
# spill1 records, of the group key in spill2 — which give the partition (`lo % P`), the split
# and order (`hi`, `lo`) and the sample key (`hi` and the top 32 bits of `lo`).
# The read workers number records within their block (`block`, `record` counting from 1
# there), so that the main process only cuts blocks; `numbered` turns that into the record
# number within the input once all blocks are counted.
NUMBERED = pa.schema([("id", pa.string()), ("sequence", pa.string()), ("input", pa.int16()),
                      ("record", pa.int64()), ("hi", pa.uint64()), ("lo", pa.uint64())])  # fmt: skip


RECORDS = NUMBERED.append(pa.field("block", pa.int32()))


GROUPED = NUMBERED.append(pa.field("group", pa.string()))


MEMBERS = pa.schema([("member", pa.string()), ("cluster", pa.string()), ("line", pa.int64()),
                     ("hi", pa.uint64()), ("lo", pa.uint64())])  # fmt: skip


# A run (one partition's samples of one split, in order) holds the samples' texts back to back
# (`.fasta`), their index rows (`.arrow`) and these int64 columns per sample (`.npy`).
RUN_COLUMNS = ("text_bytes", "residues", "members", "hi", "lo")


def run_path(work: Path, part: int, split: str, suffix: str) -> Path:
    return work / "runs" / f"q{part:05d}.{split}.{suffix}"


def atomic_write(path: Path, data) -> None:
    staged = path.with_name(path.name + ".partial")
    with open(staged, "wb") as out:
        out.write(data)
    os.replace(staged, path)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def publish_bytes(store: Store, data: bytes, name: str, work: Path) -> None:
    staged = work / "tmp" / name.replace("/", "_")
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(data)
    store.publish(staged, name)


def remove_partition(roots: list[Path], part: int) -> None:
    for root in roots:
        shutil.rmtree(root / f"p{part:05d}", ignore_errors=True)

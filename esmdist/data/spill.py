"""Hash-partitioned spill files: the out-of-core shuffle behind the sharder.

Each writer (one per process and stage) appends pickled frames of items to one file per
partition, `ROOT/pNNNNN/WRITER.spill`. Readers load one partition — a bounded fraction of the
data — at a time. Items carry their own provenance (input, record number), so a reader
restores a deterministic order by sorting, whatever process wrote them and when.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

_FRAME = struct.Struct("<Q")


class SpillWriter:
    def __init__(self, root: Path, partitions: int, writer: str, flush_bytes: int = 256 << 10):
        self.root = root
        self.writer = writer
        self.flush_bytes = flush_bytes
        self._items: list[list[Any]] = [[] for _ in range(partitions)]
        self._sizes = [0] * partitions

    def add(self, partition: int, item: tuple, size: int) -> None:
        self._items[partition].append(item)
        self._sizes[partition] += size
        if self._sizes[partition] >= self.flush_bytes:
            self._flush(partition)

    def _flush(self, partition: int) -> None:
        if not self._items[partition]:
            return
        folder = self.root / f"p{partition:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        frame = pickle.dumps(self._items[partition], protocol=pickle.HIGHEST_PROTOCOL)
        with open(folder / f"{self.writer}.spill", "ab") as out:
            out.write(_FRAME.pack(len(frame)) + frame)
        self._items[partition] = []
        self._sizes[partition] = 0

    def close(self) -> None:
        for partition in range(len(self._items)):
            self._flush(partition)


def remove_writer(root: Path, writer: str) -> None:
    """Delete everything `writer` spilled (before redoing its work after a crash)."""
    for path in root.glob(f"p*/{writer}.spill"):
        path.unlink()


def read_partition(root: Path, partition: int) -> list[Any]:
    """All items spilled to `partition`, in no particular order."""
    items: list[Any] = []
    for path in sorted((root / f"p{partition:05d}").glob("*.spill")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = _FRAME.unpack_from(data, offset)
            offset += _FRAME.size
            items.extend(pickle.loads(data[offset : offset + length]))
            offset += length
    return items

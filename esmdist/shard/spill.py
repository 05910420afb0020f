"""Hash-partitioned spill files: the out-of-core shuffle behind the sharder.

Each writer (one per process and stage) appends Arrow record batches to one file per
partition, `ROOT/pNNNNN/WRITER.spill`, as length-prefixed Arrow IPC streams (columnar: no
per-row serialisation). Readers load one partition — a bounded fraction of the data — at a
time. Rows carry their own provenance (input, record number), so a reader restores a
deterministic order by sorting, whatever process wrote them and when.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow as pa

_FRAME = struct.Struct("<Q")


class SpillWriter:
    def __init__(self, root: Path, partitions: int, writer: str, flush_bytes: int = 256 << 10):
        self.root = root
        self.writer = writer
        self.flush_bytes = flush_bytes
        self._pending: list[list[pa.Table]] = [[] for _ in range(partitions)]
        self._sizes = [0] * partitions

    def add(self, partitions: np.ndarray, table: pa.Table) -> None:
        """Append row i of `table` to partition `partitions[i]`."""
        order = np.argsort(partitions, kind="stable")
        ordered = table.take(pa.array(order))
        bounds = np.searchsorted(partitions[order], np.arange(len(self._pending) + 1))
        for partition in np.flatnonzero(np.diff(bounds)).tolist():
            piece = ordered.slice(bounds[partition], bounds[partition + 1] - bounds[partition])
            self._pending[partition].append(piece)
            self._sizes[partition] += piece.nbytes
            if self._sizes[partition] >= self.flush_bytes:
                self._flush(partition)

    def _flush(self, partition: int) -> None:
        if not self._pending[partition]:
            return
        table = pa.concat_tables(self._pending[partition]).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table)
        frame = sink.getvalue()
        folder = self.root / f"p{partition:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{self.writer}.spill", "ab") as out:
            out.write(_FRAME.pack(frame.size))
            out.write(frame)
        self._pending[partition] = []
        self._sizes[partition] = 0

    def close(self) -> None:
        for partition in range(len(self._pending)):
            self._flush(partition)


def remove_writer(root: Path, writer: str) -> None:
    """Delete everything `writer` spilled (before redoing its work after a crash)."""
    for path in root.glob(f"p*/{writer}.spill"):
        path.unlink()


def read_partition(root: Path, partition: int, schema: pa.Schema) -> pa.Table:
    """All rows spilled to `partition`, in no particular order (empty: `schema`, no rows)."""
    tables = [schema.empty_table()]
    for path in sorted((root / f"p{partition:05d}").glob("*.spill")):
        with pa.memory_map(str(path)) as source:  # read in place: no copy, no fresh memory
            data = source.read_buffer()
        offset = 0
        while offset < data.size:
            (length,) = _FRAME.unpack_from(data, offset)
            offset += _FRAME.size
            tables.append(pa.ipc.open_stream(data.slice(offset, length)).read_all())
            offset += length
    return pa.concat_tables(tables).combine_chunks()

"""Tar members built as array operations: the bytes `tarfile` writes for every member of a
shard at once (tests hold the two equal), and each sample's size in the archive."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A tar member is a 512-byte header plus its data padded to 512 bytes.
TAR_BLOCK = 512


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


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII octal digits of non-negative `values`, zero-padded to `width`: uint8 [n, width]."""
    shifts = 3 * np.arange(width - 1, -1, -1)
    return (48 + ((values[:, None] >> shifts) & 7)).astype(np.uint8)


def binary_array(offsets: np.ndarray, data) -> pa.Array:
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
        return binary_array(np.arange(count + 1, dtype=np.int64) * matrix.shape[1], matrix)

    def constant(start: int, end: int) -> pa.Scalar:
        return pa.scalar(_HEADER[start:end].tobytes(), pa.large_binary())

    joined = pc.binary_join_element_wise(
        rows(names), constant(width, 124), rows(size_field), constant(136, 148),
        rows(checksum_field), constant(156, TAR_BLOCK), contents.cast(pa.large_binary()),
        binary_array(np.concatenate([[0], np.cumsum(pads)]), zeros),
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


def member_bytes(run: np.ndarray) -> np.ndarray:
    """Each sample's bytes in the tar: header plus content padded to whole blocks."""
    return TAR_BLOCK + -(-run[:, 0] // TAR_BLOCK) * TAR_BLOCK

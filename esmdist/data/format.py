"""The shard format's contract, written once — for the sharder that writes it (`esmdist.shard`)
and the loader that reads it (`esmdist.data.stream`); `shards/README.md` is its specification:

- the files: `{split}-NNNNNN.tar` (one `<key>.fasta` member per sample), `SHARD_TABLE`,
  `index/<shard>.parquet`, and `MANIFEST` written last;
- `FORMAT_VERSION` written, `SUPPORTED_FORMATS` read (version 1 differed only in hashing keys
  and splits with blake2b: same layout);
- `key_hashes`: the seeded two-lane hash of group keys that gives partition, split, order and
  sample key; `split_indices` the split rule; `sample_keys` the member names.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 2
SUPPORTED_FORMATS = (1, 2)


MANIFEST = "manifest.json"


SHARD_TABLE = "shards.parquet"


SHARD_NAME = re.compile(r"(?P<split>[a-z][a-z0-9_]*)-\d{6}\.tar")
"""What the sharder names a shard: `{split}-NNNNNN.tar`, in the dataset's own directory."""
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_shard_row(row: object, split: str, where: str) -> None:
    """ValueError naming `where` unless `row` of SHARD_TABLE is what the sharder writes: a
    shard of `split` named as above (nothing outside the dataset: no `/`, no `..`), a positive
    sample count, a byte size and a sha256 — neither missing, since a missing one would switch
    the check of the shard off."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row is not a record")
    name = row.get("name")
    found = SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
    if found is None or found["split"] != split:
        raise ValueError(f"{where}: shard name {name!r} is not '{split}-NNNNNN.tar' (a shard "
                         "of this split inside the dataset)")  # fmt: skip
    for key, low in (("samples", 1), ("bytes", 1)):
        value = row.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{where}: {name}: {key} {value!r} is not a count of at least {low}")
    if not isinstance(row.get("sha256"), str) or not SHA256.fullmatch(row["sha256"]):
        raise ValueError(f"{where}: {name}: sha256 {row.get('sha256')!r} is not 64 hex digits")


def read_parquet(source: bytes | str, columns: list[str] | None = None) -> pa.Table:
    """The one way esmdist reads parquet: from bytes in memory or a local path — never from a
    Python file object — and without pyarrow's reader threads. Handed a Python file object,
    pyarrow wraps it, and one of its scanner threads may drop the wrapper's last reference
    after the interpreter has begun to shut down: that thread then takes the GIL, Python ends
    it with pthread_exit, the unwinding crosses a C++ destructor and the process aborts
    ("terminate called without an active exception", exit -6) after its work is done —
    9 in 16 processes that opened a dataset, under load (core dumps: the thread is in
    arrow::py::PyReadableFile::~PyReadableFile)."""
    import pyarrow.parquet as pq

    readable = pa.BufferReader(source) if isinstance(source, bytes) else source
    return pq.read_table(readable, columns=columns, use_threads=False)


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

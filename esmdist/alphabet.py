"""The ESM vocabulary: 33 tokens in fair-esm's ESM-1b/ESM-2 order, with vectorised encoding.

Encoding runs a 256-entry byte lookup table over a numpy view of the ASCII sequence, so a
sequence of any length costs one table gather instead of a Python loop per residue. This is
what the sharder and the data pipeline call on every record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

# fair-esm's Alphabet.from_architecture("ESM-1b"): 4 prepended specials, 25 residue symbols
# (20 standard, then X B U Z O, then the gap-like '.' and '-'), padding to a multiple of 8,
# then <mask>. Indices are part of every checkpoint's meaning: never reorder.
TOKENS: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)  # fmt: skip

CLS = 0
PAD = 1
EOS = 2
UNK = 3
MASK = 32
VOCAB_SIZE = len(TOKENS)
STANDARD_RESIDUES = "LAGVSERTIDPKQNFYMHWC"
# Residue token ids (4..23) used for the "random residue" replacement of MLM masking.
STANDARD_RESIDUE_IDS = np.arange(4, 24, dtype=np.int64)
RESIDUE_SYMBOLS = "".join(TOKENS[4:31])

UnknownPolicy = Literal["error", "unk"]

_INVALID = 255
_LUT = np.full(256, _INVALID, dtype=np.uint8)
for _index, _symbol in enumerate(TOKENS[4:31], start=4):
    _LUT[ord(_symbol)] = _index


class UnknownResidueError(ValueError):
    """A sequence holds a character outside the ESM alphabet."""

    def __init__(self, sequence: str | bytes, position: int):
        char = sequence[position : position + 1]
        if isinstance(char, bytes):
            char = char.decode("latin-1")
        super().__init__(
            f"character {char!r} at position {position} is not in the ESM alphabet "
            f"(allowed: {RESIDUE_SYMBOLS})"
        )
        self.position = position
        self.char = char


def _as_bytes(sequence: str | bytes) -> bytes:
    if isinstance(sequence, bytes):
        return sequence
    try:
        return sequence.encode("ascii")
    except UnicodeEncodeError as exc:
        raise UnknownResidueError(sequence, exc.start) from None


def encode_residues(sequence: str | bytes, unknown: UnknownPolicy = "error") -> np.ndarray:
    """Residue token ids (uint8) of `sequence`, without <cls>/<eos>.

    `unknown="error"` raises UnknownResidueError naming the first bad position;
    `unknown="unk"` maps every character outside the alphabet to <unk> (id 3).
    """
    raw = _as_bytes(sequence)
    ids = _LUT[np.frombuffer(raw, dtype=np.uint8)]
    bad = ids == _INVALID
    if bad.any():
        if unknown == "error":
            raise UnknownResidueError(raw, int(np.argmax(bad)))
        ids = ids.copy()
        ids[bad] = UNK
    return ids


def encode(sequence: str | bytes, unknown: UnknownPolicy = "error") -> np.ndarray:
    """Token ids (int64) of `<cls> sequence <eos>`, as fair-esm's BatchConverter makes them."""
    residues = encode_residues(sequence, unknown)
    out = np.empty(len(residues) + 2, dtype=np.int64)
    out[0] = CLS
    out[1:-1] = residues
    out[-1] = EOS
    return out


def batch_encode(sequences: Sequence[str | bytes], unknown: UnknownPolicy = "error") -> np.ndarray:
    """A padded [B, max_len + 2] int64 array of `<cls> seq <eos> <pad>...` rows."""
    encoded = [encode(s, unknown) for s in sequences]
    width = max((len(e) for e in encoded), default=2)
    out = np.full((len(encoded), width), PAD, dtype=np.int64)
    for row, ids in enumerate(encoded):
        out[row, : len(ids)] = ids
    return out


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """The residue string of token ids; special tokens other than <mask>/<unk> are dropped."""
    return "".join(TOKENS[int(i)] for i in ids if int(i) not in (CLS, PAD, EOS))

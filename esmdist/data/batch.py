"""From sequences to model input: crop, MLM masking and token-budget packing.

A packed micro-batch is one flat token tensor holding whole `<cls> seq <eos>` sequences back to
back, `cu_seqlens` (cumulative lengths), and the masked-LM targets at the selected positions —
no padding anywhere. `PackedBatch.to_padded()` gives the [B, L] layout for comparison and for
code that needs it (attention maps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from esmdist import alphabet
from esmdist.ranges import bounded, check_fields


@dataclass(frozen=True)
class MaskingConfig:
    """BERT/ESM masking; `DataConfig` (the `[data]` section) is one, so the keys are
    `data.mask_probability` and so on."""

    mask_probability: float = bounded(0.15, 0.0, 1.0, low_open=True, high_open=True)
    """Fraction of residues selected for prediction."""
    mask_fraction: float = bounded(0.8, 0.0, 1.0)
    """Of those, replaced by <mask>…"""
    random_fraction: float = bounded(0.1, 0.0, 1.0)
    """…or by a random standard residue; the rest keep their token."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("data.mask_fraction + data.random_fraction must not exceed 1")


def crop(residues: np.ndarray, crop_length: int, start_fraction: float) -> np.ndarray:
    """A window of `crop_length - 2` residues (room for <cls>/<eos>) when the sequence is longer,
    starting at `start_fraction` (uniform in [0, 1)) of the possible starts, as ESM trains."""
    room = crop_length - 2
    if len(residues) <= room:
        return residues
    start = int(start_fraction * (len(residues) - room + 1))
    return residues[start : start + room]


def with_specials(residues: np.ndarray) -> np.ndarray:
    out = np.empty(len(residues) + 2, dtype=np.int64)
    out[0], out[1:-1], out[-1] = alphabet.CLS, residues, alphabet.EOS
    return out


def mask_tokens(
    tokens: np.ndarray, config: MaskingConfig, draws: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT/ESM masking over a whole flat batch at once, from `draws`: uniform [0, 1) numbers,
    shape [3, T] (selection, action, random residue).

    Returns (input tokens, selected positions as bool, targets at the selected positions).
    Special tokens are never selected; at least one residue is, so every batch has a loss.
    """
    residue = tokens >= 4
    selected = residue & (draws[0] < config.mask_probability)
    if not selected.any():
        candidates = np.flatnonzero(residue)
        if not len(candidates):
            raise ValueError("a batch without any residue token: nothing to predict")
        selected[candidates[int(draws[1][0] * len(candidates))]] = True
    targets = tokens[selected]
    inputs = tokens.copy()
    action = draws[1][selected]
    replaced = np.where(action < config.mask_fraction, alphabet.MASK, targets)
    random = (action >= config.mask_fraction) & (
        action < config.mask_fraction + config.random_fraction
    )
    random_ids = alphabet.STANDARD_RESIDUE_IDS[
        (draws[2][selected] * len(alphabet.STANDARD_RESIDUE_IDS)).astype(np.int64)
    ]
    inputs[selected] = np.where(random, random_ids, replaced)
    return inputs, selected, targets


@dataclass
class PackedBatch:
    tokens: Tensor
    """[T] int64 input tokens (masked)."""
    cu_seqlens: Tensor
    """[B + 1] int32 cumulative sequence lengths."""
    selected: Tensor
    """[T] bool: positions whose original token is predicted."""
    targets: Tensor
    """[M] int64 original tokens at the selected positions (M = selected.sum())."""

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.tokens, self.cu_seqlens, self.selected, self.targets

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy on `device`; from pinned memory (`pin_memory`) the copy does not wait."""
        return PackedBatch(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def masked_positions(self, device: torch.device | str) -> Tensor:
        """int64 [M] positions of `selected`, made on the host and copied to `device` (through
        pinned memory for a GPU, so that the copy does not wait)."""
        positions = self.selected.nonzero().squeeze(1)
        if torch.device(device).type == "cuda":
            positions = positions.pin_memory()
        return positions.to(device, non_blocking=True)

    def pin_memory(self) -> PackedBatch:
        """A copy in page-locked host memory (the DataLoader calls this with pin_memory=True)."""
        return PackedBatch(*(t.pin_memory() for t in self._tensors()))

    def to_padded(self) -> tuple[Tensor, Tensor]:
        """(tokens [B, L] padded with <pad>, selected [B, L]) of the same sequences."""
        lengths = self.cu_seqlens.diff().tolist()
        width = max(lengths)
        tokens = torch.full((len(lengths), width), alphabet.PAD, dtype=self.tokens.dtype)
        selected = torch.zeros((len(lengths), width), dtype=torch.bool)
        for row, (start, length) in enumerate(zip(self.cu_seqlens[:-1].tolist(), lengths)):
            tokens[row, :length] = self.tokens[start : start + length]
            selected[row, :length] = self.selected[start : start + length]
        return tokens, selected


def pack(sequences: list[np.ndarray], config: MaskingConfig, draws: np.ndarray) -> PackedBatch:
    """One packed, masked batch of `sequences` (each already `<cls> … <eos>`); `draws` as for
    `mask_tokens`."""
    tokens = np.concatenate(sequences)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    cu_seqlens = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    inputs, selected, targets = mask_tokens(tokens, config, draws)
    return PackedBatch(
        torch.from_numpy(inputs),
        torch.from_numpy(cu_seqlens),
        torch.from_numpy(selected),
        torch.from_numpy(targets),
    )

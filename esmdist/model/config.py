"""Model hyper-parameters and the one registry of named sizes.

Sizes follow the published checkpoints: ESM-2 (Lin et al. 2023, fair-esm `esm2_t*`), ESM-1b
(Rives et al. 2021, `esm1b_t33_650M_UR50S`). `debug` is a tiny model for CPU tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from esmdist import alphabet

Arch = Literal["esm2", "esm1b"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one ESM model."""

    arch: Arch = "esm2"
    """`esm2`: rotary attention, no embedding LayerNorm. `esm1b`: learned absolute positions
    (with fair-esm's padding offset) and a LayerNorm on the embeddings."""
    num_layers: int = 6
    embed_dim: int = 320
    attention_heads: int = 20
    ffn_embed_dim: int | None = None
    """Feed-forward width; None means 4 × embed_dim, as every published ESM model has."""
    token_dropout: bool = True
    """Zero <mask> embeddings and rescale by (1 − 0.15·0.8)/(1 − observed mask ratio)."""
    max_positions: int = 1024
    """ESM-1b: size of the learned position table (inputs longer than this are an error).
    ESM-2: the crop length it was trained with (rotary has no hard limit)."""
    layer_norm_eps: float = 1e-5
    rotary_base: float = 10000.0
    vocab_size: int = alphabet.VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.arch not in ("esm2", "esm1b"):
            raise ValueError(f"model.arch must be 'esm2' or 'esm1b', got {self.arch!r}")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by "
                f"model.attention_heads ({self.attention_heads})"
            )
        if (self.embed_dim // self.attention_heads) % 2:
            raise ValueError("model head dim (embed_dim / attention_heads) must be even for rotary")
        if self.ffn_embed_dim == 4 * self.embed_dim:
            # One spelling per architecture, so configs read from different formats compare equal.
            object.__setattr__(self, "ffn_embed_dim", None)

    @property
    def ffn_dim(self) -> int:
        return self.ffn_embed_dim or 4 * self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shapes (the contact regression included)."""
        e, f = self.embed_dim, self.ffn_dim
        per_layer = 4 * (e * e + e) + (e * f + f) + (f * e + e) + 2 * 2 * e
        total = self.num_layers * per_layer
        total += 2 * e  # emb_layer_norm_after
        total += e * e + e + 2 * e + self.vocab_size  # LM head: dense, LayerNorm, bias
        total += self.num_layers * self.attention_heads + 1  # contact regression
        if self.arch == "esm1b":
            total += 2 * e  # emb_layer_norm_before
            if include_embeddings:
                total += (self.max_positions + alphabet.PAD + 1) * e
        if include_embeddings:
            total += self.vocab_size * e
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)


MODEL_SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig(num_layers=2, embed_dim=64, attention_heads=4),
    "esm2_8M": ModelConfig(num_layers=6, embed_dim=320, attention_heads=20),
    "esm2_35M": ModelConfig(num_layers=12, embed_dim=480, attention_heads=20),
    "esm2_150M": ModelConfig(num_layers=30, embed_dim=640, attention_heads=20),
    "esm2_650M": ModelConfig(num_layers=33, embed_dim=1280, attention_heads=20),
    "esm2_3B": ModelConfig(num_layers=36, embed_dim=2560, attention_heads=40),
    "esm2_15B": ModelConfig(num_layers=48, embed_dim=5120, attention_heads=40),
    "esm1b_650M": ModelConfig(
        arch="esm1b", num_layers=33, embed_dim=1280, attention_heads=20, ffn_embed_dim=5120
    ),
}


def model_config(name: str) -> ModelConfig:
    """The registered size `name`, with the list of valid names in the error."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        raise KeyError(
            f"unknown model size {name!r}; known sizes: {', '.join(MODEL_SIZES)}"
        ) from None

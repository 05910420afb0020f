"""Model hyper-parameters and the one registry of named sizes.

Sizes follow the published checkpoints: ESM-2 (Lin et al. 2023, fair-esm `esm2_t*`), ESM-1b
(Rives et al. 2021, `esm1b_t33_650M_UR50S`). `debug` is a tiny model for CPU tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from esmdist import alphabet
from esmdist.ranges import bounded, check_fields

Arch = Literal["esm2", "esm1b"]
MAX_PARAMETERS = 10**12


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one ESM model."""

    arch: Arch = "esm2"
    """`esm2`: rotary attention, no embedding LayerNorm. `esm1b`: learned absolute positions
    (with fair-esm's padding offset) and a LayerNorm on the embeddings."""
    # Bounds far past every published ESM (15B: 48 layers × 5,120), short of what would take
    # hours to build or terabytes to hold: a file asking for more is forged or mistaken.
    num_layers: int = bounded(6, 1, 1024)
    embed_dim: int = bounded(320, 2, 65536)
    attention_heads: int = bounded(20, 1, 4096)
    ffn_embed_dim: int | None = bounded(None, 1, 1 << 20)
    """Feed-forward width; None means 4 × embed_dim, as every published ESM model has."""
    token_dropout: bool = True
    """Zero <mask> embeddings and rescale by (1 − 0.15·0.8)/(1 − observed mask ratio)."""
    max_positions: int = bounded(1024, 3, 1 << 20)
    """ESM-1b: size of the learned position table (inputs longer than this are an error).
    ESM-2: the crop length it was trained with (rotary has no hard limit)."""
    layer_norm_eps: float = bounded(1e-5, 0.0, 0.1, low_open=True)
    rotary_base: float = bounded(10000.0, 1.0, 1e12, low_open=True)
    vocab_size: int = bounded(alphabet.VOCAB_SIZE, alphabet.VOCAB_SIZE, alphabet.VOCAB_SIZE)
    """The ESM alphabet's 33 tokens: the only vocabulary esmdist's data and heads know."""

    def __post_init__(self) -> None:
        if self.arch not in ("esm2", "esm1b"):
            raise ValueError(f"model.arch must be 'esm2' or 'esm1b', got {self.arch!r}")
        self._check_values()
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

    def _check_values(self) -> None:
        """Every field's type and range, naming the key — whatever the config came from (a run
        config, a checkpoint's config.json, a Hugging Face or fair-esm file): checked before
        anything is built or allocated, so a forged file asking for 10⁶ layers is an error,
        not half an hour of building and an out-of-memory kill."""
        check_fields(self, "model")
        if not isinstance(self.token_dropout, bool):
            raise ValueError(
                f"model.token_dropout must be true or false, got {self.token_dropout!r}"
            )
        if self.num_params() > MAX_PARAMETERS:
            raise ValueError(f"model: {self.num_params():.3g} parameters is past the "
                             f"{MAX_PARAMETERS:.0e} esmdist builds (ESM-2 15B has 1.5e10)")  # fmt: skip

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model's state dict and its shape, from the config alone (no
        module is built): what a file's tensors are checked against before any is loaded."""
        e, f, v = self.embed_dim, self.ffn_dim, self.vocab_size
        norm = {"weight": (e,), "bias": (e,)}
        shapes = {"embed_tokens.weight": (v, e)}
        if self.arch == "esm1b":
            shapes["embed_positions.weight"] = (self.max_positions + alphabet.PAD + 1, e)
            shapes.update({f"emb_layer_norm_before.{k}": s for k, s in norm.items()})
        block = {**{f"self_attn_layer_norm.{k}": s for k, s in norm.items()},
                 **{f"self_attn.{p}.{k}": s for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                    for k, s in {"weight": (e, e), "bias": (e,)}.items()},
                 **{f"final_layer_norm.{k}": s for k, s in norm.items()},
                 "fc1.weight": (f, e), "fc1.bias": (f,), "fc2.weight": (e, f), "fc2.bias": (e,)}  # fmt: skip
        for layer in range(self.num_layers):
            shapes.update({f"layers.{layer}.{k}": s for k, s in block.items()})
        shapes.update({f"emb_layer_norm_after.{k}": s for k, s in norm.items()})
        shapes.update({"lm_head.bias": (v,), "lm_head.dense.weight": (e, e),
                       "lm_head.dense.bias": (e,), "lm_head.layer_norm.weight": (e,),
                       "lm_head.layer_norm.bias": (e,),
                       "contact_head.regression.weight": (1, self.num_layers * self.attention_heads),
                       "contact_head.regression.bias": (1,)})  # fmt: skip
        return shapes

    def check_shapes(self, found: dict[str, tuple[int, ...]], where: str,
                     unexpected_ok: bool = False) -> None:  # fmt: skip
        """ValueError naming `where` unless `found` (tensor name → shape, from a file's header)
        holds every tensor of this architecture in its shape (and, unless `unexpected_ok`,
        nothing else)."""
        wanted = self.parameter_shapes()
        differ = sorted(k for k in wanted if k in found and tuple(found[k]) != wanted[k])
        missing = sorted(set(wanted) - set(found))
        unexpected = [] if unexpected_ok else sorted(set(found) - set(wanted))
        if differ or missing or unexpected:
            details = [f"{k}: stored {tuple(found[k])}, the config gives {wanted[k]}"
                       for k in differ[:3]]  # fmt: skip
            details += [f"{k}: not stored" for k in missing[:3]]
            details += [f"{k}: stored, not in the model" for k in unexpected[:3]]
            more = len(differ) + len(missing) + len(unexpected) - len(details)
            raise ValueError(f"{where}: the config does not describe the tensors stored "
                             f"({'; '.join(details)}{f'; {more} more' if more > 0 else ''})")  # fmt: skip

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

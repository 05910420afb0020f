"""Self-attention for ESM models: rotary embeddings and the dispatch between fused and explicit
attention.

The training path never materialises the L×L probabilities:
- padded batches: `torch.nn.functional.scaled_dot_product_attention` with a key-padding mask
  (flash / cuDNN / memory-efficient kernels on GPU, the flash kernel on CPU);
- packed batches on GPU in bf16/fp16: `torch.nn.attention.varlen.varlen_attn` (flash attention
  over variable-length sequences given by `cu_seqlens`: no mask, no padding, no T×T work);
- packed batches elsewhere (CPU, fp32, torch < 2.9): SDPA on each sequence of the pack in turn
  (its slice of q/k/v, no mask): work Σ Lᵢ², as a padded batch without the padding. A
  block-diagonal mask over the whole pack would cost T² — on CPU that made a 4,096-token
  micro-batch slower than Hugging Face's padded one (issue 16).
Only `need_weights=True` — the contact and attention-map path — computes softmax(QKᵀ)
explicitly so it can return it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None

VARLEN_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class PackedSpans:
    """Where the sequences of a packed [1, T] batch start and end (attention stays inside)."""

    cu_seqlens: Tensor
    """int32 [N+1], cumulative sequence lengths."""
    max_seqlen: int
    lengths: list[int]
    """The N sequence lengths on the host (read once per batch), to slice the pack by."""

    @staticmethod
    def usable(device: torch.device) -> bool:
        """Whether the variable-length flash kernel exists for tensors on `device`."""
        return varlen_attn is not None and device.type == "cuda"


@torch.compiler.disable
def attend_per_sequence(q: Tensor, k: Tensor, v: Tensor, packed: PackedSpans) -> Tensor:
    """SDPA of each sequence of a packed [1, H, T, D] batch on its own; [1, H, T, D]. Left out
    of torch.compile, and handed the spans whole: traced, every batch's number of sequences
    would be a new graph."""
    lengths = packed.lengths
    pieces = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
    return torch.cat([F.scaled_dot_product_attention(*piece) for piece in pieces], dim=2)


def rotary_cos_sin(
    positions: Tensor, head_dim: int, base: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, L, 1, head_dim] (fp32) for integer `positions` [B, L].

    Same frequencies and layout as fair-esm's RotaryEmbedding (the two halves of the head dim
    share a frequency); computed from explicit positions so that packed sequences restart at 0.
    """
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rotated = x.float() * cos + _rotate_half(x.float()) * sin
    return rotated.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (ESM's layout)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self,
        x: Tensor,
        attend: Tensor | PackedSpans | None,
        rotary: tuple[Tensor, Tensor] | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: [B, L, E]. attend: a boolean mask broadcastable to [B, H, L, L], True where a
        query may attend to a key; the `PackedSpans` of a packed batch (B = 1); or None,
        everything attends to everything.

        Returns the output [B, L, E] and, with `need_weights`, the probabilities [B, H, L, L].
        """
        batch, length, embed = x.shape
        split = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(split)
        k = self.k_proj(x).view(split)
        v = self.v_proj(x).view(split)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)

        packed = attend if isinstance(attend, PackedSpans) else None
        if packed is not None and q.dtype in VARLEN_DTYPES and PackedSpans.usable(q.device):
            spans = (packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen)
            out = varlen_attn(q[0], k[0], v[0], *spans)
            return self.out_proj(out.reshape(batch, length, embed)), None
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        weights = None
        if packed is not None:
            out = attend_per_sequence(q, k, v, packed)
        elif need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-1, -2)
            if attend is not None:
                scores = scores.masked_fill(~attend, float("-inf"))
            weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        out = out.transpose(1, 2).reshape(batch, length, embed)
        return self.out_proj(out), weights

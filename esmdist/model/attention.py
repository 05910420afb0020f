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
    """cos/sin tables [B, L, 1, head_dim / 2] (fp32) for integer `positions` [B, L].

    fair-esm's RotaryEmbedding frequencies: the two halves of the head dim share one, so half
    a table is the whole of it. Computed from explicit positions so that packed sequences
    restart at 0.
    """
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = (positions.to(torch.float32)[..., None] * inv_freq)[:, :, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """fair-esm's x·cos + rotate_half(x)·sin, in fp32, on the half tables: (x₁, x₂) becomes
    (x₁c − x₂s, x₂c + x₁s) — the same arithmetic without rotate_half's negated copy or the
    doubled tables (one cast up, one cat, one cast down; one fused kernel under compile)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


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

    def _qkv(self, x: Tensor) -> Tensor:
        """q, k and v as one matmul [B, L, 3E] (one GEMM of thrice the width, and in backward
        one for the input's gradient instead of three and their sum). The parameters stay
        fair-esm's three projections; joining them copies 3E² values, next to the E·L·B of
        each activation."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections])
        return F.linear(x, weight, bias)

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
        q, k, v = self._qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
            # q and k are rotated copies now: attention keeps v for backward, and as a view it
            # would keep all of q|k|v's storage (two values per token and width more).
            v = v.contiguous()

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

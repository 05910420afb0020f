"""ESM-2 and ESM-1b as plain `nn.Module` math.

One class covers both architectures (they share every block; they differ in how positions
enter: rotary attention for ESM-2, a learned table plus an embedding LayerNorm for ESM-1b).
Parameter names follow fair-esm's so that conversion is a rename-free copy.

Two input layouts:
- padded: `tokens` [B, L] with <pad> (id 1) after each `<cls> seq <eos>` row;
- packed: `tokens` [T] holding sequences back to back, `cu_seqlens` [N+1] their cumulative
  lengths. Positions restart at every sequence and attention never crosses a boundary.

Parallelism, precision and initialisation policy live elsewhere; `init_weights()` is a method so
that a model built on the `meta` device can be materialised with `to_empty()` and initialised
in place, shard by shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esmdist import alphabet
from esmdist.model.attention import PackedSpans, SelfAttention, rotary_cos_sin
from esmdist.model.config import ModelConfig
from esmdist.model.contacts import ContactHead

# Token dropout rescales by the fraction of tokens left visible during training:
# 15% selected for masking, of which 80% replaced by <mask>.
MASK_RATIO_TRAIN = 0.15 * 0.8


@dataclass
class ModelOutput:
    logits: Tensor
    """[B, L, V] padded, [T, V] packed, or [M, V] at the positions of `output_mask`."""
    representations: dict[int, Tensor] = field(default_factory=dict)
    """Hidden states by layer number (0 = embeddings; the last one after the final LayerNorm)."""
    attentions: Tensor | None = None
    """[B, layers, heads, L, L], only with `need_weights`."""
    contacts: Tensor | None = None
    """[B, L-2, L-2], only with `return_contacts`."""


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(config.embed_dim, eps=eps)
        self.self_attn = SelfAttention(config.embed_dim, config.attention_heads)
        self.final_layer_norm = nn.LayerNorm(config.embed_dim, eps=eps)
        self.fc1 = nn.Linear(config.embed_dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.embed_dim)

    def forward(
        self,
        x: Tensor,
        attend: Tensor | PackedSpans | None,
        rotary: tuple[Tensor, Tensor] | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        attn_out, weights = self.self_attn(
            self.self_attn_layer_norm(x), attend, rotary, need_weights
        )
        x = x + attn_out
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x, weights


class LMHead(nn.Module):
    """dense → gelu → LayerNorm → projection on the (tied) token embedding, plus a bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.embed_dim, config.embed_dim)
        self.layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        x = self.layer_norm(F.gelu(self.dense(x)))
        return F.linear(x, embedding) + self.bias


@dataclass
class _Layout:
    """Where sequences start and end in the flattened input, in the forms the blocks need."""

    tokens: Tensor  # [B, L] (packed: B = 1)
    not_pad: Tensor  # [B, L] bool
    positions: Tensor  # [B, L] position of each token within its own sequence
    attend: Tensor | PackedSpans | None  # bool, broadcastable to [B, H, L, L]; or the spans
    mask_ratio: Tensor | None  # [B, L, 1] observed <mask> ratio of each token's sequence
    packed: bool


class ESM(nn.Module):
    """ESM-2 (`config.arch == "esm2"`) or ESM-1b (`"esm1b"`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e, padding_idx=alphabet.PAD)
        if config.arch == "esm1b":
            # fair-esm's LearnedPositionalEmbedding: positions start after the padding index.
            self.embed_positions = nn.Embedding(
                config.max_positions + alphabet.PAD + 1, e, padding_idx=alphabet.PAD
            )
            self.emb_layer_norm_before = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.emb_layer_norm_after = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.lm_head = LMHead(config)
        self.contact_head = ContactHead(config.num_layers * config.attention_heads)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """BERT-style initialisation in place (works after `to_empty()` from `meta`)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                module.weight[alphabet.PAD].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.lm_head.bias)

    def _layout(self, tokens: Tensor, cu_seqlens: Tensor | None,
                host_lengths: list[int] | None) -> _Layout:  # fmt: skip
        is_mask = tokens.eq(alphabet.MASK) if self.config.token_dropout else None
        if cu_seqlens is None:
            if tokens.ndim != 2:
                raise ValueError(f"padded tokens must be [B, L], got shape {tuple(tokens.shape)}")
            not_pad = tokens.ne(alphabet.PAD)
            if self.config.arch == "esm1b":
                positions = torch.cumsum(not_pad, dim=1) * not_pad + alphabet.PAD
            else:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            # A mask would keep SDPA off its fastest kernels: pass one only when there is padding.
            attend = not_pad[:, None, None, :] if not bool(not_pad.all()) else None
            mask_ratio = None
            if is_mask is not None:
                mask_ratio = (is_mask.sum(-1) / not_pad.sum(-1))[:, None, None]
            return _Layout(tokens, not_pad, positions, attend, mask_ratio, packed=False)

        if tokens.ndim != 1:
            raise ValueError(f"packed tokens must be [T], got shape {tuple(tokens.shape)}")
        lengths = cu_seqlens.diff()
        seq_index = torch.repeat_interleave(
            torch.arange(len(lengths), device=tokens.device), lengths, output_size=len(tokens)
        )
        positions = torch.arange(len(tokens), device=tokens.device) - cu_seqlens[seq_index]
        if self.config.arch == "esm1b":
            positions = positions + alphabet.PAD + 1
        if host_lengths is None:  # on a GPU this read waits for all the work queued before it
            host_lengths = lengths.tolist()
        attend = PackedSpans(cu_seqlens.to(torch.int32), max(host_lengths), host_lengths)
        mask_ratio = None
        if is_mask is not None:
            masked = torch.zeros(len(lengths), device=tokens.device).index_add_(
                0, seq_index, is_mask.float()
            )
            mask_ratio = (masked / lengths)[seq_index][None, :, None]
        return _Layout(
            tokens[None], tokens.ne(alphabet.PAD)[None], positions[None], attend, mask_ratio, True
        )

    def _check_length(self, layout: _Layout) -> None:
        if self.config.arch != "esm1b":
            return
        longest = layout.attend.max_seqlen if layout.packed else layout.tokens.shape[1]
        if longest > self.config.max_positions:
            raise ValueError(
                f"ESM-1b takes at most {self.config.max_positions} tokens per sequence "
                f"(<cls> + {self.config.max_positions - 2} residues + <eos>), got {longest}; "
                "crop longer sequences first"
            )

    def forward(
        self,
        tokens: Tensor,
        cu_seqlens: Tensor | None = None,
        *,
        repr_layers: tuple[int, ...] | list[int] = (),
        need_weights: bool = False,
        return_contacts: bool = False,
        output_mask: Tensor | None = None,
        lengths: list[int] | None = None,
    ) -> ModelOutput:
        """Run the model on a padded [B, L] batch, or a packed [T] one with `cu_seqlens`.

        `output_mask` (bool, shaped like `tokens`) applies the LM head only where it is True —
        the masked positions during training — and returns logits [M, V]; packed, it may also
        be the int64 positions of those M tokens, which spares a GPU the count that boolean
        indexing reads back. `lengths` (packed only) are the sequence lengths on the host when
        the caller has them (a batch's own copy): otherwise they are read from `cu_seqlens`,
        and on a GPU that read waits for all the work queued before it.
        `need_weights`/`return_contacts` take the explicit attention path (padded input only).
        """
        need_weights = need_weights or return_contacts
        if need_weights and cu_seqlens is not None:
            raise ValueError("attention maps and contacts need the padded layout")
        layout = self._layout(tokens, cu_seqlens, lengths)
        self._check_length(layout)
        config = self.config

        x = self.embed_tokens(layout.tokens)
        if layout.mask_ratio is not None:
            x = x.masked_fill(layout.tokens.eq(alphabet.MASK)[..., None], 0.0)
            x = x * (1 - MASK_RATIO_TRAIN) / (1 - layout.mask_ratio.to(x.dtype))
        rotary = None
        if config.arch == "esm1b":
            x = self.emb_layer_norm_before(x + self.embed_positions(layout.positions))
        else:
            rotary = rotary_cos_sin(layout.positions, config.head_dim, config.rotary_base)
        x = x * layout.not_pad[..., None].to(x.dtype)

        wanted = set(repr_layers)
        representations: dict[int, Tensor] = {}
        if 0 in wanted:
            representations[0] = x
        maps = []
        for number, layer in enumerate(self.layers, start=1):
            x, weights = layer(x, layout.attend, rotary, need_weights)
            if number in wanted:
                representations[number] = x
            if weights is not None:
                maps.append(weights)
        x = self.emb_layer_norm_after(x)
        if config.num_layers in wanted:
            representations[config.num_layers] = x

        if layout.packed:
            x = x[0]
            representations = {k: v[0] for k, v in representations.items()}
        if output_mask is not None:
            x = x[output_mask]
        out = ModelOutput(self.lm_head(x, self.embed_tokens.weight), representations)
        if need_weights:
            attentions = torch.stack(maps, dim=1)
            pair = layout.not_pad.to(attentions.dtype)
            attentions = attentions * (pair[:, :, None] * pair[:, None, :])[:, None, None]
            out.attentions = attentions
            if return_contacts:
                out.contacts = self.contact_head(layout.tokens, attentions)
        return out

    def predict_contacts(self, tokens: Tensor) -> Tensor:
        return self(tokens, return_contacts=True).contacts


def build_model(config: ModelConfig, device: torch.device | str = "cpu") -> ESM:
    """Build on `meta` (no memory), materialise on `device`, initialise in place."""
    with torch.device("meta"):
        model = ESM(config)
    model.to_empty(device=device)
    model.init_weights()
    return model

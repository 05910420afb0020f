"""Packed batches (sequences back to back + cu_seqlens) give the padded batch's results."""

from __future__ import annotations

import pytest
import torch

from esmdist import alphabet
from esmdist.model import ESM, ModelConfig
from esmdist.model.attention import PackedSpans, SelfAttention
from tests.reference import masked_batch, randomize_


@pytest.mark.parametrize("arch", ["esm2", "esm1b"])
def test_packed_equals_padded_per_sequence(arch, real_sequences):
    model = randomize_(
        ESM(ModelConfig(arch=arch, num_layers=2, embed_dim=64, attention_heads=4)), 1
    )
    padded = masked_batch(real_sequences)
    lengths = padded.ne(alphabet.PAD).sum(1)
    packed = padded[padded.ne(alphabet.PAD)]
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    expected = model(padded, repr_layers=[2])
    got = model(packed, cu_seqlens, repr_layers=[2])
    assert got.logits.shape == (int(lengths.sum()), alphabet.VOCAB_SIZE)
    for row, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        n = int(end - start)
        assert torch.allclose(got.logits[start:end], expected.logits[row, :n], atol=1e-5)
        assert torch.allclose(got.representations[2][start:end],
                              expected.representations[2][row, :n], atol=1e-5)  # fmt: skip

    # Loss at masked positions only, through output_mask, agrees too.
    selected = packed.eq(alphabet.MASK)
    masked_logits = model(packed, cu_seqlens, output_mask=selected).logits
    assert torch.allclose(masked_logits, got.logits[selected], atol=1e-6)


def test_packed_gradients_equal_padded(real_sequences):
    model = randomize_(ESM(ModelConfig(num_layers=1, embed_dim=32, attention_heads=2)), 2)
    padded = masked_batch(real_sequences[:3])
    keep = padded.ne(alphabet.PAD)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    model(padded).logits[keep].square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) > 10
    model.zero_grad()
    model(padded[keep], cu).logits.square().mean().backward()
    for name, want in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, want, atol=1e-6), name


def test_layout_errors():
    model = ESM(ModelConfig(num_layers=1, embed_dim=32, attention_heads=2))
    with pytest.raises(ValueError, match="padded tokens must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="contacts need the padded layout"):
        model(torch.zeros(5, dtype=torch.long), torch.tensor([0, 5]), return_contacts=True)


def test_spans_without_the_varlen_kernel_fall_back_to_the_mask(real_sequences, monkeypatch):
    """On a GPU the layout hands the blocks `PackedSpans` instead of a T×T mask; in fp32 (or
    without the kernel) each block rebuilds the mask from them: same result as the CPU path."""
    model = randomize_(ESM(ModelConfig(num_layers=2, embed_dim=64, attention_heads=4)), 3)
    padded = masked_batch(real_sequences[:4])
    keep = padded.ne(alphabet.PAD)
    packed = padded[keep]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    expected = model(packed, cu).logits
    handed = []
    original = SelfAttention.forward

    def spy(self, x, attend, *args, **kwargs):
        handed.append(type(attend))
        return original(self, x, attend, *args, **kwargs)

    monkeypatch.setattr(PackedSpans, "usable", staticmethod(lambda device: True))
    monkeypatch.setattr(SelfAttention, "forward", spy)
    got = model(packed, cu).logits
    assert handed == [PackedSpans, PackedSpans]
    assert torch.equal(got, expected)

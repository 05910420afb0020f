"""Unsupervised contact prediction from attention maps (Rao et al. 2021), as fair-esm does it:
a logistic regression over every layer's and head's symmetrised, APC-corrected attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from esmdist import alphabet


def symmetrize(x: Tensor) -> Tensor:
    """Make the last two dimensions symmetric (contacts are undirected)."""
    return x + x.transpose(-1, -2)


def apc(x: Tensor) -> Tensor:
    """Average product correction: removes the background coupling of each row and column."""
    row = x.sum(-1, keepdim=True)
    col = x.sum(-2, keepdim=True)
    total = x.sum((-1, -2), keepdim=True)
    return x - row * col / total


class ContactHead(nn.Module):
    """Maps attention maps [B, layers, heads, L, L] of `<cls> seq <eos>` tokens to residue
    contact probabilities [B, L-2, L-2]."""

    def __init__(self, in_features: int):
        super().__init__()
        self.regression = nn.Linear(in_features, 1)

    def features(self, tokens: Tensor, attentions: Tensor) -> Tensor:
        """The regression's inputs [B, L-2, L-2, layers × heads]: symmetrised, APC-corrected
        attention of every head (what `esmdist eval contacts-fit` fits the regression on)."""
        # Zero attention to and from <eos> (wherever it sits in a padded row), then drop the
        # last and first positions, which are <eos>/<pad> and <cls>.
        not_eos = tokens.ne(alphabet.EOS).to(attentions)
        not_eos = not_eos.unsqueeze(1) * not_eos.unsqueeze(2)
        attentions = (attentions * not_eos[:, None, None])[..., 1:-1, 1:-1]
        batch, layers, heads, length, _ = attentions.shape
        features = attentions.reshape(batch, layers * heads, length, length)
        features = apc(symmetrize(features.to(self.regression.weight.dtype)))
        return features.permute(0, 2, 3, 1)

    def forward(self, tokens: Tensor, attentions: Tensor) -> Tensor:
        return torch.sigmoid(self.regression(self.features(tokens, attentions)).squeeze(-1))

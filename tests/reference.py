"""Reference models (fair-esm, Hugging Face) with random, non-trivial weights, for exactness tests."""

from __future__ import annotations

import argparse

import esm
import torch

from esmdist import alphabet
from esmdist.model import ESM, ModelConfig
from esmdist.model.convert import config_from_fair_esm_module, from_fair_esm_state_dict

FAIR_ALPHABET = esm.data.Alphabet.from_architecture("ESM-1b")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights on the scale of a trained ESM (so LayerNorm eps and similar details matter),
    with LayerNorm gains and every bias away from their trivial initial values."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "layer_norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif "embed" in name:
            param.copy_(0.02 * noise)
        else:
            param.copy_((0.5 / param.shape[-1] ** 0.5) * noise)
    return module


def fair_esm2(num_layers=3, embed_dim=64, heads=4, seed=0) -> torch.nn.Module:
    model = esm.model.esm2.ESM2(
        num_layers=num_layers,
        embed_dim=embed_dim,
        attention_heads=heads,
        alphabet=FAIR_ALPHABET,
        token_dropout=True,
    )
    return randomize_(model, seed).eval()


def esm1b_args(num_layers=3, embed_dim=64, heads=4) -> argparse.Namespace:
    return argparse.Namespace(
        arch="roberta_large",
        layers=num_layers,
        embed_dim=embed_dim,
        ffn_embed_dim=2 * embed_dim,
        attention_heads=heads,
        max_positions=1024,
        emb_layer_norm_before=True,
        token_dropout=True,
        final_bias=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


def fair_esm1b(num_layers=3, embed_dim=64, heads=4, seed=0) -> torch.nn.Module:
    args = esm1b_args(num_layers, embed_dim, heads)
    model = esm.model.esm1.ProteinBertModel(args, FAIR_ALPHABET)
    return randomize_(model, seed).eval()


def esmdist_from_fair(fair: torch.nn.Module) -> tuple[ModelConfig, ESM]:
    config = config_from_fair_esm_module(fair)
    model = ESM(config)
    model.load_state_dict(from_fair_esm_state_dict(fair.state_dict()))
    return config, model.eval()


def masked_batch(sequences: list[str], seed: int = 0) -> torch.Tensor:
    """A padded batch of real sequences with ~12% of residues replaced by <mask>, so token
    dropout's rescaling differs row by row."""
    tokens = torch.from_numpy(alphabet.batch_encode(sequences))
    generator = torch.Generator().manual_seed(seed)
    residue = tokens >= 4
    chosen = residue & (torch.rand(tokens.shape, generator=generator) < 0.12)
    return tokens.masked_fill(chosen, alphabet.MASK)

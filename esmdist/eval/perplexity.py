"""Pseudo-perplexity (Salazar et al. 2020), the per-sequence measure ESM papers report for
masked LMs: mask each residue in turn, score the true residue, exponentiate the mean NLL."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from esmdist import alphabet
from esmdist.collectives import all_reduce_max, all_reduce_sum
from esmdist.data.batch import PackedBatch
from esmdist.eval.offload import compute_device
from esmdist.eval.variants import pseudo_log_likelihood
from esmdist.model import ESM


@dataclass(frozen=True)
class SequencePerplexity:
    name: str
    length: int
    pseudo_perplexity: float


def pseudo_perplexity(model: ESM, sequence: str, max_tokens: int = 16384) -> float:
    """exp(mean over residues i of −log p(x_i | x with position i masked)): each masked copy of
    the sequence one row, rows batched up to `max_tokens` (esmdist.eval.variants'
    pseudo-log-likelihood, which also windows ESM-1b's longer sequences)."""
    return math.exp(-pseudo_log_likelihood(model, sequence, max_tokens) / len(sequence))


def unigram_perplexity(train_sequences: Iterable[str], eval_sequences: Iterable[str]) -> float:
    """Perplexity of a residue-frequency model fitted on `train_sequences` (add-one smoothed):
    the floor a language model has to beat before it has learned anything about context."""
    counts = np.ones(alphabet.VOCAB_SIZE)
    for seq in train_sequences:
        counts += np.bincount(alphabet.encode_residues(seq, "unk"), minlength=alphabet.VOCAB_SIZE)
    counts[[alphabet.CLS, alphabet.PAD, alphabet.EOS, alphabet.MASK]] = 0
    log_p = np.log(counts / counts.sum(), where=counts > 0, out=np.full(len(counts), -np.inf))
    nll, n = 0.0, 0
    for seq in eval_sequences:
        ids = alphabet.encode_residues(seq, "unk")
        nll -= float(log_p[ids].sum())
        n += len(ids)
    return math.exp(nll / n)


@torch.no_grad()
def masked_perplexity(model: ESM, batches: Iterable[PackedBatch]) -> tuple[float, int]:
    """exp(mean cross-entropy) over the masked positions of `batches` (the validation stream's
    fixed masks), and the number of positions scored."""
    device = compute_device(model)
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(batch.tokens, batch.cu_seqlens, output_mask=batch.selected).logits
        total += F.cross_entropy(logits.float(), batch.targets, reduction="sum").item()
        count += batch.targets.numel()
    return math.exp(total / max(count, 1)), count


@torch.no_grad()
def masked_perplexity_all_ranks(model: ESM, batches: list[PackedBatch]) -> float:
    """`masked_perplexity` over every rank's `batches` together (each rank passes its own part).
    Sharded models need every rank in every forward, so ranks with fewer batches repeat their
    first one (unscored) until all ranks are done."""
    rounds = all_reduce_max(torch.tensor([len(batches)]))
    ppl, count = masked_perplexity(model, batches)
    for _ in range(int(rounds) - len(batches)):
        masked_perplexity(model, batches[:1])
    nll = math.log(ppl) * count if count else 0.0
    totals = all_reduce_sum(torch.tensor([nll, float(count)], dtype=torch.float64))
    return math.exp(totals[0].item() / max(totals[1].item(), 1.0))

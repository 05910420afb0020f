"""Unsupervised contact prediction scored as fair-esm scores it (its contact-prediction
notebook's `compute_precisions` / `evaluate_prediction`, Rao et al. 2020's ranges): for each
range of sequence separation — short 6–11, medium 12–23, long ≥ 24 — the pairs of the upper
triangle ranked by predicted probability, and the fraction of true contacts among the top L,
L/2 and L/5 (L the sequence length); "AUC" is fair-esm's: the mean precision over the top
L/10, 2L/10, …, L. Pairs with a residue that has no coordinates are not scored.
"""

from __future__ import annotations

import numpy as np
import torch

from esmdist import alphabet
from esmdist.eval.offload import compute_device
from esmdist.eval.structure import Chain

RANGES = {"short": (6, 12), "medium": (12, 24), "long": (24, None)}
"""name → (smallest separation, first separation beyond the range or None)."""


def precisions(predicted: np.ndarray, contacts: np.ndarray, low: int,
               high: int | None) -> dict[str, float]:  # fmt: skip
    """P@L, P@L/2, P@L/5 and AUC of the [L, L] `predicted` probabilities against `contacts`
    (1, 0, -1 not scored) over separations in [low, high)."""
    length = len(predicted)
    rows, cols = np.triu_indices(length, low)
    separation = cols - rows
    valid = contacts[rows, cols] >= 0
    if high is not None:
        valid &= separation < high
    scores = np.where(valid, predicted[rows, cols], -np.inf)
    # Ties in the top L keep the upper triangle's order (a stable sort), as torch's argsort.
    top = np.argsort(-scores, kind="stable")[:length]
    hits = np.where(valid[top], contacts[rows, cols][top] == 1, False).astype(float)
    hits = np.pad(hits, (0, length - len(hits)))
    cumulative = np.cumsum(hits)
    cut = (np.arange(0.1, 1.1, 0.1) * length).astype(int) - 1
    binned = cumulative[np.maximum(cut, 0)] / np.maximum(cut + 1, 1)
    return {"P@L": float(binned[9]), "P@L2": float(binned[4]), "P@L5": float(binned[1]),
            "AUC": float(binned.mean())}  # fmt: skip


def contact_metrics(predicted: np.ndarray, contacts: np.ndarray) -> dict[str, float]:
    """`{range}_{P@L|P@L2|P@L5|AUC}` for every range."""
    return {f"{name}_{key}": value for name, (low, high) in RANGES.items()
            for key, value in precisions(predicted, contacts, low, high).items()}  # fmt: skip


@torch.no_grad()
def predict_contacts(model, sequence: str) -> np.ndarray:
    """[L, L] contact probabilities of `sequence` from the model's attention maps."""
    limit = model.config.max_positions - 2 if model.config.arch == "esm1b" else None
    if limit is not None and len(sequence) > limit:
        raise ValueError(f"a {len(sequence)}-residue chain is longer than ESM-1b's {limit}")
    tokens = torch.from_numpy(alphabet.encode(sequence))[None].to(compute_device(model))
    return model(tokens, return_contacts=True).contacts[0].float().cpu().numpy()


def evaluate_chains(model, chains: list[Chain]) -> list[dict]:
    """One row per chain: its name, length and every range's metrics (progress on stderr)."""
    from tqdm import tqdm

    return [{"structure": chain.name, "length": len(chain.sequence),
             **contact_metrics(predict_contacts(model, chain.sequence), chain.contacts)}
            for chain in tqdm(chains, desc="contacts", unit="structure")]  # fmt: skip

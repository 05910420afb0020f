"""Unsupervised contact prediction scored as fair-esm scores it (its contact-prediction
notebook's `compute_precisions` / `evaluate_prediction`, Rao et al. 2020's ranges): for each
range of sequence separation — short 6–11, medium 12–23, long ≥ 24 — the pairs of the upper
triangle ranked by predicted probability, and the fraction of true contacts among the top L,
L/2 and L/5 (L the sequence length); "AUC" is fair-esm's: the mean precision over the top
L/10, 2L/10, …, L. Pairs with a residue that has no coordinates are not scored. L is the
chain's length (observed residues), also where some of them are not scored (the notebook's
`override_length` may differ there). Ties are counted by their expectation under a random
order (fair-esm sorts them in memory order); a constant map is no prediction at all.
"""

from __future__ import annotations

import numpy as np
import torch

from esmdist import alphabet
from esmdist.eval.offload import compute_device
from esmdist.eval.structure import Chain

RANGES = {"short": (6, 12), "medium": (12, 24), "long": (24, None)}
"""name → (smallest separation, first separation beyond the range or None)."""


NO_PREDICTION = "no prediction (the contact map is constant: the fit kept no attention head)"
"""What a constant map is reported as: every ranking of its pairs is a tie, so its precision
would measure only the order of ties."""


def _expected_hits(scores: np.ndarray, hits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The expected number of true contacts among the `counts` top-scored pairs, over every
    order of tied scores equally likely: a tie that straddles the cut contributes its hits in
    proportion to the places it gets. Beyond the scored pairs: all of their hits."""
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order].astype(np.float64)
    if not len(scores):
        return np.zeros(len(counts))
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    in_group = np.add.reduceat(hits, starts)
    before = np.r_[0.0, np.cumsum(in_group)[:-1]]
    group = np.minimum(np.searchsorted(ends, counts, side="left"), len(starts) - 1)
    taken = np.clip(counts - starts[group], 0, ends[group] - starts[group])
    expected = before[group] + in_group[group] * taken / (ends[group] - starts[group])
    return np.where(counts >= len(scores), hits.sum(), expected)


def precisions(predicted: np.ndarray, contacts: np.ndarray, low: int,
               high: int | None) -> dict[str, float]:  # fmt: skip
    """P@L, P@L/2, P@L/5 and AUC of the [L, L] `predicted` probabilities against `contacts`
    (1, 0, -1 not scored) over separations in [low, high). Tied scores count as in a random
    order (their expectation), never as memory order; a constant map thus scores the range's
    contact density: what a random ranking gets."""
    length = len(predicted)
    rows, cols = np.triu_indices(length, low)
    valid = contacts[rows, cols] >= 0
    if high is not None:
        valid &= cols - rows < high
    rows, cols = rows[valid], cols[valid]
    # fair-esm's cuts: the top ⌊f·L⌋ for f = 0.1 … 1.0 (at least one pair)
    cut = (np.arange(0.1, 1.1, 0.1) * length).astype(int) - 1
    counts = np.maximum(cut, 0) + 1
    expected = _expected_hits(predicted[rows, cols], contacts[rows, cols] == 1, counts)
    binned = expected / counts
    return {"P@L": float(binned[9]), "P@L2": float(binned[4]), "P@L5": float(binned[1]),
            "AUC": float(binned.mean())}  # fmt: skip


def is_constant(predicted: np.ndarray, contacts: np.ndarray) -> bool:
    """Whether every scored pair (separation ≥ 6) has the same predicted value."""
    rows, cols = np.triu_indices(len(predicted), RANGES["short"][0])
    scored = predicted[rows, cols][contacts[rows, cols] >= 0]
    return bool(len(scored)) and float(scored.max()) == float(scored.min())


def contact_metrics(predicted: np.ndarray, contacts: np.ndarray) -> dict[str, float | None]:
    """`{range}_{P@L|P@L2|P@L5|AUC}` for every range (None for a constant map), and
    `random_{range}_P@L`: a random ranking's expectation (the range's contact density)."""
    constant = is_constant(predicted, contacts)
    found: dict[str, float | None] = {}
    for name, (low, high) in RANGES.items():
        for key, value in precisions(predicted, contacts, low, high).items():
            found[f"{name}_{key}"] = None if constant else value
    flat = np.zeros_like(predicted)
    for name, (low, high) in RANGES.items():
        found[f"random_{name}_P@L"] = precisions(flat, contacts, low, high)["P@L"]
    return found


@torch.no_grad()
def predict_contacts(model, sequence: str) -> np.ndarray:
    """[L, L] contact probabilities of `sequence` from the model's attention maps."""
    limit = model.config.max_positions - 2 if model.config.arch == "esm1b" else None
    if limit is not None and len(sequence) > limit:
        raise ValueError(f"a {len(sequence)}-residue chain is longer than ESM-1b's {limit}")
    tokens = torch.from_numpy(alphabet.encode(sequence))[None].to(compute_device(model))
    return model(tokens, return_contacts=True).contacts[0].float().cpu().numpy()


def evaluate_chains(model, chains: list[Chain]) -> list[dict]:
    """One row per chain: its name, length, every range's metrics and their random-ranking
    baseline, and `prediction` (NO_PREDICTION for a constant map) (progress on stderr)."""
    from tqdm import tqdm

    rows = []
    for chain in tqdm(chains, desc="contacts", unit="structure"):
        found = contact_metrics(predict_contacts(model, chain.sequence), chain.contacts)
        rows.append({"structure": chain.name, "length": len(chain.sequence), **found,
                     "prediction": NO_PREDICTION if found["long_P@L"] is None else "ok"})  # fmt: skip
    return rows


def mean_metrics(rows: list[dict]) -> dict[str, float | None]:
    """`mean_{column}` over the structures of every metric column; None where any structure
    has no prediction (a mean over the others would hide it)."""
    keys = [k for k in rows[0] if "@" in k or k.endswith("AUC")]
    return {f"mean_{k}": None if any(row[k] is None for row in rows)
            else sum(row[k] for row in rows) / len(rows) for k in keys}  # fmt: skip

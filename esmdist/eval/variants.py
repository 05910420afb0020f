"""Zero-shot variant effects from a masked LM (Meier et al. 2021, ESM-1v; fair-esm's
`examples/variant-prediction/predict.py`), read against a deep mutational scan by Spearman ρ.

A mutant is `A23V` or several joined by `:` (`A23V:G45L`), positions numbered from `offset`
(the number of the sequence's first residue); `WT` / `_wt` is the wild type itself (score 0).
A multi-mutant scores the sum over its mutated positions T of the single-site scores (Meier et
al. 2021, eq. 1: Σ_{t∈T} log p(x_t = mt_t | x_−T) − log p(x_t = wt_t | x_−T), here with each
position masked alone in the wild type, as predict.py does). Scorings:
- masked marginals (ESM-1v's default): log p(mt) − log p(wt) at the position, masked;
- wild-type marginals: the same from one unmasked forward of the wild type;
- pseudo-likelihood: Σ_i log p(x_i | x masked at i) of the mutant sequence minus the wild
  type's, over every residue (one forward per residue per variant: slow). fair-esm's
  predict.py `compute_pppl` leaves out the last residue; this is the full sum, so its scores
  differ from predict.py's there (the other two scorings match it to float32).
ESM-1b sees at most 1,022 residues: a longer sequence is scored in a window of that size
centred on each position (clamped to the sequence).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass

import numpy as np
import torch

from esmdist import alphabet
from esmdist.eval.offload import compute_device

SCORINGS = ("masked-marginals", "wt-marginals", "pseudo-likelihood")
TOKEN_ID = {token: index for index, token in enumerate(alphabet.TOKENS)}
_MUTATION = re.compile(r"([A-Z])(-?\d+)([A-Z])")


@dataclass(frozen=True)
class Mutation:
    wt: str
    index: int
    """0-based position in the sequence."""
    mt: str


def parse_mutant(code: str, sequence: str, offset: int, where: str) -> list[Mutation]:
    """The mutations of `code`; an error naming `where` (file and row) for a malformed code,
    a position outside the sequence or a wild-type letter that disagrees with it."""
    if code.strip() in ("WT", "wt", "_wt"):  # the wild type's own row (ProteinGym, Hsu et al.)
        return []
    mutations = []
    for part in code.split(":"):
        found = _MUTATION.fullmatch(part.strip())
        if not found:
            raise ValueError(f"{where}: cannot read mutant {code!r} (write e.g. A23V or A23V:G45L)")
        wt, position, mt = found.group(1), int(found.group(2)), found.group(3)
        index = position - offset
        if not 0 <= index < len(sequence):
            raise ValueError(f"{where}: mutant {part} is outside the {len(sequence)}-residue "
                             f"sequence numbered from {offset} (--offset)")  # fmt: skip
        if sequence[index] != wt:
            raise ValueError(f"{where}: mutant {part} says position {position} is {wt}, the "
                             f"sequence has {sequence[index]} there (check --offset)")  # fmt: skip
        mutations.append(Mutation(wt, index, mt))
    return mutations


def read_dms(path: str, mutant_column: str, score_column: str, sequence: str,
             offset: int) -> tuple[list[str], list[list[Mutation]], np.ndarray]:  # fmt: skip
    """(mutant codes, their mutations, measured scores) of a DMS table; errors name the row."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for column in (mutant_column, score_column):
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no column {column!r} (columns: "
                                 f"{', '.join(reader.fieldnames or [])})")  # fmt: skip
        codes, mutants, measured = [], [], []
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}: row {row_number}"
            try:
                value = float(row[score_column])
            except ValueError:
                raise ValueError(
                    f"{where}: {score_column} {row[score_column]!r} is not a number"
                ) from None
            codes.append(row[mutant_column])
            mutants.append(parse_mutant(row[mutant_column], sequence, offset, where))
            measured.append(value)
    if not codes:
        raise ValueError(f"{path}: no rows")
    return codes, mutants, np.array(measured)


def _window(model, length: int, index: int) -> tuple[int, int]:
    limit = model.config.max_positions - 2 if model.config.arch == "esm1b" else length
    if length <= limit:
        return 0, length
    start = min(max(index - limit // 2, 0), length - limit)
    return start, start + limit


@torch.no_grad()
def position_log_probs(model, sequence: str, indices: list[int], masked: bool,
                       max_tokens: int = 16384) -> dict[int, np.ndarray]:  # fmt: skip
    """log p(· | context) [vocabulary] at each of `indices`: with the position masked, or
    (`masked=False`) from the unmasked sequence. Batched up to `max_tokens` per forward."""
    device, out = compute_device(model), {}
    by_window: dict[tuple[int, int], list[int]] = {}
    for index in sorted(set(indices)):
        by_window.setdefault(_window(model, len(sequence), index), []).append(index)
    for (start, end), group in by_window.items():
        tokens = torch.from_numpy(alphabet.encode(sequence[start:end])).to(device)
        rows_per_batch = max(1, max_tokens // len(tokens)) if masked else len(group)
        for first in range(0, len(group), rows_per_batch):
            chunk = group[first : first + rows_per_batch]
            places = torch.tensor([i - start + 1 for i in chunk], device=device)  # after <cls>
            rows = torch.arange(len(chunk), device=device)
            batch = tokens.repeat(len(chunk) if masked else 1, 1)
            if masked:
                batch[rows, places] = alphabet.MASK
            logits = model(batch).logits.float()
            picked = logits[rows, places] if masked else logits[0, places]
            for index, values in zip(chunk, torch.log_softmax(picked, -1).cpu().numpy(),
                                     strict=True):  # fmt: skip
                out[index] = values
    return out


def pseudo_log_likelihood(model, sequence: str, max_tokens: int = 16384) -> float:
    """Σ_i log p(x_i | sequence masked at i)."""
    everywhere = list(range(len(sequence)))
    logp = position_log_probs(model, sequence, everywhere, masked=True, max_tokens=max_tokens)
    return float(sum(logp[i][TOKEN_ID[r]] for i, r in enumerate(sequence)))


def score_mutants(model, sequence: str, mutants: list[list[Mutation]], scoring: str) -> np.ndarray:
    """One score per mutant (higher: predicted fitter)."""
    if scoring == "pseudo-likelihood":
        from tqdm import tqdm

        wild = pseudo_log_likelihood(model, sequence)
        scores = []
        for mutations in tqdm(mutants, desc="pseudo-likelihood", unit="mutant"):
            mutated = list(sequence)
            for m in mutations:
                mutated[m.index] = m.mt
            scores.append(pseudo_log_likelihood(model, "".join(mutated)) - wild)
        return np.array(scores)
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; one of {', '.join(SCORINGS)}")
    indices = [m.index for mutations in mutants for m in mutations]
    logp = position_log_probs(model, sequence, indices, masked=scoring == "masked-marginals")
    token = TOKEN_ID
    return np.array([sum(logp[m.index][token[m.mt]] - logp[m.index][token[m.wt]]
                         for m in mutations) for mutations in mutants])  # fmt: skip


def spearman(predicted: np.ndarray, measured: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(predicted, measured).statistic)


def random_spearman(measured: np.ndarray, draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """|ρ| of random scores against `measured`: its mean and 95th percentile over `draws`
    seeded draws — the floor a model's |ρ| must clear on this assay (it grows as the assay
    shrinks: ~0.8/√n)."""
    from scipy.stats import rankdata

    ranks = rankdata(measured)
    ranks = (ranks - ranks.mean()) / np.linalg.norm(ranks - ranks.mean())
    generator = np.random.default_rng(seed)
    scores = generator.random((draws, len(measured))).argsort(1).argsort(1).astype(np.float64)
    scores -= scores.mean(1, keepdims=True)
    scores /= np.linalg.norm(scores, axis=1, keepdims=True)
    found = np.abs(scores @ ranks)
    return {"random_abs_spearman_mean": float(found.mean()),
            "random_abs_spearman_p95": float(np.quantile(found, 0.95))}  # fmt: skip

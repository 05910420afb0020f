"""Secondary structure from frozen per-residue features, as the ESM-1b paper's linear probe: a
multinomial logistic regression (scikit-learn, lbfgs, features standardised) on one layer's
representations, trained on the NetSurfP-2.0 training chains and scored on CB513 as Q3 / Q8 —
the fraction of evaluated residues (the file's mask: resolved, in CB513's evaluation set) whose
state is predicted right.

Files are NetSurfP-2.0's CSV layout (`input, dssp3, dssp8, …, *_mask`; each field one token per
residue), plain or gzipped; `dssp8` is optional (3-state only without it). Training reads a
seeded sample of `max_train_residues` residues, streamed batch by batch: never every feature of
the training set in memory. The fitted probe is saved as an `.npz` of plain arrays (read back
without pickle) and reusable with `--probe`.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmdist.eval.embed import residue_features
from esmdist.storage import writing

STATES = {3: "HEC", 8: "GHIEBTSC"}
"""DSSP 3-state (helix, strand, coil) and 8-state alphabets as NetSurfP-2.0 writes them."""
PROBE_FORMAT = "esmdist-ss-probe/1"


@dataclass(frozen=True)
class LabelledChain:
    id: str
    sequence: str
    labels: dict[int, np.ndarray]
    """states (3 and, where the file has it, 8) → [L] int8 class indices."""
    mask: np.ndarray
    """[L] bool: residues that are trained on / scored."""


def _row_chain(row: dict, where: str) -> LabelledChain:
    sequence = "".join(row["input"].split())
    mask_column = next((k for k in row if k.endswith("mask")), None)
    mask = (np.array([float(v) for v in row[mask_column].split()]) > 0.5 if mask_column
            else np.ones(len(sequence), bool))  # fmt: skip
    labels = {}
    for states, column in ((3, "dssp3"), (8, "dssp8")):
        if row.get(column) is None:
            continue
        tokens = row[column].split()
        unknown = sorted(set(tokens) - set(STATES[states]))
        if unknown:
            raise ValueError(f"{where}: {column} has states {unknown} outside {STATES[states]}")
        labels[states] = np.array([STATES[states].index(t) for t in tokens], dtype=np.int8)
    if not sequence or 3 not in labels:
        raise ValueError(f"{where}: no sequence or no dssp3 labels")
    if any(len(v) != len(sequence) for v in (*labels.values(), mask)):
        raise ValueError(f"{where}: the labels or mask do not have one token per residue "
                         f"({len(sequence)} residues)")  # fmt: skip
    return LabelledChain(row.get("id", "").strip() or where, sequence, labels, mask)


def read_netsurfp(path: str | Path, limit: int | None = None) -> list[LabelledChain]:
    """The chains of a NetSurfP-2.0 CSV (`.csv` or `.csv.gz`), the first `limit` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such secondary-structure file")
    opener = gzip.open if path.name.endswith(".gz") else open
    chains = []
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        if not reader.fieldnames or not {"input", "dssp3"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: not a NetSurfP-2.0 CSV (needs input and dssp3 columns; "
                             f"header {reader.fieldnames})")  # fmt: skip
        for number, row in enumerate(reader, start=2):
            if limit is not None and len(chains) == limit:
                break
            chains.append(_row_chain(row, f"{path}: line {number}"))
    if not chains:
        raise ValueError(f"{path}: no chains")
    return chains


@dataclass(frozen=True)
class Probe:
    layer: int
    states: int
    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    trained_on: str
    residues: int

    def predict(self, features: np.ndarray) -> np.ndarray:
        logits = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        return logits.argmax(-1)

    def save(self, path: str | Path) -> Path:
        meta = {"format": PROBE_FORMAT, "layer": self.layer, "states": self.states,
                "trained_on": self.trained_on, "residues": self.residues}  # fmt: skip
        with writing(path):
            np.savez(path, meta=np.array(json.dumps(meta)), coef=self.coef,
                     intercept=self.intercept, mean=self.mean, scale=self.scale)  # fmt: skip
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != PROBE_FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                arrays = {k: data[k] for k in ("coef", "intercept", "mean", "scale")}
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not an esmdist secondary-structure probe ({exc})") from None
        return cls(meta["layer"], meta["states"], trained_on=meta["trained_on"],
                   residues=meta["residues"], **arrays)  # fmt: skip


def _training_sample(chains: list[LabelledChain], limit: int, seed: int) -> list[np.ndarray]:
    """Per chain, the indices of its residues in the seeded sample of at most `limit`."""
    sizes = [int(chain.mask.sum()) for chain in chains]
    chosen = np.random.default_rng(seed).permutation(sum(sizes))[:limit]
    keep = np.zeros(sum(sizes), bool)
    keep[chosen] = True
    cuts = np.cumsum([0, *sizes])
    return [np.flatnonzero(chain.mask)[keep[cuts[i] : cuts[i + 1]]]
            for i, chain in enumerate(chains)]  # fmt: skip


def train_probes(model, chains: list[LabelledChain], layer: int, trained_on: str,
                 max_train_residues: int = 200_000, max_tokens: int = 16384,
                 seed: int = 0) -> dict[int, Probe]:  # fmt: skip
    """A probe per state count the training labels have (3, and 8 where present)."""
    from sklearn.linear_model import LogisticRegression

    sample = _training_sample(chains, max_train_residues, seed)
    features, labels = [], {s: [] for s in chains[0].labels}
    for index, residues in residue_features(model, [c.sequence for c in chains], layer,
                                            max_tokens, "probe training features"):  # fmt: skip
        features.append(residues[sample[index]])
        for states in labels:
            labels[states].append(chains[index].labels[states][sample[index]])
    x = np.concatenate(features).astype(np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / scale
    probes = {}
    for states, parts in labels.items():
        y = np.concatenate(parts)
        fitted = LogisticRegression(max_iter=1000).fit(x, y)
        coef = np.zeros((states, x.shape[1]))
        intercept = np.full(states, -np.inf)  # a state absent from training is never predicted
        coef[fitted.classes_], intercept[fitted.classes_] = fitted.coef_, fitted.intercept_
        if len(fitted.classes_) == 2:  # sklearn's binary form: one row for class 1
            coef[fitted.classes_] = [-fitted.coef_[0] / 2, fitted.coef_[0] / 2]
            intercept[fitted.classes_] = [-fitted.intercept_[0] / 2, fitted.intercept_[0] / 2]
        probes[states] = Probe(layer, states, coef, intercept, mean, scale, trained_on, len(y))
    return probes


def score_probes(model, probes: dict[int, Probe], chains: list[LabelledChain],
                 max_tokens: int = 16384) -> dict[str, float]:  # fmt: skip
    """`q3` / `q8` (accuracy over the masked residues), `majority_q3` / `majority_q8` (always
    predicting the commonest state: the floor a probe must beat) and the residues scored."""
    layer = next(iter(probes.values())).layer
    right = {s: 0 for s in probes if s in chains[0].labels}
    counts = {s: np.zeros(s, np.int64) for s in right}
    total = 0
    for index, residues in residue_features(model, [c.sequence for c in chains], layer,
                                            max_tokens, "probe evaluation features"):  # fmt: skip
        chain = chains[index]
        features = residues[chain.mask]
        total += len(features)
        for states in right:
            truth = chain.labels[states][chain.mask]
            right[states] += int((probes[states].predict(features) == truth).sum())
            counts[states] += np.bincount(truth, minlength=states)
    return {**{f"q{s}": right[s] / total for s in right},
            **{f"majority_q{s}": int(counts[s].max()) / total for s in right},
            "residues": total}  # fmt: skip

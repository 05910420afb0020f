"""Fitting the contact regression of a freshly pretrained model, as Rao et al. 2021 fitted
fair-esm's: an L1-regularised logistic regression (C = 0.15, liblinear, scikit-learn) from the
symmetrised, APC-corrected attention of every layer and head to the Cβ–Cβ < 8 Å contacts of a
few (~20) training structures, over the pairs the evaluation scores (separation ≥ 6, both
residues with coordinates). Evaluate on other structures: `fit_regression` refuses an
evaluation chain that was fitted on.

The fitted weights are kept as JSON (`contact_regression.json`: nothing in it can execute) and
travel with the model: `esmdist eval contacts-fit --out DIR` also writes the model with its
fitted head as a Hugging Face directory (`esm.contact_head`) and a fair-esm file with its
`-contact-regression.pt` companion. Every contact command takes `--contact-regression FILE`
(this JSON or a fair-esm companion) to apply weights fitted earlier.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from esmdist import alphabet
from esmdist.eval.offload import compute_device
from esmdist.eval.structure import Chain
from esmdist.storage import writing

FORMAT = "esmdist-contact-regression/1"
MIN_SEPARATION = 6
L1_C = 0.15


@dataclass(frozen=True)
class ContactRegression:
    weight: list[float]
    """One weight per layer × head (layer-major, as the model's `contact_head.regression`)."""
    bias: float
    fitted_on: list[str]
    """The training chains (`file:chain`)."""
    C: float = L1_C
    format: str = FORMAT


@torch.no_grad()
def attention_features(model, head, sequence: str, device: torch.device) -> torch.Tensor:
    """The regression's inputs [L, L, layers × heads] for `sequence`: `model` runs the forward
    (in training, the engine's wrapped model), `head` is its contact head."""
    tokens = torch.from_numpy(alphabet.encode(sequence))[None].to(device)
    out = model(tokens, need_weights=True)
    return head.features(tokens, out.attentions)[0]


def pair_features(model, chain: Chain) -> tuple[np.ndarray, np.ndarray]:
    """(features [P, layers × heads], labels [P]) of the chain's scored pairs."""
    features = attention_features(model, model.contact_head, chain.sequence,
                                  compute_device(model))  # fmt: skip
    return scored_pairs(features, chain)


def scored_pairs(features: torch.Tensor, chain: Chain) -> tuple[np.ndarray, np.ndarray]:
    """The [L, L, F] features and the labels at the pairs that are fitted and scored."""
    rows, cols = np.triu_indices(len(chain.sequence), MIN_SEPARATION)
    keep = chain.contacts[rows, cols] >= 0
    rows, cols = rows[keep], cols[keep]
    return features.float().cpu().numpy()[rows, cols], chain.contacts[rows, cols].astype(np.int64)


def _l1() -> dict:
    """An L1 penalty, as scikit-learn spells it (`penalty` is deprecated from 1.8)."""
    import sklearn

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _fit_l1(parts: list[tuple[np.ndarray, np.ndarray]], C: float):
    """The L1 logistic regression (liblinear) on the (features, labels) of every chain."""
    from sklearn.linear_model import LogisticRegression

    labels = np.concatenate([y for _, y in parts])
    if labels.min() == labels.max():
        raise ValueError("the training structures have no contacts (or no non-contacts) at "
                         f"separation ≥ {MIN_SEPARATION}: fit on real, folded chains")  # fmt: skip
    fitted = LogisticRegression(C=C, solver="liblinear", max_iter=1000, **_l1())
    return fitted.fit(np.concatenate([x for x, _ in parts]), labels)


def fit_regression(model, chains: list[Chain], C: float = L1_C) -> ContactRegression:
    """Fit the regression on `chains` (progress on stderr); the model is left unchanged."""
    from tqdm import tqdm

    fitted = _fit_l1([pair_features(model, c) for c in tqdm(chains, desc="attention maps")], C)
    if not fitted.coef_.any():
        print(f"warning: the L1 fit (C={C}) kept no layer × head: this model's attention carries "
              "no contact signal on these structures, and its contact predictions are constant "
              "(precision then reflects the order of ties, as for a random model)",
              file=sys.stderr)  # fmt: skip
    return ContactRegression(fitted.coef_[0].tolist(), float(fitted.intercept_[0]),
                             [chain.name for chain in chains], C)  # fmt: skip


def check_disjoint(fitted: ContactRegression, chains: list[Chain]) -> None:
    """An evaluation chain that the regression was fitted on would score its own training."""
    seen = set(fitted.fitted_on)
    shared = [chain.name for chain in chains if chain.name in seen]
    if shared:
        raise ValueError(f"{', '.join(shared)}: evaluated and also fitted on; evaluate the "
                         "contact regression on structures it was not fitted on")  # fmt: skip


def apply_regression(model, fitted: ContactRegression, where: str = "the regression") -> None:
    regression = model.contact_head.regression
    if len(fitted.weight) != regression.in_features:
        raise ValueError(f"{where}: {len(fitted.weight)} weights, but the model has "
                         f"{regression.in_features} layers × heads")  # fmt: skip
    with torch.no_grad():
        regression.weight.copy_(torch.tensor([fitted.weight]))
        regression.bias.fill_(fitted.bias)


def save_regression(fitted: ContactRegression, path: str | Path) -> Path:
    path = Path(path)
    with writing(path):
        path.write_text(json.dumps(asdict(fitted), indent=1))
    return path


def load_regression(path: str | Path) -> ContactRegression:
    """`contact_regression.json`, or a fair-esm `-contact-regression.pt` (read weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such contact-regression file")
    if path.suffix == ".pt":
        from esmdist.model.convert import load_fair_esm_layout

        model = load_fair_esm_layout(path)["model"]
        try:
            weight = model["contact_head.regression.weight"].flatten().tolist()
            bias = float(model["contact_head.regression.bias"].flatten()[0])
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}: not a fair-esm contact-regression file "
                             "(no model.contact_head.regression.weight/bias)") from None  # fmt: skip
        return ContactRegression(weight, bias, [], float("nan"))
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        return ContactRegression(**data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an esmdist contact regression ({exc})") from None


def save_fitted_model(model, out: Path) -> list[Path]:
    """The model with its fitted head as `out/hf/` and `out/{arch}_fitted.pt` (+ companion;
    fair-esm reads the format from the name's prefix)."""
    from esmdist.model import convert

    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf = convert.save_hf(state, model.config, out / "hf")
    fair_esm = out / f"{model.config.arch}_fitted.pt"
    convert.save_fair_esm_checkpoint(state, model.config, fair_esm)
    return [hf, fair_esm, fair_esm.with_name(fair_esm.stem + "-contact-regression.pt")]


class ContactValidation:
    """The in-training contact metric (`train.valid_contacts`): at each validation, the
    regression fitted afresh on the fit structures and the mean long-range P@L on the others.
    Every rank runs the same forwards (a sharded model needs them all); the model's own frozen
    contact head is left untouched, so checkpoints and exact resume do not see it."""

    def __init__(self, test: str, fit: str):
        from esmdist.eval.structure import read_structures

        self.test, self.fit = read_structures([test]), read_structures([fit])
        check_disjoint(ContactRegression([], 0.0, [c.name for c in self.fit]), self.test)

    def __call__(self, model, head) -> dict[str, float | None]:
        """`valid_contact_p_at_l_long`: the mean long-range P@L (None — no prediction — when
        the fit keeps no attention head: a constant map ranks nothing), and beside it
        `valid_contact_random_p_at_l_long`, what a random ranking gets. `model` runs the
        forwards, `head` (its `contact_head`) makes the features."""
        from esmdist.eval.contacts import contact_metrics

        device = next(head.parameters()).device
        fitted = _fit_l1([scored_pairs(attention_features(model, head, c.sequence, device), c)
                          for c in self.fit], L1_C)  # fmt: skip
        found = []
        for chain in self.test:
            features = attention_features(model, head, chain.sequence, device)
            features = features.float().cpu().numpy()
            logits = features @ fitted.coef_[0] + fitted.intercept_[0]
            found.append(contact_metrics(1 / (1 + np.exp(-logits)), chain.contacts))
        measured = [row["long_P@L"] for row in found]
        return {"valid_contact_p_at_l_long": None if None in measured
                else float(np.mean(measured)),
                "valid_contact_random_p_at_l_long":
                float(np.mean([row["random_long_P@L"] for row in found]))}  # fmt: skip

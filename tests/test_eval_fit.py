"""`esmdist eval contacts-fit` and the contact commands around it: the L1 regression fitted on
real training structures and scored on others, the fitted head travelling with the model (its
JSON, the HF directory's `esm.contact_head` — checked against transformers' own
`predict_contacts` — and fair-esm's companion file), the contact-map figure, and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esmdist.cli import main
from esmdist.eval.contact_fit import (
    ContactRegression,
    apply_regression,
    check_disjoint,
    fit_regression,
    load_regression,
    pair_features,
    save_regression,
)
from esmdist.eval.structure import read_structures
from esmdist.model import build_model, model_config
from tests.conftest import EVAL_DATA

pytest.importorskip("sklearn")
FIT = EVAL_DATA / "structures" / "fit"
TEST = EVAL_DATA / "structures" / "test"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_model(model_config("debug")).eval()


def test_pair_features_are_the_heads_inputs(model):
    """The regression applied to the fitting features is the head's own output on those pairs."""
    chain = read_structures([str(FIT / "PF00013_1WVN_A.pdb.gz")])[0]
    with torch.no_grad():
        model.contact_head.regression.weight.normal_()
    features, labels = pair_features(model, chain)
    length = len(chain.sequence)
    rows, cols = np.triu_indices(length, 6)
    keep = chain.contacts[rows, cols] >= 0
    assert len(features) == keep.sum() == len(labels) and set(labels) == {0, 1}
    regression = model.contact_head.regression
    by_hand = torch.sigmoid(regression(torch.from_numpy(features))).squeeze(-1).detach().numpy()
    from esmdist.eval.contacts import predict_contacts

    predicted = predict_contacts(model, chain.sequence)
    np.testing.assert_allclose(by_hand, predicted[rows[keep], cols[keep]], rtol=1e-5, atol=1e-6)


def test_the_fit_is_fair_esms_and_refuses_its_own_training_chains(model):
    from sklearn.linear_model import LogisticRegression

    chains = read_structures([str(FIT)])[:4]
    fitted = fit_regression(model, chains)
    parts = [pair_features(model, c) for c in chains]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    from esmdist.eval.contact_fit import _l1  # the installed scikit-learn's name for L1

    reference = LogisticRegression(C=0.15, solver="liblinear", max_iter=1000, **_l1()).fit(x, y)
    np.testing.assert_allclose(fitted.weight, reference.coef_[0], rtol=1e-6, atol=1e-9)
    assert fitted.fitted_on == [c.name for c in chains] and fitted.C == 0.15
    with pytest.raises(ValueError, match="PF00013_1WVN_A.pdb.gz:A: evaluated and also fitted"):
        check_disjoint(fitted, chains[:1])
    with pytest.raises(ValueError, match="no contacts"):
        fit_regression(model, [chains[0].__class__("x:A", "AAAAAAA", np.zeros((7, 7), np.int8))])


def test_regression_files_round_trip_and_bad_ones_are_named(model, tmp_path):
    fitted = ContactRegression([0.5] * 8, -1.0, ["a:A"])
    loaded = load_regression(save_regression(fitted, tmp_path / "r.json"))
    assert loaded == fitted
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="bad.json: not an esmdist contact regression"):
        load_regression(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="wide.json: 3 weights, but the model has 8"):
        apply_regression(model, ContactRegression([1.0] * 3, 0.0, []), "wide.json")
    torch.save({"model": {"other": torch.zeros(1)}}, tmp_path / "x-contact-regression.pt")
    with pytest.raises(ValueError, match="not a fair-esm contact-regression file"):
        load_regression(tmp_path / "x-contact-regression.pt")


def test_contacts_fit_writes_a_model_that_carries_its_head(model, tmp_path, capsys):
    """The fitted model through its three files predicts the same contacts, and transformers'
    EsmForMaskedLM.predict_contacts on the HF directory agrees."""
    transformers = pytest.importorskip("transformers")
    from esmdist import alphabet
    from esmdist.model.convert import save_hf

    save_hf(model.state_dict(), model.config, tmp_path / "raw")
    fits = [str(p) for p in sorted(FIT.iterdir())[:6]]
    assert main(["eval", "contacts-fit", "--model", str(tmp_path / "raw"), *fits,
                 "--out", str(tmp_path / "fitted")]) == 0  # fmt: skip
    assert "fitted on 6 structures" in capsys.readouterr().out
    fitted = load_regression(tmp_path / "fitted" / "contact_regression.json")
    test_files = [str(p) for p in sorted(TEST.iterdir())[:2]]
    results = {}
    for name, source, extra in (
        ("json", str(tmp_path / "raw"), ["--contact-regression",
                                         str(tmp_path / "fitted" / "contact_regression.json")]),
        ("pt", str(tmp_path / "raw"), ["--contact-regression",
                                       str(tmp_path / "fitted" / "esm2_fitted-contact-regression.pt")]),
        ("hf", str(tmp_path / "fitted" / "hf"), []),
        ("fair-esm", str(tmp_path / "fitted" / "esm2_fitted.pt"), []),
    ):  # fmt: skip
        out = tmp_path / f"out-{name}"
        assert main(["eval", "contacts", "--model", source, *test_files, "--out", str(out),
                     *extra]) == 0  # fmt: skip
        results[name] = json.loads((out / "contacts.json").read_text())["rows"]
    assert results["json"] == results["pt"] == results["hf"] == results["fair-esm"]

    chain = read_structures(test_files[:1])[0]
    hf = transformers.EsmForMaskedLM.from_pretrained(
        tmp_path / "fitted" / "hf", attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(hf.esm.contact_head.regression.weight[0].detach().numpy(),
                               fitted.weight, rtol=1e-6)  # fmt: skip
    tokens = torch.from_numpy(alphabet.encode(chain.sequence))[None]
    with torch.no_grad():
        theirs = hf.predict_contacts(tokens, torch.ones_like(tokens))[0].numpy()
    apply_regression(model, fitted)
    from esmdist.eval.contacts import predict_contacts

    np.testing.assert_allclose(predict_contacts(model, chain.sequence), theirs, atol=1e-5)


def test_contacts_with_fit_and_plot_on_the_bundled_sets(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "contacts", "--model", "debug", str(TEST), "--fit", str(FIT),
                 "--out", str(out), "--plot", str(tmp_path / "map.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads((out / "contacts.json").read_text())
    # An untrained model's attention carries no contact signal: the L1 fit keeps no head, the
    # map is constant, and that is reported as no prediction, beside the random ranking's
    # expectation (the long-range contact density of the 12 chains).
    assert len(summary["rows"]) == 12 and summary["mean_long_P@L"] is None
    assert summary["mean_random_long_P@L"] == pytest.approx(0.042, abs=0.0005)
    assert "no prediction (the contact map is constant" in printed and "plots:" in printed
    pngs = sorted(tmp_path.glob("map_*.png"))
    assert len(pngs) == 12 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    # The same structures fitted and evaluated: refused, naming them.
    assert main(["eval", "contacts", "--model", "debug", str(FIT / "PF00013_1WVN_A.pdb.gz"),
                 "--fit", str(FIT)]) == 2  # fmt: skip
    assert "evaluated and also fitted on" in capsys.readouterr().err


def test_the_in_training_contact_metric(tmp_path, demo_records, capsys):
    """`train.valid_contacts`: logged at each validation, equal to the same measurement on the
    checkpoint afterwards, and the model's own contact head untouched."""
    import shutil

    from esmdist.eval.contact_fit import ContactValidation
    from esmdist.export import model_weights
    from esmdist.model import ESM
    from esmdist.train import train
    from tests.adversarial.helpers import job
    from tests.conftest import make_shards

    fit, test = tmp_path / "fit", tmp_path / "test"
    for folder, files in ((fit, sorted(FIT.iterdir())[:3]), (test, sorted(TEST.iterdir())[:2])):
        folder.mkdir()
        for file in files:
            shutil.copy(file, folder)
    shards = make_shards(tmp_path, demo_records[:300], 100)
    out = tmp_path / "run"
    config = job(shards, out, str(out / "checkpoints"), "--train.valid_every=2",
                 f"--train.valid_contacts={test}", f"--train.valid_contacts_fit={fit}")  # fmt: skip
    train(config)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    found = {r["step"]: r["valid_contact_p_at_l_long"] for r in logged
             if "valid_contact_p_at_l_long" in r}  # fmt: skip
    baseline = [r["valid_contact_random_p_at_l_long"] for r in logged
                if "valid_contact_p_at_l_long" in r]  # fmt: skip
    assert sorted(found) == [2, 4] and all(v is None or 0 <= v <= 1 for v in found.values())
    assert len(set(baseline)) == 1 and 0 < baseline[0] < 0.2  # the same chains each time
    # Four steps of a debug model: the fit keeps no head, logged as null (it was a precision).
    assert found == {2: None, 4: None}
    assert "valid_contact_p_at_l_long=none" in capsys.readouterr().out
    model_config, state = model_weights(str(out / "checkpoints" / "step_000000004"))
    model = ESM(model_config)
    model.load_state_dict(state)
    model.eval()
    again = ContactValidation(str(test), str(fit))(model, model.contact_head)
    assert again == {"valid_contact_p_at_l_long": None,
                     "valid_contact_random_p_at_l_long": baseline[0]}  # fmt: skip
    _, earlier = model_weights(str(out / "checkpoints" / "step_000000002"))
    for key in ("contact_head.regression.weight", "contact_head.regression.bias"):
        assert torch.equal(state[key], earlier[key])  # frozen, and no validation wrote to it


def test_in_training_contact_settings_are_checked(tmp_path):
    from esmdist.config import load_config
    from esmdist.preflight import quick_problems

    with pytest.raises(ValueError, match="valid_contacts and valid_contacts_fit go together"):
        load_config(None, [f"--train.valid_contacts={TEST}"])
    config = load_config(None, [f"--train.valid_contacts={tmp_path / 'none'}",
                                f"--train.valid_contacts_fit={FIT}"])  # fmt: skip
    assert any("train.valid_contacts" in p and "no such structure" in p
               for p in quick_problems(config, 1))  # fmt: skip

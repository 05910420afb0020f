"""`esmdist eval contacts`: the metrics on known answers and against fair-esm's own scoring
code, the virtual Cβ against real Cβ atoms, reading PDB / mmCIF / BinaryCIF chains, and the
command on one model through its fair-esm file and its HF directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esmdist.eval.contacts import RANGES, contact_metrics, precisions
from esmdist.eval.structure import StructureError, read_chain, virtual_cb
from tests.conftest import TEST_DATA

pytest.importorskip("biotite")
STRUCTURES = TEST_DATA / "structures"


def fair_esm_precisions(predictions, targets, minsep, maxsep):
    """fair-esm's contact-prediction notebook `compute_precisions` (one sequence, no
    override_length), transcribed from its text."""
    predictions, targets = torch.as_tensor(predictions)[None], torch.as_tensor(targets)[None]
    seqlen = predictions.size(1)
    seqlen_range = torch.arange(seqlen)
    sep = (seqlen_range.unsqueeze(0) - seqlen_range.unsqueeze(1)).unsqueeze(0)
    valid_mask = (sep >= minsep) & (targets >= 0)
    if maxsep is not None:
        valid_mask &= sep < maxsep
    predictions = predictions.masked_fill(~valid_mask, float("-inf"))
    x_ind, y_ind = np.triu_indices(seqlen, minsep)
    predictions_upper = predictions[:, x_ind, y_ind]
    targets_upper = targets[:, x_ind, y_ind]
    indices = predictions_upper.argsort(dim=-1, descending=True)[:, :seqlen]
    topk_targets = targets_upper[torch.arange(1).unsqueeze(1), indices]
    cumulative_dist = topk_targets.type_as(predictions).cumsum(-1)
    gather_indices = (torch.arange(0.1, 1.1, 0.1).unsqueeze(0) * seqlen).type(torch.long) - 1
    binned = cumulative_dist.gather(1, gather_indices) / (gather_indices + 1).type_as(
        cumulative_dist
    )
    return {"AUC": binned.mean(-1).item(), "P@L": binned[:, 9].item(),
            "P@L2": binned[:, 4].item(), "P@L5": binned[:, 1].item()}  # fmt: skip


@pytest.fixture(scope="module")
def chain():
    return read_chain(STRUCTURES / "1gl4.bcif", "A")


def test_scores_equal_fair_esms_on_a_real_structure(chain):
    rng = np.random.default_rng(0)
    for _ in range(5):
        predicted = rng.random(chain.contacts.shape)
        predicted = (predicted + predicted.T) / 2
        for name, (low, high) in RANGES.items():
            ours = precisions(predicted, chain.contacts, low, high)
            theirs = fair_esm_precisions(predicted, chain.contacts.astype(np.int64), low, high)
            assert ours == pytest.approx(theirs, abs=1e-12), name


def test_a_perfect_predictor_and_a_random_one(chain):
    contacts, length = chain.contacts, len(chain.contacts)
    perfect = precisions(contacts.astype(float), contacts, 24, None)
    rows, cols = np.triu_indices(length, 24)
    true = int((contacts[rows, cols] == 1).sum())
    assert true > length  # enough long-range contacts in 1gl4 for P@L = 1
    assert perfect["P@L"] == perfect["P@L5"] == perfect["AUC"] == 1.0
    density = true / int((contacts[rows, cols] >= 0).sum())
    rng = np.random.default_rng(1)
    random = np.mean([precisions(rng.random(contacts.shape), contacts, 24, None)["P@L"]
                      for _ in range(200)])  # fmt: skip
    assert random == pytest.approx(density, abs=0.01)


def test_virtual_cb_sits_on_the_real_cb():
    import biotite.structure as struc
    import biotite.structure.io.pdbx as pdbx

    atoms = pdbx.get_structure(pdbx.CIFFile.read(str(STRUCTURES / "1A8O.cif")), model=1)
    atoms = atoms[struc.filter_amino_acids(atoms) & (atoms.chain_id == "A")]
    gaps = []
    for residue in struc.residue_iter(atoms):
        names = residue.atom_name.tolist()
        if residue.res_name[0] == "GLY" or not {"N", "CA", "C", "CB"} <= set(names):
            continue
        n, ca, c, cb = (residue.coord[names.index(a)] for a in ("N", "CA", "C", "CB"))
        gaps.append(np.linalg.norm(virtual_cb(n, ca, c) - cb))
    assert len(gaps) > 50 and np.median(gaps) < 0.1 and max(gaps) < 0.5


@pytest.mark.parametrize("file, chain_id, expected", [
    ("1A8O.cif", "A", "MDIRQGPKEPFRDYVDRFYKTLRAEQASQEVKNWMTETLLVQNANPDCKTILKALGPGATLEEMMTACQG"),
    ("PF00013_1WVN_A.pdb", None,
     "PLGSQTTHELTIPNNLIGCIIGRQGANINEIRQMSGAQIKIANPVEGSSGRQVTITGSAASISLAQYLINARLS"),
])  # fmt: skip
def test_chains_read_as_their_observed_residues(file, chain_id, expected):
    """The chain sequences recorded in ../shared/data (from CA atoms); 1A8O starts with MSE."""
    read = read_chain(STRUCTURES / file, chain_id)
    assert read.sequence == expected
    assert read.contacts.shape == (len(expected), len(expected))
    assert (np.diag(read.contacts) == 1).all() and (read.contacts == read.contacts.T).all()


def test_free_amino_acids_bound_as_ligands_are_not_part_of_the_chain():
    """PDB 4OSX binds three free glycines (HETATM GLY 402–404, with OXT) under chain A; 3KCS's
    chromophore NRQ (Met-Tyr-Gly cyclised, HETATM) is bonded into its chain. Read before:
    4OSX's sequence ended in GGG, and 3KCS's had 217 letters for its 215 residues ("MYG")."""
    ligands = read_chain(STRUCTURES / "4osx.bcif", "A")
    assert len(ligands.sequence) == 300 and ligands.sequence.endswith("ITDLP")
    assert ligands.contacts.shape == (300, 300)
    chromophore = read_chain(STRUCTURES / "3kcs.bcif")
    assert len(chromophore.sequence) == 215 == len(chromophore.contacts)
    assert chromophore.sequence[55:62] == "LSPQFXS"  # NRQ 66 in place, one residue, one letter
    assert (chromophore.contacts[60] == -1).all()  # its atoms are N1, CA1, C1 …: not scored


def test_structures_that_cannot_be_scored_are_named(tmp_path):
    with pytest.raises(StructureError, match=r"1A8O.cif: no protein chain 'Z' \(chains: A\)"):
        read_chain(STRUCTURES / "1A8O.cif", "Z")
    with pytest.raises(StructureError, match="no such structure file"):
        read_chain(tmp_path / "missing.cif")
    lines = (STRUCTURES / "PF00013_1WVN_A.pdb").read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("ATOM"))
    residue = lines[first][22:27]
    # The first residue without its N: a chain still, with that residue's pairs not scored.
    kept = [line for line in lines
            if not (line.startswith("ATOM") and line[22:27] == residue and line[12:16] == " N  ")]  # fmt: skip
    (tmp_path / "no_n.pdb").write_text("".join(kept))
    read = read_chain(tmp_path / "no_n.pdb")
    assert (read.contacts[0] == -1).all() and (read.contacts[1:, 1:] >= 0).all()
    (tmp_path / "junk.cif").write_text("not a structure\n")
    with pytest.raises(StructureError, match="junk.cif"):
        read_chain(tmp_path / "junk.cif")


def test_the_command_gives_the_same_scores_through_either_file(tmp_path, capsys):
    from esmdist.cli import main
    from esmdist.model import build_model, model_config
    from esmdist.model.convert import save_fair_esm_checkpoint, save_hf

    torch.manual_seed(11)
    model = build_model(model_config("debug"))
    save_hf(model.state_dict(), model.config, tmp_path / "hf")
    save_fair_esm_checkpoint(model.state_dict(), model.config, tmp_path / "esm2_debug.pt")
    rows = {}
    for source in ("hf", "esm2_debug.pt"):
        out = tmp_path / f"out-{source}"
        assert main(["eval", "contacts", "--model", str(tmp_path / source),
                     str(STRUCTURES / "1A8O.cif"), f"{STRUCTURES / '1gl4.bcif'}:A",
                     "--out", str(out)]) == 0  # fmt: skip
        rows[source] = json.loads((out / "contacts.json").read_text())["rows"]
        assert (out / "contacts.csv").read_text().startswith("structure,length,short_P@L,")
    assert rows["hf"] == rows["esm2_debug.pt"]
    assert [r["structure"] for r in rows["hf"]] == ["1A8O.cif:A", "1gl4.bcif:A"]
    assert set(rows["hf"][0]) == {"structure", "length", "prediction", *contact_metrics(
        np.zeros((30, 30)), np.zeros((30, 30), dtype=np.int8))}  # fmt: skip
    assert {r["prediction"] for r in rows["hf"]} == {"ok"}
    assert "long P@L" in capsys.readouterr().out


def test_tied_scores_count_as_a_random_order(chain):
    """A constant map used to score the contact fraction of the first pairs in memory order
    (row-major over the upper triangle: long-range P@L 0.000 on 1GL4, density 0.015); ties now
    count as their expectation under a random order, which a constant map turns into each
    range's contact density, and coarse scores into the mean over random tie-breaks."""
    flat = np.zeros(chain.contacts.shape)
    rows, cols = np.triu_indices(len(flat), 24)
    scored = chain.contacts[rows, cols][chain.contacts[rows, cols] >= 0]
    density = float((scored == 1).mean())
    found = precisions(flat, chain.contacts, 24, None)
    for key in ("P@L", "P@L2", "P@L5", "AUC"):
        assert found[key] == pytest.approx(density, abs=1e-12)
    # Coarse scores (many ties): the expectation against random tie-breaks, 400 draws.
    generator = np.random.default_rng(0)
    coarse = np.round(generator.random(flat.shape) + 0.3 * (chain.contacts == 1), 1)
    coarse = np.triu(coarse) + np.triu(coarse, 1).T
    draws = [precisions(coarse + 1e-6 * generator.random(flat.shape), chain.contacts, 24, None)
             for _ in range(400)]  # fmt: skip
    expected = precisions(coarse, chain.contacts, 24, None)
    for key in ("P@L", "P@L5", "AUC"):
        assert expected[key] == pytest.approx(np.mean([d[key] for d in draws]), abs=0.004)


def test_a_constant_map_is_no_prediction_with_its_baseline_beside_it(chain, tmp_path, capsys):
    """The demo's fit kept no attention head: every pair scored sigmoid(bias). Its precision
    was reported as a measurement ("long-range P@L 0.040", the same for a random model by
    construction); now it is no prediction, in the rows, the means, the CLI and the JSON."""
    from esmdist.cli import main
    from esmdist.eval.contact_fit import ContactRegression, save_regression
    from esmdist.eval.contacts import NO_PREDICTION

    found = contact_metrics(np.full(chain.contacts.shape, 0.3), chain.contacts)
    assert all(found[f"{r}_{k}"] is None for r in RANGES for k in ("P@L", "P@L2", "P@L5", "AUC"))
    assert 0 < found["random_long_P@L"] < 0.2
    heads = 2 * 4  # debug: 2 layers × 4 heads
    regression = save_regression(ContactRegression([0.0] * heads, -2.0, []), tmp_path / "r.json")
    assert main(["eval", "contacts", "--model", "debug", "--contact-regression", str(regression),
                 str(STRUCTURES / "1A8O.cif"), "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert NO_PREDICTION in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "contacts.json").read_text())
    assert written["mean_long_P@L"] is None and written["mean_random_long_P@L"] > 0
    assert written["rows"][0]["prediction"] == NO_PREDICTION


def test_the_contact_map_of_a_constant_prediction_says_so(chain, tmp_path, monkeypatch):
    """It was a solid black square with no colour bar, read as "everything in contact"; now
    one map — predictions above the diagonal on a colour bar, true contacts below — titled
    no prediction beside the random ranking."""
    from esmdist.eval import plot
    from esmdist.eval.contacts import NO_PREDICTION

    drawn = []
    monkeypatch.setattr(plot, "_save", lambda figure, out: drawn.append(figure) or out)
    plot.plot_contacts(np.full(chain.contacts.shape, 0.12), chain.contacts, chain.name,
                       tmp_path / "map.png")  # fmt: skip
    (figure,) = drawn
    image_axis, bar = figure.axes
    assert "predicted contact probability" in bar.get_ylabel()
    assert (
        NO_PREDICTION in image_axis.get_title() and "random ranking 0.015" in image_axis.get_title()
    )
    true_contacts = image_axis.collections[0].get_offsets()
    assert len(true_contacts) == int(np.tril(chain.contacts == 1, -1).sum()) > 0

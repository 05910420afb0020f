"""`esmdist eval variants`: ESM-1v's scorings equal fair-esm's `predict.py` formulas on a real
DMS table, the window of long sequences, the command end to end, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esmdist.eval.variants import parse_mutant, position_log_probs, score_mutants, spearman
from tests.conftest import EVAL_DATA, REPO
from tests.reference import esmdist_from_fair, fair_esm1b, fair_esm2

pytest.importorskip("scipy")
YAP1 = EVAL_DATA / "dms" / "YAP1_HUMAN_Fields2012-singles-linear"
OFFSET = 170  # wt.fasta is YAP1_HUMAN/170-205


def wild_type() -> str:
    return YAP1.joinpath("wt.fasta").read_text().split("\n", 1)[1].replace("\n", "")


def table(limit: int = 60) -> list[dict]:
    import csv

    with open(YAP1 / "data.csv", newline="") as handle:
        return list(csv.DictReader(handle))[:limit]


def fair_esm_scores(fair, sequence: str, codes: list[str], masked: bool) -> list[float]:
    """examples/variant-prediction/predict.py, for fair-esm's own model: `masked-marginals`
    masks each position and takes log_softmax there; `wt-marginals` one unmasked forward;
    a mutant's score is Σ log p(mt) − log p(wt) over its mutations (offset_idx = OFFSET)."""
    import esm

    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    _, _, tokens = alphabet.get_batch_converter()([("wt", sequence)])
    with torch.no_grad():
        if masked:
            token_probs = []
            for i in range(tokens.size(1)):
                masked_tokens = tokens.clone()
                masked_tokens[0, i] = alphabet.mask_idx
                token_probs.append(torch.log_softmax(fair(masked_tokens)["logits"], -1)[:, i])
            token_probs = torch.cat(token_probs, dim=0).unsqueeze(0)
        else:
            token_probs = torch.log_softmax(fair(tokens)["logits"], -1)
    scores = []
    for code in codes:
        score = 0.0
        for part in [] if code == "WT" else code.split(":"):
            wt, idx, mt = part[0], int(part[1:-1]) - OFFSET, part[-1]
            assert sequence[idx] == wt
            score += (token_probs[0, 1 + idx, alphabet.get_idx(mt)]
                      - token_probs[0, 1 + idx, alphabet.get_idx(wt)]).item()  # fmt: skip
        scores.append(score)
    return scores


@pytest.mark.parametrize("make", [fair_esm2, fair_esm1b], ids=["esm2", "esm1b"])
@pytest.mark.parametrize("scoring", ["masked-marginals", "wt-marginals"])
def test_scores_equal_fair_esms_predict_py(make, scoring):
    fair = make()
    _, ours = esmdist_from_fair(fair)
    sequence, rows = wild_type(), table()
    codes = [row["mutant"] for row in rows]
    mutants = [parse_mutant(code, sequence, OFFSET, "row") for code in codes]
    got = score_mutants(ours, sequence, mutants, scoring)
    expected = fair_esm_scores(fair, sequence, codes, masked=scoring == "masked-marginals")
    assert np.abs(got - np.array(expected)).max() < 1e-5


def test_pseudo_likelihood_is_the_difference_of_summed_masked_log_probs():
    _, ours = esmdist_from_fair(fair_esm2())
    sequence = wild_type()
    mutants = [parse_mutant(code, sequence, OFFSET, "row") for code in ("WT", "L173H")]
    scores = score_mutants(ours, sequence, mutants, "pseudo-likelihood")
    assert scores[0] == 0.0 and scores[1] != 0.0


def test_a_long_esm1b_sequence_is_scored_in_a_window_centred_on_each_position():
    from esmdist.model import ESM, ModelConfig

    torch.manual_seed(2)
    model = ESM(ModelConfig(arch="esm1b", num_layers=1, embed_dim=32, attention_heads=2,
                            max_positions=34, token_dropout=False)).eval()  # fmt: skip
    sequence = (wild_type() * 3)[:80]  # longer than the 32 residues this model sees
    got = position_log_probs(model, sequence, [3, 40, 79], masked=True)
    for index, (start, end) in ((3, (0, 32)), (40, (24, 56)), (79, (48, 80))):
        alone = position_log_probs(model, sequence[start:end], [index - start], masked=True)
        assert np.allclose(got[index], alone[index - start], atol=1e-6)


def test_the_command_on_a_real_dms_table(tmp_path, capsys):
    from esmdist.cli import main
    from esmdist.model import build_model, model_config
    from esmdist.model.convert import save_hf

    torch.manual_seed(4)
    model = build_model(model_config("debug"))
    save_hf(model.state_dict(), model.config, tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["eval", "variants", "--model", str(tmp_path / "hf"), "--dms",
                 str(YAP1 / "data.csv"), "--sequence", str(YAP1 / "wt.fasta"),
                 "--score-column", "log_fitness", "--offset", str(OFFSET),
                 "--out", str(out), "--plot", str(tmp_path / "variants.png")]) == 0  # fmt: skip
    summary = json.loads((out / "variants.json").read_text())
    assert summary["variants"] == 319 and -1.0 <= summary["spearman"] <= 1.0
    assert 0 < summary["random_abs_spearman_mean"] < summary["random_abs_spearman_p95"] < 0.2
    assert (tmp_path / "variants.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "variants.csv").read_text().splitlines()
    assert rows[0] == "mutant,log_fitness,predicted" and len(rows) == 320
    assert "Spearman ρ = " in capsys.readouterr().out
    predicted = np.array([float(r.split(",")[2]) for r in rows[1:]])
    measured = np.array([float(r.split(",")[1]) for r in rows[1:]])
    ranks = [np.argsort(np.argsort(v)) for v in (predicted, measured)]  # no ties in either here
    assert summary["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-9)
    assert spearman(predicted, measured) == pytest.approx(summary["spearman"])


def test_bad_tables_and_mutants_are_named(tmp_path, capsys):
    from esmdist.cli import main

    sequence = wild_type()
    with pytest.raises(ValueError, match=r"row 7: mutant L173H says position 173 is L, the "
                                         r"sequence has P there"):  # fmt: skip
        parse_mutant("L173H", sequence, OFFSET - 1, "row 7")
    with pytest.raises(ValueError, match="cannot read mutant 'L173'"):
        parse_mutant("L173", sequence, OFFSET, "row 2")
    base = ["eval", "variants", "--model", "debug", "--sequence", str(YAP1 / "wt.fasta"),
            "--offset", str(OFFSET)]  # fmt: skip
    assert main([*base, "--dms", str(YAP1 / "data.csv"), "--score-column", "fitness"]) == 2
    assert (
        "no column 'fitness' (columns: seq, log_fitness, n_mut, mutant)" in capsys.readouterr().err
    )
    (tmp_path / "empty.csv").write_text("mutant,score\n")
    assert main([*base, "--dms", str(tmp_path / "empty.csv"), "--score-column", "score"]) == 2
    assert "empty.csv: no rows" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("mutant,score\nL173H,0.5\nR203S,n/a\n")
    assert main([*base, "--dms", str(tmp_path / "bad.csv"), "--score-column", "score"]) == 2
    assert "bad.csv: row 3: score 'n/a' is not a number" in capsys.readouterr().err


BLAT = REPO / "tests/data/dms/BLAT_ECOLX_Tenaillon2013-singles-MIC_score"


def test_a_literal_sequence_longer_than_a_file_name_is_scored(tmp_path, capsys):
    """fair-esm's README passes BLAT's wild type on the command line: 263 residues, beyond the
    255 bytes of a file name, which `Path.is_file` raised OSError on."""
    from esmdist.cli import main

    sequence = BLAT.joinpath("wt.fasta").read_text().split("\n", 1)[1].replace("\n", "")
    assert len(sequence) == 263
    base = ["eval", "variants", "--model", "debug", "--dms", str(BLAT / "data.csv"),
            "--score-column", "log_fitness", "--offset", "24"]  # fmt: skip
    for given in (sequence, str(BLAT / "wt.fasta")):
        assert main([*base, "--sequence", given, "--out", str(tmp_path / str(len(given)))]) == 0
    literal, read = (json.loads((tmp_path / str(len(given)) / "variants.json").read_text())
                     for given in (sequence, str(BLAT / "wt.fasta")))  # fmt: skip
    assert literal["variants"] == read["variants"] == 951 and literal == read
    assert main([*base, "--sequence", str(tmp_path / "wt.fast")]) == 2
    assert "wt.fast': no such FASTA file, and not a protein sequence" in capsys.readouterr().err


def test_a_double_mutant_is_the_sum_of_its_single_site_masked_scores():
    """Meier et al. 2021, eq. 1 (masked marginals): Σ_i [log p(x_i = mt_i | x_−i) −
    log p(x_i = wt_i | x_−i)] over the mutated positions i, each masked alone in the wild type
    (not both at once, and not in the mutant). Computed here by hand from two masked forwards."""
    from esmdist import alphabet
    from esmdist.model import build_model, model_config

    torch.manual_seed(3)
    model = build_model(model_config("debug")).eval()
    sequence = wild_type()
    code = "L173H:P174S"
    (first, second) = parse_mutant(code, sequence, OFFSET, "row")
    by_hand = 0.0
    for mutation in (first, second):
        tokens = torch.from_numpy(alphabet.encode(sequence))[None]
        tokens[0, 1 + mutation.index] = alphabet.MASK
        with torch.no_grad():
            log_p = torch.log_softmax(model(tokens).logits[0, 1 + mutation.index].float(), -1)
        ids = {token: index for index, token in enumerate(alphabet.TOKENS)}
        by_hand += (log_p[ids[mutation.mt]] - log_p[ids[mutation.wt]]).item()
    got = score_mutants(model, sequence, [[first, second]], "masked-marginals")[0]
    assert got == pytest.approx(by_hand, abs=1e-5)
    singles = score_mutants(model, sequence, [[first], [second]], "masked-marginals")
    assert got == pytest.approx(singles.sum(), abs=1e-6)


def test_random_scores_give_the_floor_beside_rho():
    """|ρ| of random scores, as a distribution: the same figures as scipy's ρ over the same
    draws, and on YAP1's 319 variants a 95th percentile near 1.96/√n (0.11)."""
    from esmdist.eval.variants import random_spearman

    measured = np.array([float(row["log_fitness"]) for row in table(limit=1000)])
    found = random_spearman(measured, draws=200, seed=1)
    generator = np.random.default_rng(1)
    scores = generator.random((200, len(measured))).argsort(1).argsort(1)
    by_scipy = np.abs([spearman(s, measured) for s in scores])
    assert found["random_abs_spearman_mean"] == pytest.approx(by_scipy.mean(), abs=1e-9)
    assert found["random_abs_spearman_p95"] == pytest.approx(np.quantile(by_scipy, 0.95), abs=1e-9)
    assert 0.08 < random_spearman(measured)["random_abs_spearman_p95"] < 0.14

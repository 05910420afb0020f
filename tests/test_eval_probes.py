"""`esmdist eval ss-probe`, `homology`, `embed --plot`, `report` and the `--checkpoints`
emergence curve: the metrics on known answers, the commands on the bundled real sets (CB513,
NetSurfP-2.0 training chains, SCOP 1.75 domains), the curve over a real run's checkpoints, and
each command's bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from esmdist.cli import main
from esmdist.eval.homology import Domain, hit_rates, nearest
from esmdist.eval.secondary import Probe, read_netsurfp
from tests.adversarial.helpers import job
from tests.conftest import EVAL_DATA, make_shards

pytest.importorskip("sklearn")
CB513 = EVAL_DATA / "ss" / "CB513_HHblits.csv.gz"
SS_TRAIN = EVAL_DATA / "ss" / "netsurfp2_train_2k.csv.gz"
SCOP = EVAL_DATA / "scop" / "scop175_id40.fasta.gz"


def test_hit_rates_leave_out_the_own_family_and_superfamily():
    """Superfamily hits must come from another family, fold hits from another superfamily."""
    domains = [Domain("q", "a.1.1.1", ""), Domain("same-family", "a.1.1.1", ""),
               Domain("same-sf", "a.1.1.2", ""), Domain("same-fold", "a.1.2.1", ""),
               Domain("other", "b.1.1.1", "")]  # fmt: skip
    # q's nearest: same-family (left out at both levels), then other, then same-sf, same-fold.
    vectors = np.array([[1, 0, 0], [0.99, 0.1, 0], [0.6, 0.8, 0], [0.5, 0, 0.86],
                        [0.9, 0, 0.43]])  # fmt: skip
    rates = hit_rates(domains, vectors)
    assert nearest(vectors, 4)[0].tolist() == [1, 4, 2, 3]
    # Superfamily level (q, same-family, same-sf can hit): q and same-family rank "other"
    # first once their family is left out, same-sf finds same-family first.
    # Fold level (all but "other"): everyone's first candidate is "other" or not in the fold.
    assert rates == {"superfamily_hit1": 1 / 3, "superfamily_hit10": 1.0,
                     "superfamily_queries": 3, "fold_hit1": 0.0, "fold_hit10": 1.0,
                     "fold_queries": 4}  # fmt: skip


def test_netsurfp_files_read_and_bad_ones_are_named(tmp_path):
    chains = read_netsurfp(CB513, limit=5)
    assert len(chains) == 5 and set(chains[0].labels) == {3, 8}
    assert all(len(c.labels[8]) == len(c.sequence) == len(c.mask) for c in chains)
    train = read_netsurfp(SS_TRAIN, limit=3)
    assert set(train[0].labels) == {3} and train[0].id == "16vp-A" and not train[0].mask.all()
    bad = tmp_path / "bad.csv"
    bad.write_text("input, dssp3\nA C D, H H\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 2: the labels or mask do not have one"):
        read_netsurfp(bad)
    bad.write_text("input, dssp3\nA C, H X\n")
    with pytest.raises(ValueError, match=r"line 2: dssp3 has states \['X'\]"):
        read_netsurfp(bad)
    bad.write_text("sequence, label\nA, H\n")
    with pytest.raises(ValueError, match="not a NetSurfP-2.0 CSV"):
        read_netsurfp(bad)


def test_ss_probe_q3_q8_saved_and_reused(tmp_path, capsys):
    """8-state training labels give a Q8 too: train on CB513's last chains, score its first."""
    with gzip.open(CB513, "rt") as handle:
        lines = handle.read().splitlines()
    (tmp_path / "train8.csv").write_text("\n".join([lines[0], *lines[-60:]]) + "\n")
    out = tmp_path / "out"
    base = ["eval", "ss-probe", "--model", "debug", "--test", str(CB513), "--limit-test", "20"]
    assert main([*base, "--train", str(tmp_path / "train8.csv"), "--out", str(out)]) == 0
    found = json.loads((out / "ss_probe.json").read_text())
    assert 0.3 < found["q3"] <= 1 and 0 < found["q8"] <= 1
    assert (out / "ss3_probe.npz").is_file() and (out / "ss8_probe.npz").is_file()
    capsys.readouterr()
    assert main([*base, "--probe", str(out / "ss3_probe.npz"), str(out / "ss8_probe.npz")]) == 0
    assert f"Q3 {found['q3']:.4f}, Q8 {found['q8']:.4f}" in capsys.readouterr().out
    # 3-state training labels only: Q8 says why it is missing.
    assert main([*base, "--train", str(SS_TRAIN), "--limit-train", "40"]) == 0
    assert "Q8 n/a (the training labels are 3-state only)" in capsys.readouterr().out
    probe = Probe.load(out / "ss3_probe.npz")
    assert probe.states == 3 and probe.layer == 2 and probe.coef.shape == (3, 64)
    assert main(["eval", "ss-probe", "--model", "esm2_8M", "--test", str(CB513),
                 "--probe", str(out / "ss3_probe.npz"), "--limit-test", "1"]) == 2  # fmt: skip
    assert "a probe of 64-wide features, the model's are 320" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz: not an esmdist secondary-structure probe"):
        Probe.load(tmp_path / "junk.npz")


def test_homology_and_embed_plot_on_scop(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "homology", "--model", "debug", "--fasta", str(SCOP),
                 "--out", str(out)]) == 0  # fmt: skip
    found = json.loads((out / "homology.json").read_text())
    assert found["domains"] == 893 and found["superfamily_queries"] == 468
    assert found["fold_queries"] == 302 and 0 <= found["fold_hit1"] <= found["fold_hit10"] <= 1
    assert "superfamily" in capsys.readouterr().out
    assert main(["eval", "embed", "--model", "debug", "--fasta", str(SCOP), "--out",
                 str(tmp_path / "scop.parquet"), "--plot", str(tmp_path / "pca.png"),
                 "--label-regex", r" ([a-g])\."]) == 0  # fmt: skip
    assert (tmp_path / "pca.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "plain.fasta").write_text(">x no class here\nMKV\n>y\nMKL\n")
    assert main(["eval", "homology", "--model", "debug", "--fasta",
                 str(tmp_path / "plain.fasta")]) == 2  # fmt: skip
    assert "record 'x' has no SCOP class in its header" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_records):
    """A real debug run with committed checkpoints at steps 2 and 4."""
    from esmdist.train import train

    folder = tmp_path_factory.mktemp("curve")
    shards = make_shards(folder, demo_records[:600], 100)
    out = folder / "run"
    train(job(shards, out, str(out / "checkpoints")))
    return shards, out


def test_the_emergence_curve_over_a_runs_checkpoints(run_dir, tmp_path, capsys):
    shards, out = run_dir
    assert main(["eval", "perplexity", "--checkpoints", str(out), "--shards", str(shards),
                 "--crop-length", "512"]) == 0  # fmt: skip
    curve = json.loads((out / "perplexity_curve.json").read_text())["rows"]
    assert [row["step"] for row in curve] == [2, 4] and all(r["perplexity"] > 1 for r in curve)
    assert (out / "perplexity_curve.png").read_bytes()[:4] == b"\x89PNG"
    fit = sorted((EVAL_DATA / "structures" / "fit").iterdir())[:3]
    test = sorted((EVAL_DATA / "structures" / "test").iterdir())[:2]
    assert main(["eval", "contacts", "--checkpoints", str(out / "checkpoints"), *map(str, test),
                 "--fit", *map(str, fit), "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "contacts_curve.json").read_text())["rows"]
    assert [row["step"] for row in rows] == [2, 4]
    # Four steps teach the attention no contacts: the fit keeps no head at either step, which
    # the curve says instead of a number, beside the same random-ranking baseline.
    assert all(row["mean_long_P@L"] is None for row in rows)
    assert rows[0]["mean_random_long_P@L"] == rows[1]["mean_random_long_P@L"] > 0
    assert "no prediction" in capsys.readouterr().out
    assert main(["eval", "ss-probe", "--checkpoints", str(out), "--train", str(SS_TRAIN),
                 "--limit-train", "20", "--test", str(CB513), "--limit-test", "10",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    assert len(json.loads((tmp_path / "ss_probe_curve.json").read_text())["rows"]) == 2
    assert main(["eval", "perplexity", "--checkpoints", str(tmp_path), "--shards",
                 str(shards)]) == 2  # fmt: skip
    assert "no committed checkpoints" in capsys.readouterr().err


def test_report_on_a_trained_checkpoint(run_dir, tmp_path):
    shards, out = run_dir
    report = tmp_path / "report"
    assert main(["eval", "report", "--model", str(out / "checkpoints" / "step_000000004"),
                 "--out", str(report), "--shards", str(shards), "--crop-length", "512",
                 "--ss-train-chains", "40", "--ss-test-chains", "20"]) == 0  # fmt: skip
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"perplexity", "contacts", "variants", "ss", "homology"} <= set(metrics)
    assert metrics["variants"]["variants"] == 319 and metrics["contacts"]["test_structures"] == 12
    text = (report / "report.md").read_text()
    assert "![contact map](contact_map.png)" in text and "Q3 = " in text
    for figure in ("contact_map.png", "embedding_projection.png", "variants.png"):
        assert (report / figure).read_bytes()[:4] == b"\x89PNG"
    assert torch.isfinite(torch.tensor(metrics["perplexity"]["perplexity"]))
    # JSON + CSV for each measurement, as docs/evaluation.md says.
    for name in ("perplexity", "contacts", "variants", "ss_probe", "homology"):
        assert json.loads((report / f"{name}.json").read_text())["rows"]
        assert (report / f"{name}.csv").read_text().count("\n") > 1
    # Each headline beside a baseline of the same run; no published figure for a debug model.
    h = metrics["homology"]
    assert 0 <= h["random_model_fold_hit10"] <= 1 and metrics["contacts"]["mean_random_long_P@L"]
    assert "ESM-2 8M" not in text and "no published value for this size" in text
    assert "## What this shows" in text and "random ranking" in text


def test_report_on_a_random_8m_model_through_its_hf_directory(tmp_path):
    """Every command of the report on the bundled sets with ESM-2 8M's shape (random weights),
    read as a Hugging Face directory."""
    from esmdist.model import build_model, model_config
    from esmdist.model.convert import save_hf

    torch.manual_seed(5)
    model = build_model(model_config("esm2_8M"))
    save_hf(model.state_dict(), model.config, tmp_path / "hf")
    report = tmp_path / "report"
    assert main(["eval", "report", "--model", str(tmp_path / "hf"), "--out", str(report),
                 "--ss-train-chains", "30", "--ss-test-chains", "10"]) == 0  # fmt: skip
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["parameters"] == model.config.num_params() and metrics["arch"] == "esm2"
    assert metrics["homology"]["domains"] == 893 and metrics["ss"]["test_chains"] == 10
    assert -1 <= metrics["variants"]["spearman"] <= 1
    assert (report / "contacts.csv").read_text().count("\n") == 13  # header + 12 structures
    # ESM-2 8M's shape: its own published figures, named as such.
    text = (report / "report.md").read_text()
    assert "published esm2_8M: 0.159" in text and "published esm2_8M: 0.229" in text


def test_a_run_directory_is_a_model(run_dir, tmp_path, capsys):
    """--model RUN_DIR: its final/ export when there is one, else its newest checkpoint."""
    import shutil

    from esmdist.export import model_weights, run_model

    _, out = run_dir
    assert run_model(str(out)) == str(out / "final")
    copy = tmp_path / "unfinished"
    shutil.copytree(out / "checkpoints", copy / "checkpoints")
    assert run_model(str(copy)) == str(copy / "checkpoints" / "step_000000004")
    assert run_model(str(copy / "checkpoints")) == str(copy / "checkpoints" / "step_000000004")
    final, newest = model_weights(str(out))[1], model_weights(str(copy))[1]
    assert all(torch.allclose(final[k], newest[k]) for k in final)
    assert main(["eval", "pppl", "--model", str(copy), "--fasta", str(SCOP), "--limit", "1"]) == 0
    assert "a run directory; its model is" in capsys.readouterr().out
    assert run_model(str(tmp_path / "empty")) is None

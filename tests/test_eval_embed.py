"""`esmdist eval embed`: mean representations equal fair-esm's (`repr_layers`, averaged over
the residues as its `extract.py` does), in the input order, streamed to parquet."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from esmdist.eval.embed import embed_fasta, resolve_layers
from tests.reference import esmdist_from_fair, fair_esm1b, fair_esm2


class Record:
    def __init__(self, id_: str, sequence: str):
        self.id, self.sequence = id_, sequence


@pytest.fixture(scope="module")
def records(demo_records):
    # Varied lengths, so that the length-sorted batches pad and reorder.
    picked = [r for r in demo_records if 30 < len(r[1]) < 400][:40]
    return [Record(h.split()[0], s) for h, s in picked]


@pytest.mark.parametrize("make", [fair_esm2, fair_esm1b], ids=["esm2", "esm1b"])
def test_mean_representations_equal_fair_esms(make, records, tmp_path):
    import esm

    fair = make()
    _, ours = esmdist_from_fair(fair)
    layers = resolve_layers([0, -1], ours.config.num_layers)
    out = tmp_path / "embeddings.parquet"
    report = embed_fasta(ours, records, str(out), layers, per_residue=True, max_tokens=1500)
    table = pq.read_table(out).to_pylist()
    assert report.sequences == len(records) and [r["id"] for r in table] == [r.id for r in records]
    converter = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    for row, record in zip(table, records, strict=True):
        _, _, tokens = converter([(record.id, record.sequence)])
        with torch.no_grad():
            reps = fair(tokens, repr_layers=layers)["representations"]
        for layer in layers:
            expected = reps[layer][0, 1 : len(record.sequence) + 1]
            assert torch.allclose(torch.tensor(row[f"mean_{layer}"]), expected.mean(0), atol=1e-5)
            assert torch.allclose(torch.tensor(row[f"residues_{layer}"]), expected, atol=1e-5)
    assert not (tmp_path / "embeddings.parquet.partial").exists()


def test_esm1b_cuts_long_sequences_and_counts_them(tmp_path):
    from esmdist.model import ESM, ModelConfig

    model = ESM(ModelConfig(arch="esm1b", num_layers=1, embed_dim=32, attention_heads=2,
                            max_positions=34, token_dropout=False)).eval()  # fmt: skip
    records = [Record("short", "MKTAYIAKQR"), Record("long", "MKTAYIAKQR" * 5)]
    report = embed_fasta(model, records, str(tmp_path / "e.parquet"), [1], max_tokens=64)
    assert (report.sequences, report.truncated) == (2, 1)
    assert pq.read_table(tmp_path / "e.parquet").column("length").to_pylist() == [10, 32]


def test_bad_requests_are_errors_and_leave_no_file(tmp_path):
    from esmdist.model import build_model, model_config

    model = build_model(model_config("debug")).eval()
    with pytest.raises(ValueError, match="the model has layers 0–2"):
        resolve_layers([5], model.config.num_layers)
    with pytest.raises(ValueError, match="no sequences to embed"):
        embed_fasta(model, [], str(tmp_path / "none.parquet"), [2])
    assert not list(tmp_path.iterdir())


def test_a_runs_metrics_plot_to_a_png(tmp_path, capsys):
    """`esmdist plot RUN_DIR` on a metrics.jsonl as the trainer writes it."""
    import json

    from esmdist.cli import main

    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 3.5 - s / 100, "lr": 1e-3, "tokens_per_s": 5000.0} for s in
             range(10, 110, 10)] + [{"step": 100, "valid_perplexity": 15.1}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["plot", str(run)]) == 0
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("{not json\n")
    assert main(["plot", str(run)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err

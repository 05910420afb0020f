"""Published fair-esm checkpoint files, safe loading, `esmdist export`, named sizes on meta."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import esm
import pytest
import torch
from transformers import EsmForMaskedLM

from esmdist import alphabet
from esmdist.model import ESM, MODEL_SIZES, build_model, model_config
from esmdist.model.convert import load_fair_esm_checkpoint, save_fair_esm_checkpoint, save_hf
from tests.reference import esm1b_args, esmdist_from_fair, fair_esm1b, fair_esm2, masked_batch


def fair_esm_load_local(path):
    """fair-esm 2.0.0 calls torch.load without weights_only; torch >= 2.6 then refuses the
    Namespace its own files hold unless it is allow-listed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, _ = esm.pretrained.load_model_and_alphabet_local(path)
    return model.eval()


def write_published_esm2(model: torch.nn.Module, path) -> None:
    """The layout of fair-esm's released `esm2_t*_UR50D.pt` and its regression companion,
    written independently of esmdist's own writer."""
    state = model.state_dict()
    regression = {k: state.pop(k) for k in list(state) if k.startswith("contact_head.")}
    published = {
        (f"encoder.{k}" if k.startswith("lm_head") else f"encoder.sentence_encoder.{k}"): v
        for k, v in state.items()
    }
    cfg = argparse.Namespace(
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=True,
    )
    torch.save({"model": published, "cfg": {"model": cfg}}, path)
    torch.save({"model": regression}, path.with_name(path.stem + "-contact-regression.pt"))


def write_published_esm1b(model: torch.nn.Module, path) -> None:
    state = model.state_dict()
    regression = {k: state.pop(k) for k in list(state) if k.startswith("contact_head.")}
    published = {
        (f"encoder.{k}" if k.startswith("lm_head") else f"encoder.sentence_encoder.{k}"): v
        for k, v in state.items()
    }
    args = esm1b_args(len(model.layers), model.args.embed_dim, model.args.attention_heads)
    args = argparse.Namespace(**{f"encoder_{k}" if k == "layers" else k: v
                                 for k, v in vars(args).items()})  # fmt: skip
    torch.save({"model": published, "args": args}, path)
    torch.save({"model": regression}, path.with_name(path.stem + "-contact-regression.pt"))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["esm2", "esm1b"])
def test_published_layout_loads_and_matches_fair_esm(arch, tmp_path, real_sequences):
    if arch == "esm2":
        fair, path = fair_esm2(), tmp_path / "esm2_t3_tiny_UR50D.pt"
        write_published_esm2(fair, path)
    else:
        fair, path = fair_esm1b(), tmp_path / "esm1b_t3_tiny_UR50S.pt"
        write_published_esm1b(fair, path)
    # fair-esm itself reads what we wrote: the layout is the real one.
    reference = fair_esm_load_local(path)
    config, state = load_fair_esm_checkpoint(path)
    ours = ESM(config).eval()
    ours.load_state_dict(state)
    tokens = masked_batch(real_sequences)
    assert (ours(tokens).logits - reference(tokens)["logits"]).abs().max() < 1e-4
    contacts = ours.predict_contacts(tokens)
    assert (contacts - reference.predict_contacts(tokens)).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("make", [fair_esm2, fair_esm1b])
def test_our_fair_esm_files_load_in_fair_esm(make, tmp_path, real_sequences):
    config, ours = esmdist_from_fair(make())
    # fair-esm zeroes ESM-1b's <mask> embedding when it loads (token dropout); trained
    # checkpoints already have it at zero.
    ours.embed_tokens.weight.data[alphabet.MASK] = 0
    path = tmp_path / ("esm2_t3_out.pt" if config.arch == "esm2" else "esm1b_t3_out.pt")
    save_fair_esm_checkpoint(ours.state_dict(), config, path)
    reference = fair_esm_load_local(path)
    tokens = masked_batch(real_sequences)
    assert (ours(tokens).logits - reference(tokens)["logits"]).abs().max() < 1e-4


def test_a_fair_esm_file_needs_the_documented_safe_globals_line(tmp_path):
    """Stock fair-esm 2.0.0 on torch >= 2.6 refuses every ESM file (its own published ones too)
    for the argparse.Namespace inside; the README's one-line workaround is what loads it."""
    config, ours = esmdist_from_fair(fair_esm2())
    path = tmp_path / "esm2_t3_out.pt"
    save_fair_esm_checkpoint(ours.state_dict(), config, path)
    with pytest.raises(Exception, match="argparse.Namespace"):
        esm.pretrained.load_model_and_alphabet_local(path)
    assert fair_esm_load_local(path) is not None


@pytest.mark.parametrize("make, name", [(fair_esm2, "mine.pt"), (fair_esm1b, "esm2_mine.pt")])
def test_a_name_fair_esm_would_misread_is_refused(make, name, tmp_path, capsys):
    from esmdist.cli import main

    config, ours = esmdist_from_fair(make())
    source = tmp_path / "hf"
    save_hf(ours.state_dict(), config, source)
    assert main(["export", str(source), "--to", "fair-esm", str(tmp_path / name)]) == 2
    assert "fair-esm picks the format from the file name" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_cannot_execute_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "esm2_evil.pt"
    torch.save({"model": {}, "cfg": {"model": _RunsCode()}}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_fair_esm_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_bad_checkpoint_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_fair_esm_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_fair_esm_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fair-esm checkpoint"):
        load_fair_esm_checkpoint(tmp_path / "other.pt")
    torch.save({"model": {}, "args": argparse.Namespace(arch="msa_transformer")}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="'msa_transformer' is not supported"):
        load_fair_esm_checkpoint(tmp_path / "m.pt")


@torch.no_grad()
def test_export_cli_on_an_8M_layout_file(tmp_path, real_sequences):
    """`esmdist export esm2_t6_8M_UR50D.pt --to hf out/`, the issue's acceptance check."""
    fair = fair_esm2(num_layers=6, embed_dim=320, heads=20, seed=3)
    path = tmp_path / "esm2_t6_8M_UR50D.pt"
    write_published_esm2(fair, path)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "esmdist.cli", "export", str(path), "--to", "hf", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "7,512,474 parameters" in done.stdout
    hf = EsmForMaskedLM.from_pretrained(out).eval()
    tokens = masked_batch(real_sequences)
    logits = hf(input_ids=tokens, attention_mask=tokens.ne(alphabet.PAD)).logits
    diff = (logits - fair.eval()(tokens)["logits"]).abs().max().item()
    print(f"esm2 8M layout: max |logit difference| fair-esm vs exported HF = {diff:.2e}")
    assert diff < 1e-4


def test_export_cli_reports_a_missing_source(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "esmdist.cli", "export", str(tmp_path / "nope.pt"), "--to", "hf",
         str(tmp_path / "o")], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "nope.pt: no such checkpoint file or model directory" in done.stderr


PUBLISHED_PARAMS = {  # fair-esm model names → parameter count (M), Lin et al. 2023 Table S1
    "esm2_8M": 8,
    "esm2_35M": 35,
    "esm2_150M": 150,
    "esm2_650M": 650,
    "esm2_3B": 3000,
    "esm2_15B": 15000,
    "esm1b_650M": 650,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_named_sizes_build_on_meta_with_published_counts(name):
    config = model_config(name)
    with torch.device("meta"):
        model = ESM(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == config.num_params()
    assert abs(count / 1e6 - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.1
    assert all(p.is_meta for p in model.parameters())


def test_small_sizes_count_like_fair_esm():
    for name, layers, dim in (("esm2_8M", 6, 320), ("esm2_35M", 12, 480)):
        fair = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=20)
        assert sum(p.numel() for p in fair.parameters()) == model_config(name).num_params()


def test_registry_errors_name_the_choices():
    with pytest.raises(KeyError, match="known sizes: debug, esm2_8M"):
        model_config("esm2_7M")
    assert "debug" in MODEL_SIZES


def test_meta_build_then_materialise_initialises_every_weight():
    model = build_model(model_config("debug"))
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    assert model.embed_tokens.weight[alphabet.PAD].abs().sum() == 0
    assert model.layers[0].fc1.weight.std().item() == pytest.approx(0.02, rel=0.2)

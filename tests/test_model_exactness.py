"""esmdist's ESM-2 / ESM-1b against fair-esm and Hugging Face, fp32, on real sequences."""

from __future__ import annotations

import esm
import pytest
import torch
from transformers import EsmForMaskedLM, EsmTokenizer

from esmdist import alphabet
from esmdist.model import ESM
from esmdist.model.convert import load_hf, save_hf, to_fair_esm_state_dict
from tests.reference import esmdist_from_fair, fair_esm1b, fair_esm2, masked_batch

TOL = 1e-4
ARCHES = {"esm2": fair_esm2, "esm1b": fair_esm1b}


@pytest.fixture(params=sorted(ARCHES))
def pair(request):
    fair = ARCHES[request.param]()
    config, ours = esmdist_from_fair(fair)
    return request.param, fair, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_logits_and_representations_match_fair_esm(pair, real_sequences):
    arch, fair, ours = pair
    tokens = masked_batch(real_sequences)
    assert tokens.eq(alphabet.PAD).any(), "the batch must exercise padding"
    layers = [0, 1, fair_layers := len(fair.layers)]
    expected = fair(tokens, repr_layers=layers)
    got = ours(tokens, repr_layers=layers)
    diff = max_diff(got.logits, expected["logits"])
    print(f"{arch}: max |logit difference| vs fair-esm = {diff:.2e}")
    assert diff < TOL
    # Logits must be informative, or the comparison above proves little.
    assert expected["logits"].std() > 0.1
    for layer in layers:
        assert max_diff(got.representations[layer], expected["representations"][layer]) < TOL
    assert fair_layers == ours.config.num_layers


@torch.no_grad()
def test_contacts_and_attention_maps_match_fair_esm(pair, real_sequences):
    arch, fair, ours = pair
    tokens = masked_batch(real_sequences)
    expected = fair(tokens, return_contacts=True)
    got = ours(tokens, return_contacts=True)
    assert max_diff(got.attentions, expected["attentions"]) < TOL
    diff = max_diff(got.contacts, expected["contacts"])
    print(f"{arch}: max |contact difference| vs fair-esm = {diff:.2e}")
    assert diff < TOL
    assert max_diff(ours.predict_contacts(tokens), fair.predict_contacts(tokens)) < TOL


@torch.no_grad()
def test_fused_and_explicit_attention_paths_agree(pair, real_sequences):
    _, _, ours = pair
    tokens = masked_batch(real_sequences)
    assert max_diff(ours(tokens).logits, ours(tokens, need_weights=True).logits) < 1e-5


@torch.no_grad()
def test_round_trip_to_fair_esm_state_dict(pair):
    _, fair, ours = pair
    back = to_fair_esm_state_dict(ours.state_dict(), ours.config)
    expected = fair.state_dict()
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


@torch.no_grad()
def test_hugging_face_export_and_import(pair, real_sequences, tmp_path):
    arch, _, ours = pair
    tokens = masked_batch(real_sequences)
    save_hf(ours.state_dict(), ours.config, tmp_path)
    hf = EsmForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expected = hf(input_ids=tokens, attention_mask=tokens.ne(alphabet.PAD)).logits
    diff = max_diff(ours(tokens).logits, expected)
    print(f"{arch}: max |logit difference| vs HF EsmForMaskedLM = {diff:.2e}")
    assert diff < TOL
    # Back from the directory: the same weights, bit for bit.
    config, state = load_hf(tmp_path)
    assert config == ours.config
    original = ours.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    # The tokenizer files written beside the weights agree with our alphabet.
    tokenizer = EsmTokenizer.from_pretrained(tmp_path)
    assert tokenizer(real_sequences[1])["input_ids"] == alphabet.encode(real_sequences[1]).tolist()


@torch.no_grad()
def test_reads_a_directory_written_by_transformers(pair, real_sequences, tmp_path):
    _, _, ours = pair
    save_hf(ours.state_dict(), ours.config, tmp_path / "ours")
    hf = EsmForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    torch.nn.init.normal_(hf.lm_head.dense.weight, std=0.05)  # differ from what we wrote
    hf.save_pretrained(tmp_path / "hf")
    config, state = load_hf(tmp_path / "hf")
    model = ESM(config).eval()
    model.load_state_dict(state)
    tokens = masked_batch(real_sequences)
    expected = hf(input_ids=tokens, attention_mask=tokens.ne(alphabet.PAD)).logits
    assert max_diff(model(tokens).logits, expected) < TOL


def test_esm1b_rejects_sequences_past_1024_positions():
    fair = fair_esm1b(num_layers=1)
    _, ours = esmdist_from_fair(fair)
    tokens = torch.from_numpy(alphabet.batch_encode(["A" * 1023]))
    with pytest.raises(ValueError, match="at most 1024 tokens per sequence"):
        ours(tokens)
    ours(torch.from_numpy(alphabet.batch_encode(["A" * 1022])))  # exactly at the limit


def test_fair_esm_reference_is_the_published_class():
    assert isinstance(fair_esm2(num_layers=1), esm.model.esm2.ESM2)

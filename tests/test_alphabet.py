"""The ESM vocabulary and encoding, pinned against fair-esm's own Alphabet."""

from __future__ import annotations

import esm
import numpy as np
import pytest
import torch

from esmdist import alphabet


@pytest.fixture(scope="module")
def fair_alphabet():
    return esm.data.Alphabet.from_architecture("ESM-1b")


def test_tokens_match_fair_esm(fair_alphabet):
    assert list(alphabet.TOKENS) == fair_alphabet.all_toks
    assert alphabet.VOCAB_SIZE == 33
    assert (alphabet.CLS, alphabet.PAD, alphabet.EOS, alphabet.UNK, alphabet.MASK) == (
        fair_alphabet.cls_idx,
        fair_alphabet.padding_idx,
        fair_alphabet.eos_idx,
        fair_alphabet.unk_idx,
        fair_alphabet.mask_idx,
    )
    assert [alphabet.TOKENS[i] for i in alphabet.STANDARD_RESIDUE_IDS] == list(
        alphabet.STANDARD_RESIDUES
    )


def test_golden_tensor():
    # Pinned by hand from fair-esm 2.0.0's BatchConverter on the start of UniProt P69905 (HBA_HUMAN).
    assert alphabet.encode("MVLSPADKTNVKAAW").tolist() == [
        0, 20, 7, 4, 8, 14, 5, 13, 15, 11, 17, 7, 15, 5, 5, 22, 2
    ]  # fmt: skip


def test_batch_matches_fair_esm_batch_converter(fair_alphabet, demo_records):
    records = demo_records[:64]
    _, _, expected = fair_alphabet.get_batch_converter()(records)
    ours = alphabet.batch_encode([s for _, s in records])
    assert torch.equal(torch.from_numpy(ours), expected)


def test_every_bundled_sequence_encodes_like_fair_esm(fair_alphabet, demo_records):
    for _, seq in demo_records[::37]:
        assert alphabet.encode(seq).tolist() == [
            fair_alphabet.cls_idx,
            *fair_alphabet.encode(seq),
            fair_alphabet.eos_idx,
        ]


def test_unknown_characters_raise_with_position():
    with pytest.raises(alphabet.UnknownResidueError, match=r"'J' at position 3"):
        alphabet.encode_residues("MKVJL")
    with pytest.raises(alphabet.UnknownResidueError, match=r"'m' at position 0"):
        alphabet.encode_residues("mkv")
    with pytest.raises(alphabet.UnknownResidueError, match=r"position 2"):
        alphabet.encode_residues("MKé")


def test_unknown_characters_map_to_unk_by_choice():
    ids = alphabet.encode_residues("MKJ*L", unknown="unk")
    assert ids.tolist() == [20, 15, alphabet.UNK, alphabet.UNK, 4]


def test_encoding_is_vectorised_and_exact_on_long_input():
    seq = "".join(alphabet.RESIDUE_SYMBOLS[i % 27] for i in range(100_000))
    ids = alphabet.encode_residues(seq)
    assert ids.dtype == np.uint8 and len(ids) == 100_000
    assert alphabet.decode(ids) == seq

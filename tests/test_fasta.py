"""The FASTA reader: header formats, normalisation and every bad input, without processes."""

from __future__ import annotations

import gzip

import pytest

from esmdist.data.fasta import FastaError, ReadPolicy, ReadReport, parse_header, read_fasta
from tests.conftest import TEST_DATA


def write(tmp_path, text: bytes | str, name="in.fasta"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_header_formats():
    assert parse_header(
        "sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606 GN=HBA1 PE=1 SV=2"
    ) == ("P69905", {"db": "sp", "accession": "P69905", "entry": "HBA_HUMAN",
                     "description": "Hemoglobin subunit alpha", "OS": "Homo sapiens",
                     "OX": "9606", "GN": "HBA1", "PE": "1", "SV": "2"})  # fmt: skip
    assert parse_header(
        "UniRef50_A0A1E3NP16 Uncharacterized protein n=2 Tax=Pichia membranifaciens "
        "TaxID=4926 RepID=A0A1E3NP16_9ASCO"
    ) == ("UniRef50_A0A1E3NP16", {"description": "Uncharacterized protein", "n": "2",
                                  "Tax": "Pichia membranifaciens", "TaxID": "4926",
                                  "RepID": "A0A1E3NP16_9ASCO"})  # fmt: skip
    assert parse_header("UPI00000000F6 status=active") == ("UPI00000000F6", {"status": "active"})
    assert parse_header("pdb_conservation|5ctv-A") == ("pdb_conservation|5ctv-A", {})


def test_real_uniprot_and_uniref_files():
    uniprot = list(read_fasta(str(TEST_DATA / "mmseqs2_QUERY_uniprot500.fasta")))
    assert len(uniprot) == 500
    assert uniprot[0].id == "A7TBS3" and uniprot[0].fields["db"] == "tr"
    uniref = list(read_fasta(str(TEST_DATA / "esm_some_proteins_uniref50.fasta")))
    assert len(uniref) == 15 and all(r.id.startswith("UniRef50_") for r in uniref)


def test_reads_the_bundled_set_exactly(demo_records):
    from tests.conftest import DEMO_FASTA

    got = [(r.header, r.sequence) for r in read_fasta(str(DEMO_FASTA))]
    assert got == demo_records


def test_records_and_lines_are_numbered(tmp_path):
    path = write(tmp_path, "\n\n>a\nMKV\nLL\n>b desc\nAAA\n")
    records = list(read_fasta(path))
    assert [(r.id, r.sequence, r.number, r.line) for r in records] == [
        ("a", "MKVLL", 1, 3),
        ("b", "AAA", 2, 6),
    ]


@pytest.mark.parametrize(
    ("text", "counter", "sequence"),
    [
        (">a\nmkvLL\n", "lowercase_uppercased", "MKVLL"),
        (">a\nMKVLL*\n", "terminal_stop_removed", "MKVLL"),
        (">a\r\nMKV\r\nLL\r\n", "whitespace_removed", "MKVLL"),
        (">a\nMKV LL\tA\n", "whitespace_removed", "MKVLLA"),
    ],
)
def test_normalisations_are_counted(tmp_path, text, counter, sequence):
    report = ReadReport()
    records = list(read_fasta(write(tmp_path, text), report=report))
    assert [r.sequence for r in records] == [sequence]
    assert report.normalised[counter] == 1


BAD = {
    "internal_stop": (">ok\nMKV\n>bad\nMK*VL\n", "record 2 \\(line 3\\).*'\\*' at residue 3"),
    "invalid_character": (">ok\nMKV\n>bad\nMKJVL\n", "record 2 \\(line 3\\).*'J' at residue 3"),
    "digits": (">ok\nMKV\n>bad\n1 MKVL\n", "record 2 \\(line 3\\).*'1' at residue 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_characters_follow_the_policy(tmp_path, case):
    text, message = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(FastaError, match=message) as error:
        list(read_fasta(path))
    assert path in str(error.value) and "--on-invalid" in str(error.value)
    report = ReadReport()
    assert [r.id for r in read_fasta(path, "skip", report=report)] == ["ok"]
    reason = "internal_stop" if case == "internal_stop" else "invalid_character"
    assert report.skipped == {reason: 1}
    report = ReadReport()
    mapped = list(read_fasta(path, "map-x", report=report))
    assert "X" in mapped[1].sequence and report.normalised["mapped_to_x"] == 1


def test_header_without_sequence(tmp_path):
    path = write(tmp_path, ">a\nMKV\n>empty\n>c\nLL\n")
    with pytest.raises(FastaError, match=r"record 2 \(line 3\): header 'empty' has no sequence"):
        list(read_fasta(path))
    with pytest.raises(FastaError, match="no sequence"):
        list(read_fasta(path, "map-x"))
    report = ReadReport()
    assert [r.id for r in read_fasta(path, "skip", report=report)] == ["a", "c"]
    assert report.skipped == {"empty_sequence": 1}


def test_non_utf8_header(tmp_path):
    path = write(tmp_path, b">ok\nMKV\n>bad\xff\xfe name\nMKV\n")
    with pytest.raises(FastaError, match=r"record 2 \(line 3\): header is not UTF-8"):
        list(read_fasta(path))
    report = ReadReport()
    assert [r.id for r in read_fasta(path, "skip", report=report)] == ["ok"]
    assert report.skipped == {"non_utf8_header": 1}


def test_empty_file_and_text_before_first_header(tmp_path):
    with pytest.raises(FastaError, match="in.fasta: the input is empty"):
        list(read_fasta(write(tmp_path, "")))
    with pytest.raises(FastaError, match="the input is empty"):
        list(read_fasta(write(tmp_path, "\n\n  \n", "blank.fasta")))
    with pytest.raises(FastaError, match=r"line 2: text before the first '>'"):
        list(read_fasta(write(tmp_path, "\nMKVLL\n>a\nMKV\n", "x.fasta")))


def test_missing_input(tmp_path):
    with pytest.raises(FastaError, match="nope.fasta: input does not exist"):
        list(read_fasta(str(tmp_path / "nope.fasta")))


def test_truncated_gzip(tmp_path, demo_records):
    text = "".join(f">{h}\n{s}\n" for h, s in demo_records[:300]).encode()
    data = gzip.compress(text)
    path = write(tmp_path, data[: len(data) // 2], "cut.fasta.gz")
    with pytest.raises(FastaError, match="cut.fasta.gz: compressed stream is corrupt or truncated"):
        list(read_fasta(path))


def test_compressed_inputs_read_like_plain(tmp_path, demo_records):
    import zstandard

    text = "".join(f">{h}\n{s}\n" for h, s in demo_records[:200]).encode()
    plain = [r.sequence for r in read_fasta(write(tmp_path, text))]
    assert [
        r.sequence for r in read_fasta(write(tmp_path, gzip.compress(text), "a.fa.gz"))
    ] == plain
    zst = zstandard.ZstdCompressor().compress(text)
    assert [r.sequence for r in read_fasta(write(tmp_path, zst, "a.fa.zst"))] == plain


def test_length_filters_count(tmp_path):
    long = "ACDEFGHIKLMNPQRSTVWY" * 5000  # 100,000 residues
    path = write(tmp_path, f">short\nMK\n>long\n{long}\n>mid\nMKVLL\n")
    assert [len(r.sequence) for r in read_fasta(path)] == [2, 100_000, 5]
    report = ReadReport()
    assert [r.id for r in read_fasta(path, min_length=3, max_length=1000, report=report)] == ["mid"]
    assert report.skipped == {"too_short": 1, "too_long": 1}


def test_blocks_do_not_split_records(tmp_path, demo_records, monkeypatch):
    import esmdist.data.fasta as fasta

    monkeypatch.setattr(fasta, "BLOCK_BYTES", 777)
    text = "".join(f">{h}\n{s}\n" for h, s in demo_records[:100])
    records = list(read_fasta(write(tmp_path, text)))
    assert [(r.header, r.sequence) for r in records] == demo_records[:100]
    assert records[-1].number == 100


def _both_parsers(path, **policy):
    """(records and report of parse_block, the same of parse_block_table, blocks taken by
    the array path) over every block of `path`."""
    from esmdist.data import fasta

    slow, fast, slow_report, fast_report, regular = [], [], ReadReport(), ReadReport(), 0
    for block, record, line in fasta.raw_blocks(path):
        args = (path, block, record, line, ReadPolicy(policy.get("on_invalid", "error"),
                policy.get("min_length", 1), policy.get("max_length")))  # fmt: skip
        if not policy.get("table_only"):
            slow += [(r.id, r.sequence, r.number) for r in fasta.parse_block(*args, slow_report)]
        table = fasta.parse_block_table(*args, fast_report)
        fast += list(zip(*(table[c].to_pylist() for c in fasta.RECORD_COLUMNS), strict=True))
        regular += fasta._regular_block_table(block, record) is not None
    return (slow, slow_report.to_dict()), (fast, fast_report.to_dict()), regular


@pytest.mark.parametrize(
    "name", ["mmseqs2_QUERY_uniprot500.fasta", "esm_some_proteins_uniref50.fasta", "demo"]
)
def test_array_parser_matches_record_parser_on_real_files(name, tmp_path, monkeypatch):
    """UniProtKB (sp|/tr| ids), UniRef and the bundled set, cut into many small blocks and
    length-filtered: the sharder's array parser yields exactly the records, numbers and counts
    of the per-record parser, and takes every block of these regular files itself."""
    from esmdist.data import fasta
    from tests.conftest import DEMO_FASTA

    monkeypatch.setattr(fasta, "BLOCK_BYTES", 1500)
    path = str(DEMO_FASTA if name == "demo" else TEST_DATA / name)
    slow, fast, regular = _both_parsers(path, min_length=30, max_length=400)
    assert fast == slow and len(slow[0]) > 5 and slow[1]["skipped"]
    blocks = sum(1 for _ in fasta.raw_blocks(path))
    assert regular == blocks > 2


def test_array_parser_hands_irregular_blocks_to_the_record_parser(tmp_path, demo_records):
    (h1, s1), (h2, s2) = demo_records[:2]
    odd = [
        f">{h1}\n{s1.lower()}\n",  # lowercase
        f">{h1}\r\n{s1}\r\n",  # CRLF
        f">{h1}\n{s1[:5]} {s1[5:]}\n",  # blank inside a sequence
        f">{h1}\n{s1}*\n",  # terminal stop
        f">{h1}\n{s1[:5]}*{s1[5:]}\n",  # internal stop
        f">{h1}\n{s1}9\n",  # digit
        f">{h1}\n\n",  # no sequence
        f">{h1}\tx\n{s1}\n",  # tab in the header
        f">sp|P1|X_HUMAN desc\n{s1}\n",  # UniProt id (regular: stays on the array path)
        f">Ünï {h1}\n{s1}\n",  # non-ASCII header
        f">{h1}\n{s1}",  # no final line end
    ]
    for number, text in enumerate(odd):
        path = write(tmp_path, f">{h2}\n{s2}\n" + text, f"odd{number}.fasta")
        for policy in ("error", "skip", "map-x"):
            try:
                slow, fast, _ = _both_parsers(path, on_invalid=policy)
            except FastaError as slow_error:  # the record parser runs first on each block
                with pytest.raises(FastaError) as fast_error:
                    _both_parsers(path, on_invalid=policy, table_only=True)
                assert str(fast_error.value) == str(slow_error), (number, policy)
            else:
                assert fast == slow, (number, policy)

"""The offline sharder end to end: determinism, splits, clusters, resume, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from esmdist.cli import parse_size, parse_splits
from esmdist.data.format import MANIFEST
from esmdist.shard import ShardError, ShardOptions, run_sharding
from tests.conftest import REPO
from tests.distributed import child_processes


def fasta_text(records) -> str:
    return "".join(f">{h}\n{s}\n" for h, s in records)


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory, demo_records):
    """1,200 real records split over two input files."""
    folder = tmp_path_factory.mktemp("inputs")
    a, b = folder / "a.fasta", folder / "b.fasta"
    a.write_text(fasta_text(demo_records[:700]))
    b.write_text(fasta_text(demo_records[700:1200]))
    return str(a), str(b)


def file_digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def options(inputs, out, **kw) -> ShardOptions:
    kw.setdefault("shard_bytes", None)
    kw.setdefault("shard_samples", 100)
    kw.setdefault("splits", (("valid", 0.1), ("test", 0.05)))
    return ShardOptions(inputs=tuple(inputs), out=str(out), **kw)


def read_samples(out: Path) -> dict[str, list[tuple[str, str]]]:
    """key → [(id, sequence)] of every sample in every shard, read with tarfile."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext == "fasta"
                lines = archive.extractfile(member).read().decode().splitlines()
                samples[key] = [(lines[i][1:], lines[i + 1]) for i in range(0, len(lines), 2)]
    return samples


def test_one_and_three_workers_write_identical_bytes(demo_subset, tmp_path):
    one = run_sharding(options(demo_subset, tmp_path / "w1"), workers=1)
    three = run_sharding(options(demo_subset, tmp_path / "w3"), workers=3)
    assert one == three
    digests = file_digests(tmp_path / "w1")
    assert digests == file_digests(tmp_path / "w3")
    assert sum(name.endswith(".tar") for name in digests) > 10
    assert not (tmp_path / "w1" / "_work").exists()


def test_outputs_are_complete_and_consistent(demo_subset, demo_records, tmp_path):
    out = tmp_path / "out"
    manifest = run_sharding(options(demo_subset, out), workers=2)
    assert manifest["counts"]["sequences"] == 1200
    shards = pq.read_table(out / "shards.parquet").to_pylist()
    index = pq.read_table(out / "index").to_pylist()
    samples = read_samples(out)
    # Every input record is in exactly one sample, with its exact sequence.
    flat = sorted(member for members in samples.values() for member in members)
    assert flat == sorted((h, s) for h, s in demo_records[:1200])
    assert len(index) == 1200 and {r["key"] for r in index} == set(samples)
    for row in shards:
        data = (out / row["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["bytes"]
    assert [r["name"] for r in shards] == manifest["shards"]
    assert sum(r["samples"] for r in shards) == 1200
    assert manifest["counts"]["splits"]["valid"]["samples"] == sum(
        r["samples"] for r in shards if r["split"] == "valid"
    )
    assert manifest["length"]["max"] == max(len(s) for _, s in demo_records[:1200])
    assert len(manifest["inputs"]) == 2 and len(manifest["inputs"][0]["sha256"]) == 64


def test_split_is_stable_across_input_order_and_workers(demo_subset, tmp_path):
    a, b = demo_subset
    run_sharding(options([a, b], tmp_path / "ab"), workers=1)
    run_sharding(options([b, a], tmp_path / "ba"), workers=3)
    split = {r["id"]: r["split"] for r in pq.read_table(tmp_path / "ab" / "index").to_pylist()}
    again = {r["id"]: r["split"] for r in pq.read_table(tmp_path / "ba" / "index").to_pylist()}
    assert split == again
    fractions = {s: sum(v == s for v in split.values()) / len(split) for s in ("valid", "test")}
    assert 0.07 < fractions["valid"] < 0.13 and 0.03 < fractions["test"] < 0.075
    run_sharding(options([a, b], tmp_path / "seed1", seed=1), workers=1)
    other = {r["id"]: r["split"] for r in pq.read_table(tmp_path / "seed1" / "index").to_pylist()}
    assert other != split


def make_clusters(records, path: Path) -> dict[str, list[str]]:
    """MMseqs2 createtsv layout (representative<TAB>member) grouping real sequences by their
    first two residues — arbitrary but real sequences and real cluster sizes (1 to many)."""
    clusters: dict[str, list[str]] = {}
    for header, seq in records:
        clusters.setdefault(seq[:2], []).append(header)
    lines = [f"{members[0]}\t{m}" for members in clusters.values() for m in members]
    path.write_text("\n".join(lines) + "\n")
    return {members[0]: members for members in clusters.values()}


def test_cluster_samples_hold_their_members(demo_subset, demo_records, tmp_path):
    clusters = make_clusters(demo_records[:1200], tmp_path / "clu.tsv")
    out = tmp_path / "out"
    manifest = run_sharding(
        options(demo_subset, out, clusters=str(tmp_path / "clu.tsv"), shard_samples=20), workers=2
    )
    assert manifest["counts"]["samples"] == len(clusters)
    index = pq.read_table(out / "index").to_pylist()
    by_cluster: dict[str, set] = {}
    for row in index:
        by_cluster.setdefault(row["cluster"], set()).add((row["id"], row["split"], row["key"]))
    for rep, members in clusters.items():
        rows = by_cluster[rep]
        assert {r[0] for r in rows} == set(members)
        assert len({r[1] for r in rows}) == 1, "a cluster never straddles splits"
        assert len({r[2] for r in rows}) == 1
    samples = read_samples(out)
    sizes = sorted(len(m) for m in samples.values())
    assert sizes[-1] > 10 and sizes[0] == 1
    for members in samples.values():
        assert [i for i, _ in members] == sorted(i for i, _ in members)


def test_cluster_table_problems(demo_subset, demo_records, tmp_path):
    table = tmp_path / "clu.tsv"
    make_clusters(demo_records[:1100], table)  # records 1100..1199 are missing
    with pytest.raises(
        ShardError, match=r"b.fasta: record 401: sequence .* is not in the cluster table"
    ):
        run_sharding(options(demo_subset, tmp_path / "o1", clusters=str(table)))
    assert not (tmp_path / "o1" / MANIFEST).exists()
    manifest = run_sharding(
        options(demo_subset, tmp_path / "o2", clusters=str(table), on_missing_member="skip")
    )
    assert manifest["counts"]["skipped"] == {"missing_from_clusters": 100}
    assert manifest["counts"]["sequences"] == 1100

    first = demo_records[0][0]
    bad = tmp_path / "two.tsv"
    bad.write_text(table.read_text() + f"other\t{first}\n")
    with pytest.raises(ShardError, match=f"member '{first.replace('|', '.')}' is in cluster"):
        run_sharding(options(demo_subset, tmp_path / "o3", clusters=str(bad)))
    broken = tmp_path / "broken.tsv"
    broken.write_text("a\tb\nonly-one-column\n")
    with pytest.raises(ShardError, match=r"broken.tsv: line 2: expected 'cluster<TAB>member'"):
        run_sharding(options(demo_subset, tmp_path / "o4", clusters=str(broken)))


def test_duplicates(tmp_path, demo_records):
    (h1, s1), (h2, s2), (h3, s3) = demo_records[:3]
    path = tmp_path / "dup.fasta"
    path.write_text(fasta_text([(h1, s1), (h2, s2), (h1, s1), (h3, s2)]))
    manifest = run_sharding(options([str(path)], tmp_path / "o1"))
    assert manifest["counts"]["skipped"] == {"duplicate_record": 1}
    assert manifest["counts"]["sequences"] == 3
    deduped = run_sharding(options([str(path)], tmp_path / "o2", dedupe=True))
    assert deduped["counts"]["skipped"] == {"duplicate_record": 1, "duplicate_sequence": 1}
    assert deduped["counts"]["sequences"] == 2

    clash = tmp_path / "clash.fasta"
    clash.write_text(fasta_text([(h1, s1), (h2, s2), (h1, s3)]))
    with pytest.raises(
        ShardError,
        match=r"clash.fasta: record 3: id .* repeats .*clash.fasta: record 1 with a different sequence",
    ):
        run_sharding(options([str(clash)], tmp_path / "o3"))
    assert not (tmp_path / "o3" / MANIFEST).exists()
    kept = run_sharding(options([str(clash)], tmp_path / "o4", on_invalid="skip"))
    assert kept["counts"]["skipped"] == {"duplicate_id": 1}


def test_bad_input_leaves_no_manifest(tmp_path):
    path = tmp_path / "bad.fasta"
    path.write_text(">a\nMKV\n>b\nMK#V\n")
    with pytest.raises(ShardError, match=r"bad.fasta: record 2 \(line 3\).*'#'"):
        run_sharding(options([str(path)], tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(ShardError, match="nope.fasta: input does not exist"):
        run_sharding(options([str(tmp_path / "nope.fasta")], tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
    skipped = run_sharding(options([str(path)], tmp_path / "out3", on_invalid="skip"))
    assert skipped["counts"]["skipped"] == {"invalid_character": 1}
    path.write_text(">a\nMK\n")
    with pytest.raises(ShardError, match=r"no valid sequences .*too_short"):
        run_sharding(options([str(path)], tmp_path / "out4", min_length=5))


def test_bad_record_deep_in_a_file_is_named_exactly(tmp_path, demo_records, monkeypatch):
    """Read workers number records within their block; the error still names the record and
    line in the file (as the reader does), and the first bad record wins whatever the worker
    count — also when a later block holds another; the second input restarts the count."""
    import esmdist.data.fasta as fasta

    monkeypatch.setattr(fasta, "BLOCK_BYTES", 3000)  # the main process cuts: many blocks
    records = [(h, s) for h, s in demo_records[:400]]
    records[250] = (records[250][0], records[250][1][:7] + "#" + records[250][1][7:])
    records[390] = (records[390][0], "MK*VL")
    first, second = tmp_path / "first.fasta", tmp_path / "second.fasta"
    first.write_text(fasta_text(demo_records[400:450]))
    second.write_text("\n\n" + fasta_text(records))  # blank lines on top shift line numbers
    with pytest.raises(fasta.FastaError) as expected:
        list(fasta.read_fasta(str(second)))
    assert "record 251 (line 503)" in str(expected.value)  # 2 blank lines, 2 lines a record
    for workers in (1, 3):
        with pytest.raises(ShardError) as raised:
            run_sharding(options([str(first), str(second)], tmp_path / f"o{workers}"), workers)
        assert str(raised.value) == str(expected.value)
    skipped = run_sharding(options([str(first), str(second)], tmp_path / "skip",
                                   on_invalid="skip"), workers=2)  # fmt: skip
    assert skipped["counts"]["skipped"] == {"invalid_character": 1, "internal_stop": 1}
    index = pq.read_table(tmp_path / "skip" / "index").to_pylist()
    numbers = {(row["input"], row["record"]) for row in index}
    assert (1, 251) not in numbers and (1, 252) in numbers and (1, 400) in numbers
    assert numbers == {(0, n) for n in range(1, 51)} | {(1, n) for n in range(1, 401)} - {
        (1, 251),
        (1, 391),
    }


def test_workers_reading_whole_inputs_write_the_same_bytes(demo_records, tmp_path):
    """With three or more inputs and workers, each worker decompresses and parses whole inputs
    (UniParc's part files in parallel); one worker gets blocks cut by the main process. Same
    bytes, the same counts, and a bad record is named with the same record and line."""
    from esmdist.shard.read import _reads_whole_inputs

    inputs = []
    for number, (start, end) in enumerate([(0, 300), (300, 500), (500, 520), (520, 900)]):
        path = tmp_path / f"part{number}.fasta.gz"
        path.write_bytes(gzip.compress(fasta_text(demo_records[start:end]).encode()))
        inputs.append(str(path))
    assert _reads_whole_inputs(options(inputs, "x"), 3)
    assert not _reads_whole_inputs(options(inputs, "x"), 1)
    one = run_sharding(options(inputs, tmp_path / "w1"), workers=1)
    three = run_sharding(options(inputs, tmp_path / "w3"), workers=3)
    assert file_digests(tmp_path / "w1") == file_digests(tmp_path / "w3")
    assert one == three and one["counts"]["sequences"] == 900
    assert [entry["path"] for entry in three["inputs"]] == inputs

    broken = [(h, s) for h, s in demo_records[520:900]]
    broken[99] = (broken[99][0], "MKV1L")
    (tmp_path / "part3.fasta.gz").write_bytes(gzip.compress(fasta_text(broken).encode()))
    messages = set()
    for workers in (1, 3):
        with pytest.raises(ShardError) as raised:
            run_sharding(options(inputs, tmp_path / f"bad{workers}"), workers=workers)
        messages.add(str(raised.value))
    assert len(messages) == 1 and "part3.fasta.gz: record 100 (line 199)" in messages.pop()


def test_long_sequence_is_kept_whole(tmp_path):
    long = "ACDEFGHIKLMNPQRSTVWY" * 5000
    path = tmp_path / "long.fasta"
    path.write_text(f">long\n{long}\n>short\nMKV\n")
    run_sharding(options([str(path)], tmp_path / "out", splits=()))
    assert sorted(len(s) for m in read_samples(tmp_path / "out").values() for _, s in m) == [
        3,
        100_000,
    ]


def test_rerun_of_a_finished_output_and_option_conflicts(demo_subset, tmp_path):
    out = tmp_path / "out"
    first = run_sharding(options(demo_subset, out))
    assert run_sharding(options(demo_subset, out)) == first
    with pytest.raises(ShardError, match="already holds a sharded dataset made with other options"):
        run_sharding(options(demo_subset, out, seed=5))


def test_option_parsing():
    assert parse_splits("valid=0.005,test=0.0") == (("valid", 0.005), ("test", 0.0))
    assert parse_size("256MB") == 256 << 20 and parse_size("1GiB") == 1 << 30
    for bad, message in (("valid", "NAME=FRACTION"), ("train=0.1", "other than train"),
                         ("valid=x", "not a number"), ("valid=0.6,test=0.5", "sum to less")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_splits(bad)
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("lots")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "esmdist.cli", "shard", *args]


def _wait_for_shards(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < count:
        assert process.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("kill", ["whole-run", "one-worker"])
def test_crash_then_rerun_resumes_to_identical_output(demo_records, tmp_path, kill):
    source = tmp_path / "in.fasta"
    source.write_text(fasta_text(demo_records[:3000]))
    args = [str(source), "--shard-samples", "10", "--workers", "2", "--split", "valid=0.05"]
    clean = tmp_path / "clean"
    subprocess.run(_cli(*args, "--out", str(clean)), check=True, capture_output=True, cwd=REPO)

    out = tmp_path / "out"
    process = subprocess.Popen(_cli(*args, "--out", str(out)), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    _wait_for_shards(out, 20, process)
    if kill == "whole-run":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        workers = child_processes(process.pid, b"spawn_main")
        os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    if kill == "one-worker":
        assert process.returncode == 2
        assert b"rerun the same command to resume" in stderr
        os.killpg(process.pid, signal.SIGKILL) if child_processes(process.pid) else None
    assert not (out / MANIFEST).exists()
    before = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert before

    done = subprocess.run(_cli(*args, "--out", str(out)), capture_output=True, cwd=REPO)
    assert done.returncode == 0, done.stderr.decode()
    assert file_digests(out) == file_digests(clean)
    after = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    reused = sum(after[name] == inode for name, inode in before.items())
    assert reused >= len(before) - 2, "finished shards must not be rewritten"
    assert not list(out.rglob("*.partial")) and not (out / "_work").exists()


def test_cli_help_describes_the_options():
    done = subprocess.run(_cli("--help"), capture_output=True, text=True, check=True)
    for option in (
        "--clusters",
        "--split",
        "--on-invalid",
        "--dedupe",
        "--shard-size",
        "--workers",
    ):
        assert option in done.stdout


def test_manifest_is_written_last(demo_subset, tmp_path):
    out = tmp_path / "out"
    run_sharding(options(demo_subset, out))
    newest = max(out.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MANIFEST
    assert json.loads((out / MANIFEST).read_text())["format_version"] == 2


def test_fast_tar_members_equal_tarfile_output(demo_records):
    import numpy as np
    import pyarrow as pa

    from esmdist.shard.tar import member_fasta, tar_end, tar_members

    records = demo_records[:50]
    ids = [header.split()[0] for header, _ in records]
    texts = member_fasta(pa.array(ids), pa.array([seq for _, seq in records])).to_pylist()
    assert texts[7] == f">{ids[7]}\n{records[7][1]}\n".encode()
    # multi-member samples, an empty member and one of exactly one tar block
    datas = [text * (number % 3 + 1) for number, text in enumerate(texts)] + [b"", b"M" * 512]
    names = [f"{number:024x}.fasta" for number in range(len(datas))]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in zip(names, datas, strict=True):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            archive.addfile(info, io.BytesIO(data))
    matrix = np.frombuffer("".join(names).encode(), dtype=np.uint8).reshape(len(names), -1)
    ours, member_bytes = tar_members(matrix, pa.array(datas, pa.binary()))
    assert member_bytes.sum() == ours.size
    assert ours.to_pybytes() + tar_end(ours.size) == buffer.getvalue()
    with pytest.raises(ValueError, match="at most 100"):
        tar_members(np.zeros((1, 101), dtype=np.uint8), pa.array([b""]))


def test_webdataset_reads_the_shards(demo_subset, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    run_sharding(options(demo_subset, out))
    urls = [str(out / name) for name in json.loads((out / MANIFEST).read_text())["shards"]]
    seen = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    index = pq.read_table(out / "index").to_pylist()
    assert sorted(seen) == sorted({r["key"] for r in index})


PINNED = [
    "507082d3e0eda432b4c46f4d44ab5c92",
    "0b51453ccc40d50bd9efb40cd6581ade",
    "6f4bce6503fb5ff8dedb0a8c6400c3b3",
    "bb6267f0dce90f6c57fe9aa999e3269e",
]


def reference_key_hash(seed: int, key: str) -> tuple[int, int]:
    """shards/README.md's definition of the hash, one key at a time in plain Python."""
    mask = 2**64 - 1

    def fmix(h):
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & mask
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & mask
        return h ^ (h >> 33)

    data = key.encode()
    words = [int.from_bytes(data[i : i + 8].ljust(8, b"\0"), "little")
             for i in range(0, max(len(data), 1), 8)]  # fmt: skip
    lanes = []
    for lane in (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93):
        h = fmix(fmix((seed & mask) ^ lane) ^ ((len(data) * lane) & mask))
        for word in words:
            h = fmix(((h ^ word) * lane) & mask)
        lanes.append(h)
    return lanes[0], lanes[1]


def test_key_hash_matches_its_definition_and_spreads(demo_records):
    """The hash decides keys, splits and order: it must be what the format says (a plain
    Python rendering of shards/README.md), pinned (a change is a new format version), and over
    the real ids spread like a hash should."""
    import numpy as np
    import pyarrow as pa

    from esmdist.data.format import key_hashes

    edge = ["UPI0000000001", "", "sp|P69905|HBA_HUMAN", "é" * 9]
    hi, lo = key_hashes(0, pa.array(edge))
    assert [f"{a:016x}{b:016x}" for a, b in zip(hi.tolist(), lo.tolist(), strict=True)] == PINNED
    ids = [header.split()[0] for header, _ in demo_records] + edge + ["x" * 1000]
    for seed in (0, -3, 2**40):
        hi, lo = key_hashes(seed, pa.array(ids))
        assert list(zip(hi.tolist(), lo.tolist(), strict=True)) == [
            reference_key_hash(seed, key) for key in ids
        ]
    ids = pa.array([header.split()[0] for header, _ in demo_records])
    hi, lo = key_hashes(11, ids)
    chunked = key_hashes(11, pa.chunked_array([ids.slice(0, 100), ids.slice(100)]))
    assert np.array_equal(chunked[0], hi) and np.array_equal(chunked[1], lo)
    assert len(set(zip(hi.tolist(), (lo >> np.uint64(32)).tolist()))) == len(set(ids.to_pylist()))
    uniform = hi / 2.0**64
    assert abs(uniform.mean() - 0.5) < 0.02 and abs((uniform < 0.1).mean() - 0.1) < 0.02
    buckets = np.bincount((lo % np.uint64(8)).astype(np.int64), minlength=8)
    assert buckets.min() > 0.8 * len(ids) / 8

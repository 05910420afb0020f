"""`esmdist shard` fed what careless and hostile users feed it: truncated or padded zstd,
headers without ids or with control bytes, a cluster table with a header line, impossible
shard sizes, an input given twice, an input changed after sharding, an output it cannot write. Each is a clear error naming the file (or a counted skip where the
user chose that policy), with nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import zstandard

from esmdist.cli import main
from tests.conftest import DEMO_FASTA


def shard(capsys, *args: str) -> tuple[int, str]:
    """`esmdist shard …` as the command line runs it: (exit status, stderr)."""
    status = main(["shard", *args])
    return status, capsys.readouterr().err


def fasta(records) -> bytes:
    return "".join(f">{h}\n{s}\n" for h, s in records).encode()


@pytest.fixture
def demo_zst(tmp_path) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(DEMO_FASTA.read_bytes())


@pytest.mark.parametrize("cut", ["half", "header only"])
def test_a_truncated_zstd_input_is_an_error(cut, demo_zst, tmp_path, capsys):
    source = tmp_path / "cut.fasta.zst"
    source.write_bytes(demo_zst[: len(demo_zst) // 2] if cut == "half" else demo_zst[:12])
    status, err = shard(capsys, str(source), "--out", str(tmp_path / "out"), "--workers", "1")
    assert status == 2
    assert "cut.fasta.zst: zstd stream is truncated (the input ends inside a frame)" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bytes_after_the_last_zstd_frame_are_an_error(demo_zst, tmp_path, capsys):
    source = tmp_path / "padded.fasta.zst"
    source.write_bytes(demo_zst + b"this is not a zstd frame")
    status, err = shard(capsys, str(source), "--out", str(tmp_path / "out"), "--workers", "1")
    assert status == 2 and "padded.fasta.zst: zstd stream is corrupt" in err


def test_two_zstd_frames_read_to_the_end(demo_records, tmp_path, capsys):
    """What `pzstd` and `cat a.zst b.zst` make: every frame is read."""
    first, second = fasta(demo_records[:300]), fasta(demo_records[300:700])
    compress = zstandard.ZstdCompressor().compress
    (tmp_path / "two.fasta.zst").write_bytes(compress(first) + compress(second))
    status, err = shard(capsys, str(tmp_path / "two.fasta.zst"), "--out", str(tmp_path / "out"),
                        "--workers", "1")  # fmt: skip
    assert status == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["records_read"] == 700


HEADERS = {
    "'>' alone": (b">\nMKV\n", "record 2 (line 3): header '' has no id", "empty_id"),
    "text but no id": (b"> lonely words\nMKV\n", "has no id", "empty_id"),
    "a NUL byte": (b">a\x00b\nMKV\n", "control character '\\x00'", "control_character_in_header"),
    "an escape sequence": (b">a\x1b[31mred\nMKV\n", "control character '\\x1b'",
                           "control_character_in_header"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_headers_without_id_or_with_control_bytes(case, demo_records, tmp_path, capsys):
    record, message, reason = HEADERS[case]
    source = tmp_path / "in.fasta"
    source.write_bytes(fasta(demo_records[:1]) + record + fasta(demo_records[1:50]))
    status, err = shard(capsys, str(source), "--out", str(tmp_path / "a"), "--workers", "1")
    assert status == 2 and "in.fasta: record 2 (line 3)" in err and message in err, err
    status, err = shard(capsys, str(source), "--out", str(tmp_path / "b"), "--workers", "1",
                        "--on-invalid", "skip", "--split", "valid=0.1")  # fmt: skip
    assert status == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {reason: 1}
    assert manifest["counts"]["sequences"] == 50


def test_a_cluster_table_header_is_skipped_and_counted(demo_records, tmp_path, capsys):
    records = demo_records[:40]
    (tmp_path / "in.fasta").write_bytes(fasta(records))
    ids = [h.split()[0].split("|")[1] if h.startswith(("sp|", "tr|")) else h.split()[0]
           for h, _ in records]  # fmt: skip
    table = "cluster_id\tmember_id\n" + "".join(f"c{i % 7}\t{m}\n" for i, m in enumerate(ids))
    (tmp_path / "members.tsv").write_text(table)
    status, err = shard(capsys, str(tmp_path / "in.fasta"), "--out", str(tmp_path / "out"),
                        "--clusters", str(tmp_path / "members.tsv"), "--workers", "1",
                        "--split", "valid=0.2")  # fmt: skip
    assert status == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {"cluster_table_header": 1}
    assert manifest["counts"]["samples"] == 7  # c0 … c6, no cluster named "cluster_id"


@pytest.mark.parametrize("size, message", [
    (["--shard-size", "0"], "--shard-size must be positive, got 0 bytes"),
    (["--shard-samples", "0"], "--shard-samples must be at least 1, got 0"),
    (["--shard-samples", "-1"], "--shard-samples must be at least 1, got -1"),
])  # fmt: skip
def test_impossible_shard_sizes_fail_before_any_work(size, message, tmp_path, capsys):
    status, err = shard(capsys, str(DEMO_FASTA), "--out", str(tmp_path / "out"), *size)
    assert status == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_input_given_twice(tmp_path, capsys):
    status, err = shard(capsys, str(DEMO_FASTA), str(DEMO_FASTA), "--out", str(tmp_path / "o"))
    assert status == 2 and f"INPUT given more than once: {DEMO_FASTA}" in err


def test_an_input_changed_after_sharding_is_not_reported_as_done(demo_records, tmp_path, capsys):
    source, out = tmp_path / "in.fasta", str(tmp_path / "out")
    source.write_bytes(fasta(demo_records[:200]))
    args = [str(source), "--out", out, "--workers", "1", "--split", "valid=0.1"]
    assert shard(capsys, *args)[0] == 0
    os.utime(source, (1, 1))  # touched, content unchanged: the sha256 decides, still sharded
    status, err = shard(capsys, *args)
    assert status == 0 and "already sharded with these options" in err
    edited = bytearray(source.read_bytes())
    edited[edited.index(b"\n") + 1] = (
        ord("W") if edited[edited.index(b"\n") + 1] != ord("W") else ord("A")
    )
    source.write_bytes(bytes(edited))  # same size, other content
    status, err = shard(capsys, *args)
    assert status == 2 and "holds shards of other versions of the inputs" in err
    assert "in.fasta: same size, other content (sha256 differs)" in err
    source.write_bytes(fasta(demo_records[:201]))
    status, err = shard(capsys, *args)
    assert status == 2 and "in.fasta: " in err and "bytes then" in err


@contextlib.contextmanager
def read_only_directory(path):
    """A real read-only filesystem mounted at `path` (tmpfs, remounted ro)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(path)], capture_output=True).returncode:  # fmt: skip
        pytest.skip("needs root and mount(8) to make a read-only filesystem")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_output_on_a_read_only_filesystem_fails_at_once(tmp_path, capsys):
    with read_only_directory(tmp_path / "ro") as ro:
        status, err = shard(capsys, str(DEMO_FASTA), "--out", str(ro / "out"), "--workers", "1")
    assert status == 2, err
    assert f"writing to {ro / 'out'}: Read-only file system" in err
    assert "read:" not in err  # nothing was read before the output was known to be writable


@pytest.mark.s3
def test_refused_credentials_for_the_output_name_it_and_the_fix(s3_server, tmp_path):
    from esmdist.testing.s3server import SECRET_KEY
    from tests.conftest import REPO

    env = {**os.environ, **s3_server.env(secret=SECRET_KEY + "-wrong")}
    done = subprocess.run([sys.executable, "-m", "esmdist.cli", "shard", str(DEMO_FASTA), "--out",
                           "s3://shard-out-creds/out"], capture_output=True, text=True, cwd=REPO,
                          env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "s3://shard-out-creds/out/manifest.json: access denied" in done.stderr
    assert "AWS_SECRET_ACCESS_KEY" in done.stderr and "Traceback" not in done.stderr

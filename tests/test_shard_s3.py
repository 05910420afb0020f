"""The sharder against a real S3 server (SeaweedFS on 127.0.0.1): s3:// in and out."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys

import pytest

from esmdist.data.format import MANIFEST
from esmdist.shard import ShardError, ShardOptions, run_sharding
from esmdist.testing.s3server import SECRET_KEY
from tests.conftest import REPO

pytestmark = pytest.mark.s3


def test_s3_input_and_output_match_a_local_run(s3_server, s3_env, demo_records, tmp_path):
    fs = s3_server.filesystem()
    fs.mkdir("shard-io")
    text = "".join(f">{h}\n{s}\n" for h, s in demo_records[:800]).encode()
    fs.pipe("shard-io/in/part1.fasta.gz", gzip.compress(text, mtime=0))
    (tmp_path / "part1.fasta.gz").write_bytes(gzip.compress(text, mtime=0))

    def opts(inp, out):
        return ShardOptions(inputs=(inp,), out=out, shard_bytes=None, shard_samples=150,
                            splits=(("valid", 0.1),))  # fmt: skip

    remote = run_sharding(opts("s3://shard-io/in/part1.fasta.gz", "s3://shard-io/out"), workers=2)
    local = run_sharding(opts(str(tmp_path / "part1.fasta.gz"), str(tmp_path / "out")), workers=1)
    assert remote["counts"] == local["counts"]
    assert remote["inputs"][0]["sha256"] == local["inputs"][0]["sha256"]
    names = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.find("shard-io/out"))
    assert listed == names
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and path.name != MANIFEST:
            key = "shard-io/out/" + str(path.relative_to(tmp_path / "out"))
            assert (
                hashlib.sha256(fs.cat(key)).hexdigest()
                == hashlib.sha256(path.read_bytes()).hexdigest()
            ), key
    assert json.loads(fs.cat("shard-io/out/manifest.json"))["shards"] == local["shards"]
    assert not fs.find("shard-io/out/_work")


def test_wrong_credentials_name_the_input(s3_server, demo_records, tmp_path):
    fs = s3_server.filesystem()
    fs.mkdir("shard-creds", exist_ok=True)
    fs.pipe("shard-creds/in.fasta", b">a\nMKV\n")
    env = {**s3_server.env(secret=SECRET_KEY + "-wrong"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "esmdist.cli", "shard", "s3://shard-creds/in.fasta",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert "s3://shard-creds/in.fasta: access denied" in done.stderr
    assert "credentials" in done.stderr


def test_missing_s3_input(s3_server, s3_env, tmp_path):
    with pytest.raises(ShardError, match="s3://shard-io/nope.fasta: input does not exist"):
        run_sharding(ShardOptions(inputs=("s3://shard-io/nope.fasta",), out=str(tmp_path / "o")))


def test_training_stream_reads_shards_from_s3(s3_server, s3_env, demo_records, tmp_path):
    import numpy as np

    from esmdist.data.order import OrderState
    from esmdist.data.stream import DataConfig, ShardSet, slot_batches

    fs = s3_server.filesystem()
    fs.mkdir("stream-io", exist_ok=True)
    local = tmp_path / "local"
    options = ShardOptions(inputs=(str(tmp_path / "in.fasta"),), out=str(local), shard_bytes=None,
                           shard_samples=60, splits=(("valid", 0.1),))  # fmt: skip
    (tmp_path / "in.fasta").write_text("".join(f">{h}\n{s}\n" for h, s in demo_records[:400]))
    run_sharding(options)
    fs.put(str(local), "stream-io/shards", recursive=True)
    config = DataConfig(path="s3://stream-io/shards", max_tokens=4096, num_workers=0)
    remote = ShardSet.from_directory(config.path, "train")
    here = ShardSet.from_directory(str(local), "train")
    assert remote.sizes == here.sizes
    a = [b.batch for b in slot_batches(remote, config, OrderState.fresh(0, 1), 0, epochs=1)]
    b = [b.batch for b in slot_batches(here, config, OrderState.fresh(0, 1), 0, epochs=1)]
    assert len(a) == len(b) > 3
    assert all(np.array_equal(x.tokens.numpy(), y.tokens.numpy()) for x, y in zip(a, b))

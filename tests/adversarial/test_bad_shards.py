"""Shards that changed after sharding: residues edited in place, a shard whose table entry was
forged to match, a truncated tar. The loader names the shard (and the sample) instead of
training on it or failing deep inside masking."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esmdist.data.order import OrderState
from esmdist.data.stream import DataConfig, DataError, ShardSet, slot_batches


def copy_dataset(shards: Path, to: Path) -> Path:
    shutil.copytree(shards, to)
    return to


def first_train_shard(dataset: Path) -> Path:
    return sorted(dataset.glob("train-*.tar"))[0]


def edit_member(tar: Path, change) -> None:
    """Change the bytes of the first sample's sequence line in place (same size)."""
    data = bytearray(tar.read_bytes())
    start = data.index(b"\n", 512) + 1  # the first member's data starts at 512
    end = data.index(b"\n", start)
    data[start:end] = change(bytes(data[start:end]))
    tar.write_bytes(bytes(data))


def vouch_for(dataset: Path, tar: Path) -> None:
    """What someone who rewrites a shard on purpose does: shards.parquet told the new sha256."""
    table = pq.read_table(dataset / "shards.parquet").to_pylist()
    for row in table:
        if row["name"] == tar.name:
            row["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
            row["bytes"] = tar.stat().st_size
    pq.write_table(pa.Table.from_pylist(table), dataset / "shards.parquet")


def read_all(dataset: Path) -> int:
    shards = ShardSet.from_directory(str(dataset), "train")
    config = DataConfig(path=str(dataset), max_tokens=2048, crop_length=512, num_workers=0)
    return sum(1 for _ in slot_batches(shards, config, OrderState.fresh(0, 1), 0, epochs=1))


def test_a_residue_changed_after_sharding(small_shards, tmp_path):
    dataset = copy_dataset(small_shards, tmp_path / "d")
    tar = first_train_shard(dataset)
    edit_member(tar, lambda seq: b"W" + seq[1:] if seq[:1] != b"W" else b"A" + seq[1:])
    with pytest.raises(DataError, match=rf"{tar.name}: sha256 differs from shards.parquet"):
        read_all(dataset)


@pytest.mark.parametrize("change", ["one '#'", "every residue"])
def test_foreign_content_is_named_with_its_sample(change, small_shards, tmp_path):
    dataset = copy_dataset(small_shards, tmp_path / "d")
    tar = first_train_shard(dataset)
    edit_member(tar, (lambda s: b"#" + s[1:]) if change == "one '#'" else (lambda s: b"#" * len(s)))
    vouch_for(dataset, tar)
    with pytest.raises(DataError, match=rf"{tar.name}: sample [0-9a-f]{{24}} .*residue '#' "
                                        "outside the ESM alphabet"):  # fmt: skip
        read_all(dataset)


def test_a_truncated_shard_is_named(small_shards, tmp_path):
    dataset = copy_dataset(small_shards, tmp_path / "d")
    tar = first_train_shard(dataset)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) - 10240])  # whole members remain: only the size tells
    with pytest.raises(DataError, match=rf"{tar.name}: "):
        read_all(dataset)

"""The training stream over real shards: disjoint slots, exact resume, crop, clusters, masking,
packing, validation, and bad shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from esmdist import alphabet
from esmdist.data.batch import MaskingConfig, mask_tokens
from esmdist.data.order import EpochOrder, OrderState
from esmdist.data.stream import (
    DataConfig,
    DataError,
    ShardCheck,
    ShardSet,
    TrainLoader,
    merge_rank_states,
    read_shard,
    slot_sequences,
    validation_batches,
)
from esmdist.shard import ShardOptions, run_sharding
from tests.conftest import REPO, make_shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, demo_records):
    """1,500 real sequences in 100-sample shards (train ≈ 14 shards, valid ≈ 1)."""
    return make_shards(tmp_path_factory.mktemp("stream"), demo_records[:1500], 100)


@pytest.fixture(scope="module")
def sequences_by_id(demo_records):
    return dict(demo_records[:1500])


def config(path, **kw) -> DataConfig:
    kw.setdefault("max_tokens", 4096)
    kw.setdefault("num_workers", 0)
    return DataConfig(path=str(path), **kw)


def test_slots_of_two_ranks_and_two_workers_read_each_sample_once(sharded):
    shards = ShardSet.from_directory(str(sharded), "train")
    state = OrderState.fresh(0, 4)
    cfg = config(sharded)
    positions = []
    for slot in range(4):
        positions += [p for _, _, p, _ in slot_sequences(shards, cfg, state, slot, epochs=1)]
    assert sorted(positions) == list(range(shards.total))


def test_tokens_are_the_real_sequences(sharded, sequences_by_id):
    shards = ShardSet.from_directory(str(sharded), "train")
    order = EpochOrder(shards.sizes, 0, 0)
    cfg = config(sharded, crop_length=100_000, max_tokens=100_000)
    for _, _, position, tokens in list(slot_sequences(shards, cfg, OrderState.fresh(0, 1), 0, 1))[
        :50
    ]:
        shard, index = order.locate(position)
        ids, _ = read_shard(shards.urls[shard])[index]
        assert alphabet.decode(tokens) == sequences_by_id[ids[0]]
        assert tokens[0] == alphabet.CLS and tokens[-1] == alphabet.EOS


def test_crop_is_a_seeded_window(sharded, sequences_by_id):
    shards = ShardSet.from_directory(str(sharded), "train")
    cfg = config(sharded, crop_length=64, max_tokens=4096)
    order = EpochOrder(shards.sizes, 0, 0)

    def windows(epoch):
        state = OrderState(0, [(epoch, 0)])
        out = {}
        for _, _, position, tokens in slot_sequences(shards, cfg, state, 0, 1):
            shard, index = EpochOrder(shards.sizes, 0, epoch).locate(position)
            out[(shard, index)] = alphabet.decode(tokens)
        return out

    first, again, other = windows(0), windows(0), windows(1)
    assert first == again
    assert order.total == len(first)
    cropped = 0
    for (shard, index), window in first.items():
        full = sequences_by_id[read_shard(shards.urls[shard])[index][0][0]]
        assert len(window) == min(len(full), 62) and window in full
        cropped += len(full) > 62 and other[(shard, index)] != window
    assert cropped > 100, "crop windows move between epochs"


def test_masking_statistics_and_specials(demo_records):
    tokens = np.concatenate([alphabet.encode(s) for _, s in demo_records[:300]])
    draws = np.random.default_rng(0).random((3, len(tokens)))
    inputs, selected, targets = mask_tokens(tokens, MaskingConfig(), draws)
    residues = tokens >= 4
    assert not (selected & ~residues).any()
    assert abs(selected.sum() / residues.sum() - 0.15) < 0.01
    assert np.array_equal(targets, tokens[selected])
    masked = inputs[selected] == alphabet.MASK
    kept = inputs[selected] == targets
    assert abs(masked.mean() - 0.8) < 0.02
    assert 0.1 < kept.mean() < 0.13  # 10% unchanged + random draws that hit the same residue
    assert np.array_equal(inputs[~selected], tokens[~selected])
    assert set(np.unique(inputs[selected & (inputs != alphabet.MASK)])) <= set(range(4, 24))


def test_packed_batches_respect_the_budget_and_match_padded(sharded):
    from esmdist.model import ESM, ModelConfig
    from tests.reference import randomize_

    loader = TrainLoader(ShardSet.from_directory(str(sharded), "train"),
                         config(sharded, max_tokens=2048, crop_length=512))  # fmt: skip
    batch = next(iter(loader))
    assert batch.num_tokens <= 2048 and batch.num_sequences > 1
    assert batch.targets.numel() == batch.selected.sum()
    model = randomize_(ESM(ModelConfig(num_layers=2, embed_dim=64, attention_heads=4)), 0).eval()
    with torch.no_grad():
        packed = model(batch.tokens, batch.cu_seqlens, output_mask=batch.selected).logits
        tokens, selected = batch.to_padded()
        padded = model(tokens, output_mask=selected).logits
    assert torch.allclose(packed, padded, atol=1e-5)
    loss = torch.nn.functional.cross_entropy
    assert abs(loss(packed, batch.targets) - loss(padded, batch.targets)) < 1e-5


def batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.tokens, b.tokens), (a.cu_seqlens, b.cu_seqlens),
                                              (a.selected, b.selected), (a.targets, b.targets)))  # fmt: skip


def test_resume_gives_exactly_the_next_batches_with_workers_and_two_ranks(sharded, tmp_path):
    shards = ShardSet.from_directory(str(sharded), "train")
    cfg = config(sharded, num_workers=2, max_tokens=3000, crop_length=1024)
    full = {r: batches(TrainLoader(shards, cfg, r, 2), 14) for r in (0, 1)}
    first = {r: TrainLoader(shards, cfg, r, 2) for r in (0, 1)}
    for rank, loader in first.items():
        assert all(same(a, b) for a, b in zip(batches(loader, 5), full[rank][:5]))
    resume = json.loads(json.dumps(merge_rank_states([first[r].state_dict() for r in (1, 0)])))
    # Rank 0 continues in a fresh process; rank 1 in this one.
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(resume))
    script = (
        "import json, sys, torch\n"
        "from esmdist.data.stream import DataConfig, ShardSet, TrainLoader\n"
        f"cfg = DataConfig(path={str(sharded)!r}, num_workers=2, max_tokens=3000)\n"
        f"shards = ShardSet.from_directory(cfg.path, 'train')\n"
        f"loader = TrainLoader(shards, cfg, 0, 2, json.load(open({str(state_file)!r})))\n"
        "out = []\n"
        "for b in loader:\n"
        "    out.append([b.tokens, b.cu_seqlens, b.selected, b.targets])\n"
        "    if len(out) == 9: break\n"
        f"torch.save(out, {str(tmp_path / 'rank0.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    resumed0 = torch.load(tmp_path / "rank0.pt")
    for got, want in zip(resumed0, full[0][5:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(got, (want.tokens, want.cu_seqlens,
                                                           want.selected, want.targets)))  # fmt: skip
    resumed1 = batches(TrainLoader(shards, cfg, 1, 2, resume), 9)
    assert all(same(a, b) for a, b in zip(resumed1, full[1][5:], strict=True))


def test_resume_on_another_world_size_loses_and_repeats_nothing(sharded):
    shards = ShardSet.from_directory(str(sharded), "train")
    cfg = config(sharded, num_workers=2, max_tokens=3000)
    loaders = [TrainLoader(shards, cfg, r, 2) for r in (0, 1)]
    for loader in loaders:
        batches(loader, 3)
    resume = merge_rank_states([loader.state_dict() for loader in loaders])
    old = OrderState.from_dict(resume["order"])
    seen = []
    for slot, (epoch, read) in enumerate(old.slots):
        assert epoch == 0 and read > 0
        fresh = OrderState(old.seed, [(0, 0)] * 4)
        seen += [p for _, r, p, _ in slot_sequences(shards, cfg, fresh, slot, 1) if r <= read]
    one = TrainLoader(shards, config(sharded, num_workers=0), 0, 1, resume)
    rest = [p for _, _, p, _ in slot_sequences(shards, cfg, one.order, 0, 1)]
    assert sorted(seen + rest) == list(range(shards.total))


def test_clusters_draw_one_member_per_epoch(demo_records, tmp_path):
    from tests.test_shard import make_clusters

    records = demo_records[:600]
    source = tmp_path / "in.fasta"
    source.write_text("".join(f">{h}\n{s}\n" for h, s in records))
    clusters = make_clusters(records, tmp_path / "clu.tsv")
    out = tmp_path / "shards"
    run_sharding(ShardOptions(inputs=(str(source),), out=str(out), clusters=str(tmp_path / "clu.tsv"),
                              splits=()))  # fmt: skip
    shards = ShardSet.from_directory(str(out), "train")
    assert shards.total == len(clusters)
    members = {s: rep for rep, ms in clusters.items() for s in ms}
    by_seq = {s: h for h, s in records}
    cfg = config(out, crop_length=10_000, max_tokens=10_000)
    drawn = []
    for epoch in range(4):
        state = OrderState(0, [(epoch, 0)])
        picks = [
            by_seq[alphabet.decode(t)] for _, _, _, t in slot_sequences(shards, cfg, state, 0, 1)
        ]
        assert sorted(members[p] for p in picks) == sorted(clusters), "one member per cluster"
        drawn.append(set(picks))
    assert len(set.union(*drawn)) > len(drawn[0]), "other members in other epochs"


def test_validation_stream_is_fixed_and_split_across_ranks(sharded):
    shards = ShardSet.from_directory(str(sharded), "valid")
    cfg = config(sharded, max_tokens=2048)
    one = list(validation_batches(shards, cfg))
    again = list(validation_batches(shards, cfg))
    assert all(same(a, b) for a, b in zip(one, again, strict=True))
    total = sum(b.num_sequences for b in one)
    assert total == shards.total
    parts = [sum(b.num_sequences for b in validation_batches(shards, cfg, r, 2)) for r in (0, 1)]
    assert sum(parts) == total and min(parts) > 0
    # The same masks whatever the batch size or number of ranks: the same perplexity.
    from esmdist.eval.perplexity import masked_perplexity
    from esmdist.model import ESM, ModelConfig
    from tests.reference import randomize_

    model = randomize_(ESM(ModelConfig(num_layers=1, embed_dim=32, attention_heads=2)), 0).eval()
    whole, count = masked_perplexity(model, one)
    small = config(sharded, max_tokens=1024)
    parts = [masked_perplexity(model, validation_batches(shards, small, r, 2)) for r in (0, 1)]
    assert sum(c for _, c in parts) == count
    combined = np.exp(sum(np.log(p) * c for p, c in parts) / count)
    assert abs(combined - whole) < 1e-6 * whole


def test_bad_shards_are_named(sharded, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    first = sorted(copy.glob("train-*.tar"))[0]
    first.write_bytes(first.read_bytes()[:5000] + b"garbage" * 100)
    with pytest.raises(DataError, match=f"{first.name}"):
        read_shard(str(first), ShardCheck(100))
    second = sorted(copy.glob("train-*.tar"))[1]
    second.unlink()
    with pytest.raises(DataError, match=f"{second.name}: shard listed in the manifest is missing"):
        read_shard(str(second), ShardCheck(100))
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json — not a sharded dataset"):
        ShardSet.from_directory(str(copy), "train")
    with pytest.raises(DataError, match="the split 'test' has no shards"):
        ShardSet.from_directory(str(sharded), "test")


def test_truncated_shard_is_caught_by_the_count(sharded, tmp_path):
    import tarfile

    source = sorted(Path(sharded).glob("train-*.tar"))[0]
    short = tmp_path / source.name
    with tarfile.open(source) as full, tarfile.open(short, "w") as out:
        for member in full.getmembers()[:40]:
            out.addfile(member, full.extractfile(member))
    expected = pq.read_table(Path(sharded) / "shards.parquet").to_pylist()[0]["samples"]
    with pytest.raises(DataError, match="holds 40 samples but shards.parquet lists"):
        read_shard(str(short), ShardCheck(expected))


def test_plain_url_lists_and_pipe_urls(sharded):
    directory = ShardSet.from_directory(str(sharded), "train")
    names = [Path(u).name for u in directory.urls]
    first, last = names[0][6:12], names[-1][6:12]
    braced = ShardSet.open(f"{sharded}/train-{{{first}..{last}}}.tar", "train")
    assert braced.urls == directory.urls and braced.sizes == directory.sizes
    piped = ShardSet.open(" :: ".join(f"pipe:cat {u}" for u in directory.urls), "train")
    assert piped.sizes == directory.sizes
    cfg = config(sharded)
    state = OrderState.fresh(0, 1)
    ours = [t for *_, t in slot_sequences(directory, cfg, state, 0, 1)]
    theirs = [t for *_, t in slot_sequences(piped, cfg, state, 0, 1)]
    assert len(ours) == directory.total and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def read_sequences(batch) -> list[tuple[int, ...]]:
    """The sequences a batch holds, as read (the masking undone)."""
    tokens = batch.tokens.clone()
    tokens[batch.selected] = batch.targets
    bounds = batch.cu_seqlens.tolist()
    return [tuple(tokens[a:b].tolist()) for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_two_then_three_then_one_ranks_read_each_sample_of_the_epoch_once(sharded, workers):
    """A requeued job on another world size: 2 ranks read, then 3 resume, then 1. Counting the
    sequences the loaders handed out (masks undone) with the rest of the epoch that the last
    layout has left, every sample of the epoch is read exactly once: none twice, none skipped."""
    from collections import Counter

    shards = ShardSet.from_directory(str(sharded), "train")
    cfg = config(sharded, num_workers=workers, max_tokens=3000)
    whole = OrderState.fresh(cfg.seed, 1)
    epoch = Counter(tuple(t.tolist()) for _, _, _, t in slot_sequences(shards, cfg, whole, 0, 1))
    read, resume = Counter(), None
    for world_size, steps in ((2, 3), (3, 2)):
        loaders = [TrainLoader(shards, cfg, r, world_size, resume) for r in range(world_size)]
        for loader in loaders:
            for batch in batches(loader, steps):
                read.update(read_sequences(batch))
        resume = merge_rank_states([loader.state_dict() for loader in loaders])
    last = TrainLoader(shards, cfg, 0, 1, resume)
    assert all(e == 0 for e, _ in last.order.slots)  # still inside the first epoch
    for slot in range(len(last.order.slots)):
        read.update(tuple(t.tolist()) for _, _, _, t in slot_sequences(shards, cfg, last.order,
                                                                       slot, 1))  # fmt: skip
    assert read == epoch and sum(epoch.values()) == shards.total

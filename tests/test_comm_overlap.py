"""Communication overlapped with compute (issue 16), on 2 gloo ranks: FSDP2's explicit
prefetch issues each block's all-gather from the block before it (forward) or after it
(backward), the last block is gathered once per micro-batch instead of twice, and none of it
changes a bit of the result; DeepSpeed gets ZeRO's overlap_comm and the bucket size asked for."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from esmdist.config import load_config
from tests.conftest import REPO, make_shards
from tests.distributed import run_ranks
from tests.test_train import EXTENSIONS, overrides

STEPS = 3
LAYERS = 2  # the debug model's blocks


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("overlap"), demo_records[:600], 100)


def profiled_training(rank: int, args: list[str]):
    """Train, counting FSDP's labelled communication events; the final parameters."""
    from esmdist.train import train

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        _, engine = train(load_config(REPO / "configs/debug-cpu.toml", args))
    events = collections.Counter(e.name for e in profile.events() if e.name.startswith("FSDP::"))
    return dict(events), engine.full_state_dict()


def fsdp_args(shards, out, prefetch: int) -> list[str]:
    # Two micro-batches per rank and step: prefetch also across accumulation.
    return overrides(shards, out, **{
        "parallel.backend": "fsdp", "parallel.prefetch_blocks": prefetch,
        "train.max_steps": STEPS, "train.valid_every": 100, "train.log_every": 1,
        "optim.warmup_steps": 1,
    })  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_runs(shards, tmp_path_factory):
    runs = {}
    for prefetch in (0, 1):
        tmp = tmp_path_factory.mktemp(f"prefetch{prefetch}")
        runs[prefetch] = run_ranks(
            profiled_training, 2, tmp, fsdp_args(shards, tmp / "out", prefetch)
        )
    return runs


def test_fsdp_prefetches_the_next_block_explicitly(fsdp_runs):
    """With prefetch_blocks=1 block i's pre-forward starts block i+1's all-gather — in every
    forward, the validation's included — and block i's pre-backward block i-1's; with 0 FSDP2
    keeps its implicit forward order (no explicit forward prefetch)."""
    events = fsdp_runs[1][0][0]
    forwards, backwards = events["FSDP::pre_forward (layers.0)"], events["FSDP::pre_backward"]
    assert backwards == STEPS * 2  # two micro-batches per rank and step
    for index in range(1, LAYERS):
        assert events.get(f"FSDP::forward_prefetch for layers.{index}") == forwards, events
    for index in range(LAYERS - 1):
        assert events.get(f"FSDP::backward_prefetch for layers.{index}") == backwards, events
    implicit = fsdp_runs[0][0][0]
    assert not any("forward_prefetch" in name for name in implicit), implicit


def test_fsdp_gathers_the_last_block_once_per_micro_batch(fsdp_runs):
    """The last block is not resharded after its forward (backward begins with it): gathered
    at most once per forward, where the other blocks are gathered again for backward."""
    for ranks in fsdp_runs.values():
        events = ranks[0][0]
        forwards, backwards = events["FSDP::pre_forward (layers.0)"], events["FSDP::pre_backward"]
        for index in range(LAYERS - 1):
            assert events[f"FSDP::all_gather (layers.{index})"] == forwards + backwards, events
        assert events[f"FSDP::all_gather (layers.{LAYERS - 1})"] <= forwards, events


def test_prefetch_changes_no_bit_of_the_result(fsdp_runs):
    """Reordering the all-gathers moves data, it computes nothing: bit-identical parameters."""
    plain, prefetched = fsdp_runs[0][0][1], fsdp_runs[1][0][1]
    assert plain.keys() == prefetched.keys()
    different = [k for k in plain if not torch.equal(plain[k], prefetched[k])]
    assert not different


def deepspeed_zero_config(rank: int, args: list[str]):
    from esmdist.train import train

    _, engine = train(load_config(REPO / "configs/debug-cpu.toml", args))
    ds = engine.model
    trained = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    return (ds.zero_overlap_comm(), ds.zero_contiguous_gradients(),
            int(ds.zero_reduce_bucket_size()), trained)  # fmt: skip


@pytest.mark.parametrize("overlap, bucket", [(True, 50_000), (False, None)])
def test_deepspeed_gets_overlap_comm_and_the_bucket_size(shards, tmp_path, overlap, bucket):
    """ZeRO-2 with overlap_comm on (esmdist's default; DeepSpeed's only at stage 3) or off;
    the bucket size from the config, capped at the model's size (DeepSpeed allocates its
    buckets whole: the default 2e8 elements would be 1.6 GB for this 0.1M-parameter model;
    rounded up to a multiple of 8 for its alignment).
    Training through it is checked against DDP in test_train (with the defaults)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)
    extra = {"parallel.backend": "deepspeed", "parallel.zero_stage": 2,
             "parallel.overlap_comm": overlap, "train.max_steps": 2, "train.valid_every": 100,
             "optim.warmup_steps": 1}  # fmt: skip
    if bucket:
        extra["parallel.bucket_elements"] = bucket
    for found, contiguous, size, trained in run_ranks(deepspeed_zero_config, 2, tmp_path,
                                                       overrides(shards, tmp_path / "out", **extra)):  # fmt: skip
        assert (found, contiguous) == (overlap, True)
        assert size == (bucket or -(-trained // 8) * 8) and trained > 100_000

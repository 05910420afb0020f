"""`esmdist plan`: the memory formulas on known answers (ZeRO's 16P split per stage, DDP's
buckets, FSDP2's accumulated gradients), the activation formula against what autograd really
saves on real packed batches (debug, 8M; with and without activation checkpointing), the
communication volumes, and the command."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esmdist.cli import main
from esmdist.data.batch import MaskingConfig, crop, pack, with_specials
from esmdist.metrics import block_params
from esmdist.model import model_config
from esmdist.plan import (
    Setup,
    activation_bytes,
    communication_bytes,
    largest_micro_batch,
    parse_bytes,
    plan,
    state_bytes,
)
from esmdist.testing.memory import saved_bytes

GB = 1e9


def setup(size="esm2_650M", gpus=8, **extra) -> Setup:
    return Setup(model_config(size), gpus, 80 * GB, **extra)


def test_sizes_parse():
    assert parse_bytes("80GB") == 80e9 and parse_bytes("141GiB") == 141 * 2**30
    assert parse_bytes("2T") == 2e12 and parse_bytes("1.5 TB") == 1.5e12
    assert parse_bytes("80") == 80e9  # a plain number is GB, never 80 bytes
    with pytest.raises(ValueError, match="give a size"):
        parse_bytes("eighty")
    with pytest.raises(ValueError, match="no GPU's memory"):
        parse_bytes("512 MB")


def test_states_split_as_zero_says():
    p = model_config("esm2_3B").num_params()
    for stage, (params, grads) in {1: (2 * p, 2 * p), 2: (2 * p, 2 * p / 64),
                                   3: (2 * p / 64, 2 * p / 64)}.items():  # fmt: skip
        found = state_bytes(setup("esm2_3B", 64, backend="deepspeed", zero_stage=stage))
        assert found["parameters"] == params and found["gradients"] == grads
        assert found["optimizer"] == 12 * p / 64
    autocast = setup("esm2_3B", 8, backend="ddp", low_precision_weights=False)
    ddp = state_bytes(autocast)
    assert ddp == {"parameters": 4 * p, "gradients": 4 * p, "optimizer": 8 * p, "buffers": 4 * p}
    # DDP's bf16 weights (FSDP2 on a replicate mesh): the whole bf16 copy through backward, one
    # block's fp32 reduction, and — accumulating — unreduced fp32 gradients beside the reduced.
    block = block_params(model_config("esm2_3B")) // 36
    bf16 = state_bytes(replace(autocast, low_precision_weights=True))
    assert autocast.accumulation > 1 and bf16 == {"parameters": 4 * p, "gradients": 8 * p,
                                                   "optimizer": 8 * p,
                                                   "buffers": 2 * p + 4 * block}  # fmt: skip
    assert state_bytes(replace(autocast, dtype="fp32")) == ddp
    # One process in bf16: the bf16 compute copy of the blocks' matmul weights.
    assert state_bytes(setup("esm2_3B", 1, backend="single"))["buffers"] == 2 * block_params(
        model_config("esm2_3B")
    )
    fp32 = setup("esm2_3B", 1, backend="single", dtype="fp32")
    assert state_bytes(fp32)["buffers"] == 0
    assert state_bytes(replace(fp32, dtype="bf16", low_precision_weights=False))["buffers"] == 0
    # FSDP2: 16P sharded; accumulating micro-batches keeps unsharded fp32 gradients (+4P).
    one_micro = setup("esm2_3B", 128, tokens_per_gpu=16384)
    assert one_micro.accumulation == 1
    found = state_bytes(one_micro)
    assert found["parameters"] + found["gradients"] + found["optimizer"] == 16 * p / 128
    assert state_bytes(setup("esm2_3B", 8))["gradients"] == 4 * p / 8 + 4 * p


def test_buffers_follow_prefetch_and_overlap():
    """FSDP2 holds one more gathered bf16 block per block prefetched; ZeRO-1/2 one more
    reduction bucket with overlap_comm (DeepSpeed's double buffering)."""
    block = block_params(model_config("esm2_3B")) // 36

    def buffers(**extra) -> float:
        return state_bytes(setup("esm2_3B", 8, **extra))["buffers"]

    assert buffers(prefetch_blocks=0) == 2 * block + 4 * block
    assert buffers(prefetch_blocks=2) - buffers(prefetch_blocks=1) == 2 * block
    for stage in (1, 2):
        zero = {"backend": "deepspeed", "zero_stage": stage, "bucket_elements": 10**8}
        assert buffers(**zero) == 2 * buffers(**zero, overlap_comm=False) == 2 * 4 * 10**8
    with pytest.raises(ValueError, match="--prefetch-blocks"):
        setup(prefetch_blocks=-1)


def real_batch(tokens: int):
    from tests.conftest import DEMO_FASTA

    records = DEMO_FASTA.read_text().split(">")[1:]
    rng = np.random.default_rng(0)
    from esmdist import alphabet

    sequences, total = [], 0
    for record in records:
        sequence = with_specials(crop(alphabet.encode("".join(record.splitlines()[1:])), 1024,
                                      rng.random()))  # fmt: skip
        if total + len(sequence) > tokens:
            break
        sequences.append(sequence)
        total += len(sequence)
    return pack(sequences, MaskingConfig(), rng.random((3, total)))


@pytest.mark.parametrize("size, recompute_every, tolerance", [
    ("debug", 0, 0.03), ("esm2_8M", 0, 0.03), ("esm2_8M", 1, 0.08), ("esm2_8M", 2, 0.05),
])  # fmt: skip
def test_the_activation_formula_is_what_autograd_saves(size, recompute_every, tolerance):
    from esmdist.parallel.prepare import apply_training_transforms, training_model

    torch.manual_seed(0)
    model = training_model(model_config(size), 0, torch.device("cpu"))
    apply_training_transforms(model, recompute_every=recompute_every)
    batch = real_batch(2048)

    def forward():
        logits = model(batch.tokens, batch.cu_seqlens, output_mask=batch.selected).logits
        return F.cross_entropy(logits.float(), batch.targets)

    measured = saved_bytes(forward, model.parameters())
    predicted = activation_bytes(Setup(model.config, 1, 80 * GB, "single",
                                       activation_checkpointing=recompute_every > 0,
                                       recompute_every=max(1, recompute_every),
                                       tokens_per_gpu=batch.num_tokens, dtype="fp32"))  # fmt: skip
    assert predicted["activations"] == pytest.approx(measured, rel=tolerance)


def test_communication_volumes_and_scaling():
    p = model_config("esm2_650M").num_params()
    assert communication_bytes(setup(gpus=1)) == 0
    assert communication_bytes(setup(gpus=2, backend="ddp")) == pytest.approx(4 * p)
    # FSDP2, 1 micro-batch: 2P forward + 2(P - block) backward (the last block stays gathered)
    # + 4P fp32 reduce-scatter.
    one = setup(gpus=128, tokens_per_gpu=16384)
    block = block_params(model_config("esm2_650M")) // 33
    assert communication_bytes(one) == pytest.approx(127 / 128 * (8 * p - 2 * block))
    found = plan(one)
    assert 0 < found.scaling_efficiency <= 1 and found.fits
    assert found.step_s == pytest.approx(found.compute_s + found.exposed_s)


def test_the_largest_micro_batch_that_fits():
    one = setup(gpus=1, backend="single")
    largest = largest_micro_batch(one)
    assert plan(replace(one, tokens_per_gpu=largest)).fits
    assert not plan(replace(one, tokens_per_gpu=largest + 1024)).fits
    assert 16384 < largest < 65536  # 650M on 80 GB without checkpointing: 16k fits, 64k not
    # FSDP2 holds unsharded gradients only while it accumulates: at 64 GPUs, 15B with
    # checkpointing fits with one micro-batch of 32k per step but not with two of 16k.
    big = setup("esm2_15B", 64, activation_checkpointing=True)
    assert not plan(big).fits and largest_micro_batch(big) == 32768
    assert largest_micro_batch(setup("esm2_15B", 1, backend="single")) == 0


def test_the_command(capsys):
    assert main(["plan", "--model", "esm2_15B", "--gpus", "64", "--backend", "deepspeed",
                 "--zero", "3", "--activation-checkpointing", "--tokens-per-gpu", "8192",
                 "--scaling"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "→ fits in 80 GB" in out and "budget 1.05e+12 tokens" in out and "   256 " in out
    assert main(["plan", "--model", "esm2_15B", "--gpus", "1", "--backend", "single"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--model", "esm2_8M", "--gpus", "2", "--backend", "single"]) == 2
    assert "--backend single runs on one GPU" in capsys.readouterr().err
    assert main(["plan", "--model", "esm2_8M", "--gpu-memory", "lots"]) == 2

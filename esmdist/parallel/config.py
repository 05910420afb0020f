"""The `[parallel]` section of a run config: which engine, and how it shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from esmdist.ranges import bounded, check_fields


@dataclass(frozen=True)
class ParallelConfig:
    backend: Literal["single", "ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: int = bounded(2, 1, 3)
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    cpu_offload: bool = False
    """DeepSpeed: keep optimizer state in CPU memory."""
    meta_init: bool = False
    """FSDP: build on the meta device and initialise each shard in place (for sizes that do not
    fit one CPU copy). Off: every rank builds the full model from train.seed, then shards."""
    peak_tflops: float = bounded(0.0, 0.0, 1e6)
    """Peak dense TFLOP/s of one device in train.dtype, for MFU (0: look it up for known GPUs)."""
    prefetch_blocks: int = bounded(1, 0, 64)
    """FSDP: all-gather the parameters of this many blocks ahead of the one computing, in
    forward and in backward, issued before that block's kernels (explicit prefetch: the
    transfer overlaps compute even when the host issues kernels no faster than the GPU runs
    them); 0: torch's implicit order. Each costs one block's bf16 parameters of memory."""
    overlap_comm: bool = True
    """DeepSpeed: reduce gradient buckets on a side stream while backward runs (ZeRO's
    overlap_comm; DeepSpeed's own default only at stage 3). Costs bucket buffers (plan)."""
    bucket_elements: int = bounded(200_000_000, 1, 2**40)
    """DeepSpeed: elements per gradient-reduction and parameter all-gather bucket (capped at
    the model's parameters: DeepSpeed allocates its buckets whole)."""
    low_precision_weights: bool = True
    """In bf16, weights cast to bf16 once per optimizer step instead of autocast's casts in
    every micro-batch. One process: bf16 copies of the matmul weights over the fp32 masters
    (autocast's arithmetic exactly; +2 bytes per parameter). DDP: FSDP2's MixedPrecisionPolicy
    on a mesh without sharding (fsdp's arithmetic: bf16 parameters, fp32 reduction; +2 bytes
    per parameter while a step computes). FSDP2 always casts through its policy. False: DDP
    and autocast."""

    def engine_backend(self, world_size: int) -> str:
        """The engine that runs: DDP and FSDP2 at world size 1 are one process (nothing to
        reduce or shard; their wraps would only copy each block in and out); the checkpoint
        files are the same DCP either way."""
        if world_size == 1 and self.backend in ("ddp", "fsdp"):
            return "single"
        return self.backend

    def __post_init__(self) -> None:
        check_fields(self, "parallel")

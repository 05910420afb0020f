"""`esmdist plan`: memory per GPU, throughput and wall time of a training run on paper, before
a GPU hour is spent — "does 15B fit on 64 × 80 GB with ZeRO-3, and how long will it take".

Memory per GPU (bytes; P parameters, N GPUs, T tokens per micro-batch, L layers, E width):

- states — DDP / single: fp32 parameters 4P, fp32 gradients 4P, AdamW's two moments 8P, and
  DDP's gradient buckets 4P (N > 1); FSDP2 (bf16 compute): 16P / N, plus the all-gathered bf16
  parameters of 1 + prefetch blocks (the current one and those prefetched ahead of it;
  parallel.prefetch_blocks) and one block's fp32 gradients before its reduce-scatter; with
  gradient accumulation FSDP2 keeps the unsharded fp32 gradients of every block between
  micro-batches (+4P). DeepSpeed (ZeRO's paper: bf16 parameters 2P, bf16 gradients 2P, fp32
  master + moments 12P): stage 1 shards the 12P, stage 2 also the gradients, stage 3
  everything; plus its buffers as DeepSpeed's source allocates them: stage 1/2 gradient
  reduction buffers of parallel.bucket_elements each (at most P: esmdist caps them), two with
  overlap_comm (double buffering), at most 4 bytes an element (fp32 accumulation); stage 3
  one reduction bucket in bf16 and up to 1e9 live gathered parameters.
- activations — what autograd saves for backward, measured (bench/train_bench.py --memory,
  exact storage sizes): `ACTIVATION_VALUES` = 17 values per layer per token per unit of width
  plus 1.5 outside the blocks (embeddings, final LayerNorm), at 4 bytes in fp32 (within 1% on
  debug, 8M and 35M; within 4% with activation checkpointing); in bf16 the matmul outputs are bf16 and LayerNorm / rotary stay fp32:
  52 of those 68 bytes (estimated; not yet measured on a GPU). Activation checkpointing keeps
  each block's input only (1 value instead of 17) and recomputes one block at a time, so that
  block's 17 values come back during its backward (the `transient` term, in both modes).
  Fused attention saves O(L) per token, so none of this depends on sequence length.

Throughput: FLOPs per token from esmdist.metrics' formula at the bundled length distribution
cropped at 1,024 (`EFFECTIVE_LENGTH`: Σs²/Σs of the sequences), times the MFU (default: the
step-level MFU esmdist has measured for 650M on one H200, docs/PERFORMANCE.md); the step's
communication per GPU (below) at the link's bandwidth, overlapped with compute (FSDP2 prefetch,
ZeRO overlap, DDP buckets) except for one block's worth that cannot be (the first all-gather,
the last reduction). Assumptions are printed with every plan.

Communication per optimizer step per GPU, ring collectives ((N-1)/N of the volume each way):
DDP all-reduce of fp32 gradients 2·4P; ZeRO-1/2 reduce-scatter of bf16 gradients 2P (stage 2:
every micro-batch) + all-gather of bf16 parameters 2P; ZeRO-3 / FSDP2 all-gather of bf16
parameters in forward and in backward (2P + 2P every micro-batch; FSDP2 keeps its last block
gathered from forward to backward: 2(P − block) in backward) + reduce-scatter of gradients
(FSDP2 in fp32: 4P; ZeRO-3 bf16: 2P).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from esmdist.config import MAX_ACCUMULATION, JobConfig
from esmdist.metrics import block_params
from esmdist.model import ModelConfig

ACTIVATION_VALUES = 17
"""Values saved per layer, per token, per unit of width (measured, see the module text)."""
OUTSIDE_VALUES = 1.5
"""The same outside the blocks (embedding output, final LayerNorm), fitted on the same runs."""
BF16_BYTES_PER_VALUE = 2.45
"""Average bytes per saved value in bf16: 650M on an H200 saved 1.76 MB per token without
recomputation (bench/train_bench.py --memory, 2026-12-04), 17 values × 1,280 × 33 layers at
2.45 bytes each (most are bf16; LayerNorm statistics and the rotary inputs fp32)."""
EFFECTIVE_LENGTH = 385.0
"""Σs²/Σs over data/demo_4k.fasta cropped at 1,024 tokens: the attention term's length."""
MEAN_LENGTH = 270.5
"""Mean tokens per sequence of the same set."""
MEASURED_MFU = 0.25
"""esmdist's step-level MFU for ESM-2 650M, bf16, packed varlen, one H200 (PERFORMANCE.md)."""
GPUS_PER_NODE = 8
NVLINK_GBPS = 360.0
"""Achievable bus bandwidth inside an H100/H200 node (NVLink 4, NCCL ring), GB/s."""
INTERNODE_GBPS = 40.0
"""Per GPU across nodes: one 400 Gb/s InfiniBand NIC per GPU at ~80% efficiency, GB/s."""
BACKENDS = ("single", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class Setup:
    model: ModelConfig
    gpus: int
    gpu_memory: float
    """Bytes per GPU."""
    backend: str = "fsdp"
    zero_stage: int = 3
    activation_checkpointing: bool = False
    recompute_every: int = 1
    """With checkpointing: every n-th block recomputed (train.recompute_every)."""
    tokens_per_gpu: int = 16384
    """Tokens per micro-batch on one GPU."""
    tokens_per_step: int = 2_097_152
    dtype: str = "bf16"
    mfu: float = MEASURED_MFU
    peak_tflops: float = 989.0
    prefetch_blocks: int = 1
    """FSDP2: blocks all-gathered ahead (parallel.prefetch_blocks)."""
    overlap_comm: bool = True
    """DeepSpeed: ZeRO's overlap_comm (parallel.overlap_comm)."""
    bucket_elements: int = 200_000_000
    """DeepSpeed: elements per reduction bucket (parallel.bucket_elements)."""
    low_precision_weights: bool = True
    """bf16 weights for compute (parallel.low_precision_weights): single's copies of the matmul
    weights; ddp's FSDP2 policy over a replicate mesh."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}")
        if self.backend == "single" and self.gpus != 1:
            raise ValueError("--backend single runs on one GPU: --gpus 1")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError("--zero must be 1, 2 or 3")
        if self.prefetch_blocks < 0:
            raise ValueError("--prefetch-blocks must be at least 0")
        for name in ("gpus", "recompute_every", "tokens_per_gpu", "tokens_per_step",
                     "bucket_elements"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.mfu <= 1:
            raise ValueError("--mfu is a fraction in (0, 1]")

    @property
    def accumulation(self) -> int:
        return max(1, math.ceil(self.tokens_per_step / (self.gpus * self.tokens_per_gpu)))

    @property
    def sharding(self) -> str:
        """ "none", "zero1", "zero2" or "zero3" (FSDP2 shards as ZeRO-3)."""
        if self.backend in ("single", "ddp"):
            return "none"
        return "zero3" if self.backend == "fsdp" else f"zero{self.zero_stage}"


def parse_bytes(text: str) -> float:
    """`80GB`, `80GiB`, `141G`, `512MB`, `80` (a plain number is GB) → bytes (GB = 10⁹,
    GiB = 2³⁰)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", text, re.IGNORECASE)
    if not found or (found.group(3) and not found.group(2)):
        raise ValueError(f"{text!r}: give a size such as 80GB or 141GiB")
    number, prefix, binary = float(found.group(1)), found.group(2).upper(), found.group(3)
    if not prefix and not found.group(4):
        prefix = "G"  # a GPU's memory in bytes would be a mistake: `80` means 80 GB
    power = " KMGT".index(prefix or " ")
    size = number * ((1024 if binary else 1000) ** power)
    if size < 1e9:
        raise ValueError(f"{text!r}: {size:,.0f} bytes is no GPU's memory; give e.g. 80GB")
    return size


def _block(setup: Setup) -> int:
    """Parameters of one transformer block."""
    return block_params(setup.model) // setup.model.num_layers


def _low_precision(setup: Setup) -> bool:
    return setup.dtype == "bf16" and setup.low_precision_weights


def state_bytes(setup: Setup) -> dict[str, float]:
    """Parameters, gradients, optimizer state and the engine's buffers, per GPU."""
    p, n, block = setup.model.num_params(), setup.gpus, _block(setup)
    kind = setup.sharding
    if kind == "none" and setup.backend == "ddp" and n > 1 and _low_precision(setup):
        # FSDP2 over a (world × 1) mesh: the bf16 weights kept through the step's backward,
        # fp32 gradients accumulated beside the reduced ones, one block's reduction in flight.
        accumulated = 4.0 * p if setup.accumulation > 1 else 0.0
        return {"parameters": 4.0 * p, "gradients": 4.0 * p + accumulated, "optimizer": 8.0 * p,
                "buffers": 2.0 * p + 4.0 * block}  # fmt: skip
    if kind == "none":
        buffers = 4.0 * p if setup.backend == "ddp" and n > 1 else 0.0
        if setup.backend == "single" and _low_precision(setup):
            buffers += 2.0 * block_params(setup.model)  # the bf16 compute copy
        return {"parameters": 4.0 * p, "gradients": 4.0 * p, "optimizer": 8.0 * p,
                "buffers": buffers}  # fmt: skip
    if setup.backend == "fsdp":
        accumulated = 4.0 * p if setup.accumulation > 1 else 0.0
        return {"parameters": 4.0 * p / n, "gradients": 4.0 * p / n + accumulated,
                "optimizer": 8.0 * p / n,
                "buffers": (1 + setup.prefetch_blocks) * 2.0 * block + 4.0 * block}  # fmt: skip
    stage, bucket = setup.zero_stage, min(setup.bucket_elements, p)
    if stage < 3:
        buffers = (2 if setup.overlap_comm else 1) * 4.0 * bucket
    else:
        buffers = 2.0 * bucket + 2.0 * min(1e9, p)
    return {"parameters": 2.0 * p / (n if stage == 3 else 1),
            "gradients": 2.0 * p / (n if stage >= 2 else 1),
            "optimizer": 12.0 * p / n, "buffers": buffers}  # fmt: skip


def activation_bytes(setup: Setup) -> dict[str, float]:
    """Saved activations of one micro-batch and the transient of one block's backward."""
    config, tokens = setup.model, setup.tokens_per_gpu
    per_value = 4.0 if setup.dtype == "fp32" else BF16_BYTES_PER_VALUE
    per_block = ACTIVATION_VALUES * config.embed_dim * tokens * per_value
    layers = config.num_layers
    # A recomputed block keeps only its input; `[::n]` recomputes ⌈L/n⌉ of the L blocks.
    recomputed = -(-layers // setup.recompute_every) if setup.activation_checkpointing else 0
    kept = recomputed * config.embed_dim * tokens * per_value + (layers - recomputed) * per_block
    head = 0.15 * tokens * (3 * config.embed_dim + 2 * config.vocab_size) * 4.0
    # Each block not recomputed also keeps its joined q/k/v weight (3E², compute dtype).
    joined = (layers - recomputed) * 3 * config.embed_dim**2 * (2.0 if per_value < 4 else 4.0)
    saved = kept + joined + OUTSIDE_VALUES * config.embed_dim * tokens * 4
    return {"activations": saved + head, "transient": per_block}


def flops_per_token(config: ModelConfig) -> float:
    """esmdist.metrics' formula per token at the bundled length distribution."""
    attention = 12.0 * config.num_layers * config.embed_dim * EFFECTIVE_LENGTH
    head = 0.15 * 6.0 * (config.embed_dim**2 + config.embed_dim * config.vocab_size)
    return 6.0 * block_params(config) + attention + head


def communication_bytes(setup: Setup) -> float:
    """Bytes each GPU sends (≈ receives) per optimizer step."""
    p, n, k = setup.model.num_params(), setup.gpus, setup.accumulation
    ring = (n - 1) / n
    kind = setup.sharding
    if n == 1:
        return 0.0
    if kind == "none":
        return ring * 2 * 4.0 * p
    if kind in ("zero1", "zero2"):
        reduce = 2.0 * p * (k if kind == "zero2" else 1)
        return ring * (reduce + 2.0 * p)
    if setup.backend == "fsdp":
        return ring * (k * (2.0 * p + 2.0 * (p - _block(setup))) + 4.0 * p)
    return ring * (k * (2.0 * p + 2.0 * p) + 2.0 * p)


def bandwidth(gpus: int) -> float:
    """Bytes/s of a ring over `gpus`: NVLink inside one node, the NIC across nodes."""
    return (NVLINK_GBPS if gpus <= GPUS_PER_NODE else INTERNODE_GBPS) * 1e9


@dataclass(frozen=True)
class Plan:
    setup: Setup
    memory: dict[str, float]
    compute_s: float
    communication_s: float
    exposed_s: float

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= 0.95 * self.setup.gpu_memory  # the allocator's margin

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def scaling_efficiency(self) -> float:
        return self.compute_s / self.step_s

    @property
    def tokens_per_s(self) -> float:
        return self.setup.gpus * self.setup.accumulation * self.setup.tokens_per_gpu / self.step_s


def plan(setup: Setup) -> Plan:
    memory = {**state_bytes(setup), **activation_bytes(setup)}
    tokens = setup.accumulation * setup.tokens_per_gpu
    compute = tokens * flops_per_token(setup.model) / (setup.mfu * setup.peak_tflops * 1e12)
    communication = communication_bytes(setup) / bandwidth(setup.gpus)
    # Overlapped with compute but for one block's worth at the start or end of the step.
    unhidden = communication / setup.model.num_layers
    exposed = max(0.0, communication - compute) + unhidden
    return Plan(setup, memory, compute, communication, exposed)


def largest_micro_batch(setup: Setup, step: int = 1024) -> int:
    """The most tokens per GPU and micro-batch (a multiple of `step`, at most one micro-batch
    per optimizer step) with which `setup` still fits; 0 if none does. Larger micro-batches
    mean fewer, fuller kernels per step. Searched from the top down, every size: memory is not
    monotonic in it (FSDP2 keeps unsharded gradients only while it accumulates)."""
    for units in range(max(1, setup.tokens_per_step // setup.gpus // step), 0, -1):
        if plan(replace(setup, tokens_per_gpu=units * step)).fits:
            return units * step
    return 0


MIN_EFFICIENT_MICRO_BATCH = 16384
"""Tokens per micro-batch below which a GPU runs well under its speed: 650M on an H200 reached
10.9% MFU at 4,096 tokens, 27% at 16,384 (2026-12-04). Recomputation (a third more compute
when every block recomputes) is turned on only when no micro-batch this large fits without."""
AUTO_MICRO_BATCH_CAP = 262144
"""The largest micro-batch `data.max_tokens = "auto"` picks: past it a small model is no
faster, and the loader's packing of one batch grows with it."""


@dataclass(frozen=True)
class MicroBatch:
    tokens: int
    recompute_every: int
    """0: no recomputation."""
    reason: str


def auto_micro_batch(setup: Setup, crop_length: int, recompute_every: int = 0) -> MicroBatch:
    """`data.max_tokens = "auto"`: the largest micro-batch (tokens per GPU; one that divides
    the step's tokens per GPU and holds a whole cropped sequence, at most
    `AUTO_MICRO_BATCH_CAP`) with which `setup` fits its GPU. Recomputation as asked
    (`recompute_every` > 0), or else only where needed: none, if a micro-batch of
    `MIN_EFFICIENT_MICRO_BATCH` tokens (or the whole step's share) fits without; else every
    other block, else every block. ValueError if nothing fits."""
    per_gpu = setup.tokens_per_step // setup.gpus
    if per_gpu * setup.gpus != setup.tokens_per_step:
        raise ValueError(f"train.tokens_per_step ({setup.tokens_per_step}) must be a multiple of "
                         f"the world size ({setup.gpus})")  # fmt: skip
    fewest = -(-per_gpu // AUTO_MICRO_BATCH_CAP)  # micro-batches per step
    most = min(per_gpu // crop_length, MAX_ACCUMULATION)
    sizes = [per_gpu // k for k in range(fewest, most + 1) if per_gpu % k == 0]
    options = [recompute_every] if recompute_every else [0, 2, 1]
    wanted = min(MIN_EFFICIENT_MICRO_BATCH, per_gpu)
    for every in options:
        trial = replace(setup, activation_checkpointing=every > 0, recompute_every=max(1, every))
        fitting = [m for m in sizes if plan(replace(trial, tokens_per_gpu=m)).fits]
        if fitting and (fitting[0] >= wanted or every == options[-1]):
            recompute = f"recomputing every {every} block(s)" if every else "no recomputation"
            return MicroBatch(fitting[0], every, f"{fitting[0]:,} tokens per micro-batch, "
                              f"{recompute}: the largest that fits {setup.gpu_memory / 1e9:.0f} GB "
                              "(esmdist plan's memory model)")  # fmt: skip
    raise ValueError(f"data.max_tokens = auto: no micro-batch of at least {crop_length} tokens "
                     f"(data.crop_length) that divides the {per_gpu:,} tokens per GPU and step "
                     f"fits in {setup.gpu_memory / 1e9:.0f} GB, even recomputing every block; "
                     "shard the model (parallel.backend fsdp or deepspeed ZeRO-3 on more GPUs)")  # fmt: skip


CPU_MICRO_BATCH = 16384
"""`data.max_tokens = "auto"` on a CPU (at most; a divisor of the step's tokens per rank)."""


def resolve_micro_batch(config: JobConfig, world_size: int,
                        gpu_memory: float | None) -> tuple[JobConfig, str]:  # fmt: skip
    """`config` with `data.max_tokens = "auto"` chosen for `world_size` GPUs of `gpu_memory`
    free bytes each (None: a CPU run), activation recomputation set as chosen; and the line
    that says so ("" when max_tokens is a number)."""
    data, train = config.data, config.train
    if data.max_tokens != "auto":
        return config, ""
    per_rank = train.tokens_per_step // world_size
    if gpu_memory is None:
        fewest = -(-per_rank // CPU_MICRO_BATCH)
        tokens = next((per_rank // k for k in range(fewest, per_rank // data.crop_length + 1)
                       if per_rank % k == 0), None)  # fmt: skip
        if tokens is None:
            raise ValueError(f"data.max_tokens = auto: no micro-batch between data.crop_length "
                             f"({data.crop_length}) and {CPU_MICRO_BATCH:,} tokens divides the "
                             f"{per_rank:,} tokens per rank and step")  # fmt: skip
        chosen = MicroBatch(tokens, train.recompute_every if train.activation_checkpointing else 0,
                            f"{tokens:,} tokens per micro-batch (on a CPU: at most {CPU_MICRO_BATCH:,})")  # fmt: skip
    else:
        parallel = config.parallel
        setup = Setup(config.model.build(), world_size, gpu_memory,
                      parallel.engine_backend(world_size), parallel.zero_stage,
                      tokens_per_step=train.tokens_per_step, dtype=train.dtype,
                      prefetch_blocks=parallel.prefetch_blocks, overlap_comm=parallel.overlap_comm,
                      bucket_elements=parallel.bucket_elements,
                      low_precision_weights=parallel.low_precision_weights)  # fmt: skip
        asked = train.recompute_every if train.activation_checkpointing else 0
        chosen = auto_micro_batch(setup, data.crop_length, asked)
    train = replace(train, activation_checkpointing=chosen.recompute_every > 0,
                    recompute_every=max(1, chosen.recompute_every))  # fmt: skip
    resolved = replace(config, data=replace(data, max_tokens=chosen.tokens), train=train)
    return resolved, f"data.max_tokens = auto: {chosen.reason}"


def _recompute(setup: Setup) -> str:
    if not setup.activation_checkpointing:
        return "off"
    return "on" if setup.recompute_every == 1 else f"on every {setup.recompute_every} blocks"


def _gb(value: float) -> str:
    return f"{value / 1e9:8.2f} GB"


def _duration(seconds: float) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{int(days)} d {rest / 3600:.1f} h" if days else f"{seconds / 3600:.1f} h"


def describe(result: Plan, budget_tokens: float) -> str:
    """The plan as the command prints it."""
    setup, model = result.setup, result.setup.model
    engine = setup.backend + (f" ZeRO-{setup.zero_stage}" if setup.backend == "deepspeed" else "")
    lines = [f"{model.arch} {model.num_layers} layers × {model.embed_dim} "
             f"({model.num_params() / 1e9:.2f} B parameters) on {setup.gpus} GPU(s) of "
             f"{setup.gpu_memory / 1e9:.0f} GB, {engine}, {setup.dtype}, activation "
             f"checkpointing {_recompute(setup)}",
             f"micro-batch {setup.tokens_per_gpu:,} tokens per GPU × {setup.accumulation} "
             f"accumulation × {setup.gpus} GPUs = {setup.accumulation * setup.tokens_per_gpu * setup.gpus:,} "
             "tokens per step", "", "memory per GPU:"]  # fmt: skip
    lines += [f"  {name:<12} {_gb(value)}" for name, value in result.memory.items()]
    verdict = "fits" if result.fits else "does NOT fit"
    lines += [f"  {'total':<12} {_gb(result.total_bytes)}  → {verdict} in "
              f"{setup.gpu_memory / 1e9:.0f} GB (with a 5% allocator margin); the largest "
              f"micro-batch that fits: {largest_micro_batch(setup):,} tokens per GPU", ""]  # fmt: skip
    steps = budget_tokens / (setup.accumulation * setup.tokens_per_gpu * setup.gpus)
    lines += [f"per step: compute {result.compute_s:.3f} s at {setup.mfu:.0%} MFU of "
              f"{setup.peak_tflops:.0f} TFLOP/s, communication {result.communication_s:.3f} s "
              f"({communication_bytes(setup) / 1e9:.1f} GB per GPU at "
              f"{bandwidth(setup.gpus) / 1e9:.0f} GB/s), exposed {result.exposed_s:.3f} s "
              f"→ scaling efficiency {result.scaling_efficiency:.1%}",
              f"throughput: {result.tokens_per_s:,.0f} tokens/s ({result.tokens_per_s / setup.gpus:,.0f} "
              "per GPU)",
              f"budget {budget_tokens:.3g} tokens = {steps:,.0f} steps: {_duration(steps * result.step_s)}",
              "", "assumptions: lengths as the bundled UniRef-like set cropped at 1,024 "
              f"(Σs²/Σs = {EFFECTIVE_LENGTH:.0f}); MFU as given (--mfu; measured: "
              f"{MEASURED_MFU:.0%} step-level for 650M on one H200); NVLink {NVLINK_GBPS:.0f} GB/s "
              f"inside a node of {GPUS_PER_NODE}, {INTERNODE_GBPS:.0f} GB/s per GPU across nodes; "
              "communication hidden behind compute except one block's worth; formulas: "
              "docs/PERFORMANCE.md"]  # fmt: skip
    return "\n".join(lines)

"""Communication behind compute (issue 16): training steps with and without esmdist's overlap
settings, alternately in one process group, on the same real batches and the same weights.

    torchrun --nproc-per-node 2 bench/overlap_bench.py --model esm2_8M --backend fsdp
    torchrun --nproc-per-node 8 bench/overlap_bench.py --model esm2_650M --backend fsdp \
        --tokens 16384 --micro 2
    torchrun --nproc-per-node 8 bench/overlap_bench.py --model esm2_650M --backend deepspeed

fsdp: parallel.prefetch_blocks=0 (FSDP2's implicit order) against `--prefetch` blocks gathered
explicitly ahead; deepspeed (ZeRO `--zero`): overlap_comm off against on. Everything else is the
trainer's engine as `launcher/pretrain.py` builds it (engine_for), each rank stepping through
its own packed batches of real sequences (data/demo_4k.fasta, cropped at 1,024) of `--tokens`
tokens, `--micro` micro-batches per optimizer step. Each round times `--steps` steps of each
variant (device-synchronised, ranks aligned by a barrier; one warm-up round not counted); rank
0 prints the medians and the ratio as `N.NNx`. On CPU (gloo) collectives run on the calling
thread, so no overlap can gain anything there: the CPU figure only shows what it costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from train_bench import Esmdist, add_timing_arguments, real_batches, synchronize  # noqa: E402

from esmdist.model.config import MODEL_SIZES  # noqa: E402


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Name → config overrides, the baseline first."""
    if args.backend == "fsdp":
        return {"fsdp implicit order": ["--parallel.prefetch_blocks=0"],
                f"fsdp prefetch {args.prefetch}": [f"--parallel.prefetch_blocks={args.prefetch}"]}  # fmt: skip
    stage = f"--parallel.zero_stage={args.zero}"
    return {f"zero{args.zero} overlap_comm off": [stage, "--parallel.overlap_comm=false"],
            f"zero{args.zero} overlap_comm on": [stage, "--parallel.overlap_comm=true"]}  # fmt: skip


def trainer(args: argparse.Namespace, overrides: list[str], info) -> Esmdist:
    """The trainer's engine (engine_for) for one variant, on this rank."""
    dtype = args.dtype or ("bf16" if info.device.type == "cuda" else "fp32")
    return Esmdist(args.model, info.device, dtype, args.tokens, args.compile, info=info,
                   overrides=(f"--parallel.backend={args.backend}",
                              f"--train.tokens_per_step={args.tokens * args.micro * info.world_size}",
                              *overrides))  # fmt: skip


def timed(ours: Esmdist, steps: list[list], device: torch.device) -> float:
    """Seconds per optimizer step, every rank starting together."""
    synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for micro_batches in steps:
        ours.step(*micro_batches)
    synchronize(device)
    dist.barrier()
    return (time.perf_counter() - start) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_8M", choices=list(MODEL_SIZES))
    parser.add_argument("--backend", default="fsdp", choices=["fsdp", "deepspeed"])
    parser.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--prefetch", type=int, default=1, help="fsdp: blocks ahead")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument("--micro", type=int, default=1, help="micro-batches per step")
    add_timing_arguments(parser)
    args = parser.parse_args()
    from esmdist.parallel.distributed import init_distributed

    info = init_distributed(args.backend)
    torch.manual_seed(0)
    trainers = {name: trainer(args, overrides, info) for name, overrides in variants(args).items()}
    batches = real_batches(args.tokens, args.steps * args.micro, seed=1 + info.rank)
    if info.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    steps = [batches[i : i + args.micro] for i in range(0, len(batches), args.micro)]
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for round_number in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for name, ours in trainers.items():
            took = timed(ours, steps, info.device)
            if round_number:
                seconds[name].append(took)
    if info.is_main:
        report(args, info, batches, seconds)
    dist.destroy_process_group()


def report(args: argparse.Namespace, info, batches: list, seconds: dict[str, list[float]]) -> None:
    tokens = sum(b.num_tokens for b in batches) / args.steps * info.world_size
    print(f"{args.model} on {info.world_size} × {info.device.type}, {args.micro} × "
          f"{args.tokens} tokens per rank and step ({tokens:,.0f} real tokens per step), "
          f"{args.rounds} rounds of {args.steps} steps, medians:")  # fmt: skip
    result = {"model": args.model, "backend": args.backend, "world": info.world_size,
              "device": info.device.type, "tokens_per_step": tokens}  # fmt: skip
    for name, times in seconds.items():
        step = statistics.median(times)
        print(f"  {name:<26} {1000 * step:8.1f} ms/step  {tokens / step:10,.0f} tokens/s")
        result[name] = {"step_s": step, "tokens_per_s": tokens / step}
    baseline, overlapped = seconds.values()
    ratio = statistics.median(baseline) / statistics.median(overlapped)
    per_round = [b / o for b, o in zip(baseline, overlapped, strict=True)]
    print(f"overlapped vs baseline: {ratio:.2f}x "
          f"(per round: {', '.join(f'{r:.2f}' for r in per_round)})")  # fmt: skip
    result["ratio"] = ratio
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

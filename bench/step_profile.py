"""Where one training step's time goes: the trainer's step (bench/train_bench.py's) on real
packed batches under torch.profiler — on a GPU its kernels' device time, on a CPU its
operators' own time — summed by kind (matrix multiplies, attention, normalisation, other
elementwise, optimizer, copies) with the top entries, and how busy the device was over the
step's wall time. Fused kernels (rotary + QKV, bias-GELU, LayerNorm, a linear-cross-entropy
head) are worth writing only where this shows the time.

    python bench/step_profile.py --model esm2_650M --device cuda --tokens 16384 [--compile]
    python bench/step_profile.py --model esm2_8M --device cpu --tokens 4096
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import Esmdist, add_compile_argument, real_batches, synchronize

from esmdist.model.config import MODEL_SIZES

KINDS = (  # first match wins, on CUDA kernel names and on aten operator names alike
    ("attention", r"flash|attention|fmha|sdpa|varlen"),
    ("matmul", r"gemm|matmul|aten::mm\b|addmm|bmm|cublas|cutlass|xmma|nvjet|wgmma"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("normalisation", r"norm"),
    ("copy", r"copy|memcpy|memset|fill|\bcat\b|index|gather|scatter|to_copy|clone|contiguous"),
    ("elementwise", r"elementwise|gelu|add|mul|div|sub|exp|sin|cos|tanh|pow|where|neg|sqrt"
                    r"|reduce|sum|mean|max|triton|softmax|log|clamp|unrolled"),
)  # fmt: skip


def kind(name: str) -> str:
    lowered = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, lowered)), "other")


def profiled_times(profile, device: torch.device) -> tuple[dict[str, float], int]:
    """Microseconds per entry — each kernel's device time on a GPU, each operator's own CPU
    time (its children's excluded, so nothing counts twice) on a CPU — and the number of
    kernels launched (GPU) or operators dispatched (CPU, nested ones included): the host's
    work, which bounds a small model's step on a GPU."""
    found: dict[str, float] = collections.Counter()
    calls = 0
    if device.type == "cuda":
        for event in profile.events():
            if event.device_type == DeviceType.CUDA:
                found[event.name] += event.device_time_total
                calls += 1
    else:
        for entry in profile.key_averages():
            if entry.key.startswith("aten::"):
                found[entry.key] += entry.self_cpu_time_total
                calls += entry.count
    return found, calls


def profile_steps(ours: Esmdist, batches: list, device: torch.device) -> tuple[dict, int, float]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profile:
        start = time.perf_counter()
        for batch in batches:
            ours.step(batch)
        synchronize(device)
        wall = time.perf_counter() - start
    return *profiled_times(profile, device), wall


def report(times: dict[str, float], calls: int, wall: float, steps: int, top: int) -> dict:
    total = sum(times.values())
    by_kind: dict[str, float] = collections.Counter()
    for name, micros in times.items():
        by_kind[kind(name)] += micros
    per_step = 1e-3 / steps  # µs in all → ms per step
    result = {
        "step_ms": 1e3 * wall / steps,
        "profiled_ms": total * per_step,
        "busy": total * 1e-6 / wall,
        "calls_per_step": calls / steps,
        "kinds": {k: {"ms": v * per_step, "share": v / total} for k, v in by_kind.most_common()},
        "top": [{"name": name, "kind": kind(name), "ms": v * per_step, "share": v / total}
                for name, v in sorted(times.items(), key=lambda item: -item[1])[:top]],
    }  # fmt: skip
    print(f"step {result['step_ms']:.1f} ms (profiled), kernels/operators {result['profiled_ms']:.1f}"
          f" ms of it: busy {result['busy']:.0%}; {result['calls_per_step']:,.0f} kernels launched "
          "(GPU) / operators dispatched (CPU) per step")  # fmt: skip
    print("| kind | ms per step | share |\n|---|---:|---:|")
    for name, row in result["kinds"].items():
        print(f"| {name} | {row['ms']:.2f} | {row['share']:.1%} |")
    print("\n| kernel / operator | kind | ms per step | share |\n|---|---|---:|---:|")
    for row in result["top"]:
        print(f"| `{row['name'][:90]}` | {row['kind']} | {row['ms']:.2f} | {row['share']:.1%} |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_8M", choices=list(MODEL_SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 3 warm-up)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    add_compile_argument(parser)
    parser.add_argument("--top", type=int, default=15, help="entries listed")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    ours = Esmdist(args.model, device, dtype, args.tokens, args.compile)
    batches = real_batches(args.tokens, 3 + args.steps, seed=1)
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    for batch in batches[:3]:  # warm-up: allocator, optimizer state, compilation
        ours.step(batch)
    print(f"{args.model} on {device}, {dtype}, {args.tokens} tokens per step, compile "
          f"{args.compile}, {args.steps} profiled steps:")  # fmt: skip
    times, calls, wall = profile_steps(ours, batches[3:], device)
    if not sum(times.values()):
        sys.exit(
            f"step_profile: the profiler recorded no {device.type} time (torch {torch.__version__})"
        )
    result = {"model": args.model, "device": str(device), "dtype": dtype, "tokens": args.tokens,
              "compile": args.compile, **report(times, calls, wall, args.steps, args.top)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

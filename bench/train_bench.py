"""Training steps of esmdist (packed) against Hugging Face `EsmForMaskedLM` (padded) on the same
real sequences, same weights, same optimizer and tokens per step, alternately in one process.

    python bench/train_bench.py --model esm2_8M --device cpu [--tokens 4096] [--rounds 5]
    python bench/train_bench.py --model esm2_650M --device cuda --tokens 65536 [--compile false]
    python bench/train_bench.py --memory --model esm2_8M [--tokens 8192]   # peak vs crop length

Batches: real sequences of data/demo_4k.fasta (UniRef-like lengths), cropped to 1,022 residues,
drawn until `--tokens` real tokens (with <cls>/<eos>) per step; 15% masked (80/10/10). esmdist
runs its engine's step (packed, masked positions only through the LM head; compiled on a GPU
unless `--compile false`, as the trainer does; `--micro-tokens` splits the step into
micro-batches). HF gets the same sequences padded, with its `sdpa` attention, its own loss
(labels -100 off the masked positions) and torch's fused AdamW with the same settings (HF
Trainer's `adamw_torch_fused`), in two settings:
- grouped: the steps' sequences sorted by length and cut into steps of the same real tokens
  (what HF Trainer's `group_by_length` aims at: little padding) — HF's best setting;
- random: each step's sequences as drawn, padded to the longest (HF Trainer's default).
Each HF step runs as micro-batches (gradient accumulation) of at most `--hf-micro-tokens`
padded tokens; "auto" tries the whole step, then halves, until one runs without running out of
memory — the largest micro-batch that fits, per setting. Each round times `--steps` optimizer
steps of each (device-synchronised; one warm-up round not counted); the median over rounds is
reported. Tokens/s count real tokens; TFLOP/s and MFU use esmdist.metrics' formula for all,
so padding earns HF nothing.

`--memory`: esmdist's peak training memory per token at crop lengths 1,024 / 2,048 / 4,096 with
the same tokens per (packed) micro-batch: the longest bundled sequences cropped to the length,
each length in a fresh process (CPU: peak RSS above the process after its warm-up step at
the smallest batch; GPU: torch's peak allocated).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esmdist import alphabet  # noqa: E402
from esmdist.data.batch import MaskingConfig, PackedBatch, crop, pack, with_specials  # noqa: E402
from esmdist.model.config import MODEL_SIZES  # noqa: E402


def real_batches(tokens: int, count: int, seed: int = 0) -> list[PackedBatch]:
    """`count` packed batches of real sequences, each up to `tokens` tokens."""
    records = (REPO / "data/demo_4k.fasta").read_text().split(">")[1:]
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        sequences, total = [], 0
        while True:
            record = records[rng.integers(len(records))]
            residues = alphabet.encode("".join(record.splitlines()[1:]))
            sequence = with_specials(crop(residues, 1024, rng.random()))
            if total + len(sequence) > tokens:
                break
            sequences.append(sequence)
            total += len(sequence)
        batches.append(pack(sequences, MaskingConfig(), rng.random((3, total))))
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Esmdist:
    name = "esmdist (packed)"

    def __init__(self, size: str, device: torch.device, dtype: str, tokens: int, compile: str,
                 checkpointing: bool = False, info=None, overrides: tuple[str, ...] = ()):  # fmt: skip
        """One process (`single`) unless `info` (a DistInfo) and `overrides` (config keys, after
        these: the backend, tokens per step) say otherwise; `compile`: train.compile (auto,
        true, false)."""
        from esmdist.config import load_config
        from esmdist.parallel.distributed import DistInfo
        from esmdist.train import engine_for

        config = load_config(None, [f"--model.size={size}", "--parallel.backend=single",
                                    f"--train.dtype={dtype}", f"--data.max_tokens={tokens}",
                                    f"--train.tokens_per_step={tokens}",
                                    f"--train.compile={compile}",
                                    f"--train.activation_checkpointing={str(checkpointing).lower()}",
                                    *overrides])  # fmt: skip
        self.config = config
        self.engine = engine_for(config, info or DistInfo(0, 1, 0, device))
        self.device = device

    def step(self, *micro_batches: PackedBatch) -> None:
        """The trainer's optimizer step over micro-batches in host memory (pinned for a GPU),
        as the loader hands them out."""
        from esmdist.train import masked_lm_loss

        for index, batch in enumerate(micro_batches):
            loss = masked_lm_loss(self.engine, batch, self.device) / batch.targets.numel()
            self.engine.backward(loss, last=index == len(micro_batches) - 1)
        self.engine.step()


class HuggingFace:
    name = "HF EsmForMaskedLM (padded, sdpa)"

    def __init__(self, ours: Esmdist, device: torch.device, dtype: str):
        from transformers import EsmForMaskedLM

        from esmdist.model.convert import save_hf

        state = {k: v.detach().float().cpu() for k, v in ours.engine.full_state_dict().items()}
        with tempfile.TemporaryDirectory() as scratch:
            save_hf(state, ours.engine.module.config, Path(scratch) / "hf")
            self.model = EsmForMaskedLM.from_pretrained(Path(scratch) / "hf",
                                                        attn_implementation="sdpa")  # fmt: skip
        self.model.to(device).train()
        optim = ours.config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr,
                                           betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay,
                                           fused=True)  # fmt: skip
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16")
        self.device = device

    def step(self, *micro_batches: tuple[torch.Tensor, torch.Tensor]) -> None:
        """One optimizer step over padded micro-batches (tokens, labels): HF's loss is the mean
        over a micro-batch's masked tokens, weighted here by its share of the step's."""
        masked = sum(int(labels.ne(-100).sum()) for _, labels in micro_batches)
        for tokens, labels in micro_batches:
            with self.autocast:
                loss = self.model(input_ids=tokens, attention_mask=tokens.ne(alphabet.PAD),
                                  labels=labels).loss  # fmt: skip
            (loss * (int(labels.ne(-100).sum()) / masked)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sequences_of(batch: PackedBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence of a packed batch: (tokens, labels with -100 off the masked positions)."""
    labels = torch.full_like(batch.tokens, -100)
    labels[batch.selected] = batch.targets
    bounds = batch.cu_seqlens.tolist()
    return [(batch.tokens[a:b], labels[a:b]) for a, b in itertools.pairwise(bounds)]


def hf_steps(our_steps: list[list[PackedBatch]], grouped: bool, micro_tokens: int,
             device: torch.device) -> list[list]:  # fmt: skip
    """HF's steps over the same sequences as esmdist's steps (grouped: sorted by length and
    re-cut into steps of the same real tokens), each step as padded micro-batches of at most
    `micro_tokens` padded tokens (one sequence at least)."""
    steps = [[s for b in step for s in sequences_of(b)] for step in our_steps]
    if grouped:
        pool = sorted((s for step in steps for s in step), key=lambda s: len(s[0]), reverse=True)
        sizes, steps = [sum(b.num_tokens for b in step) for step in our_steps], []
        for size in sizes:
            step, total = [], 0
            while pool and (not step or total + len(pool[0][0]) <= size):
                total += len(pool[0][0])
                step.append(pool.pop(0))
            steps.append(step)
    out = []
    for step in steps:
        step = sorted(step, key=lambda s: len(s[0]), reverse=True) if grouped else step
        micro, rows = [], []
        for sequence in step:
            width = max(len(r[0]) for r in [*rows, sequence])
            if rows and width * (len(rows) + 1) > micro_tokens:
                micro.append(_padded(rows, device))
                rows = []
            rows.append(sequence)
        micro.append(_padded(rows, device))
        out.append(micro)
    return out


def _padded(rows: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True,
                                             padding_value=alphabet.PAD)  # fmt: skip
    labels = torch.nn.utils.rnn.pad_sequence([r[1] for r in rows], batch_first=True,
                                             padding_value=-100)  # fmt: skip
    return tokens.to(device), labels.to(device)


def largest_fitting(hf: HuggingFace, our_steps: list[list[PackedBatch]], grouped: bool,
                    start: int, device: torch.device) -> tuple[int, list]:  # fmt: skip
    """The largest micro-batch (padded tokens: `start`, then halved) with which HF's steps
    run without running out of memory, and those steps (each tried once)."""
    micro = start
    while True:
        steps = hf_steps(our_steps, grouped, micro, device)
        try:
            for step in steps:
                hf.step(*step)
            synchronize(device)
            return micro, steps
        except torch.OutOfMemoryError:
            hf.optimizer.zero_grad(set_to_none=True)
            del steps
            torch.cuda.empty_cache()
            if micro <= 1024:
                raise
            micro //= 2


def timed(runner, batches: list, device: torch.device) -> float:
    """Seconds per step over `batches`, one micro-batch a step."""
    return timed_steps(runner.step, [[b] for b in batches], device)


def timed_steps(step, steps: list[list], device: torch.device) -> float:
    """Seconds per optimizer step, `step(*micro_batches)` of each of `steps`."""
    synchronize(device)
    start = time.perf_counter()
    for micro_batches in steps:
        step(*micro_batches)
    synchronize(device)
    return (time.perf_counter() - start) / len(steps)


def long_batch(length: int, tokens: int) -> PackedBatch:
    """Sequences of exactly `length` tokens (the longest real ones, cropped) packed to `tokens`."""
    records = (REPO / "data/demo_4k.fasta").read_text().split(">")[1:]
    residues = sorted((alphabet.encode("".join(r.splitlines()[1:])) for r in records),
                      key=len, reverse=True)  # fmt: skip
    count = max(1, tokens // length)
    sequences = [with_specials(residues[i % len(residues)][: length - 2]) for i in range(count)]
    total = sum(map(len, sequences))
    return pack(sequences, MaskingConfig(), np.random.default_rng(0).random((3, total)))


def peak_memory_at(size: str, device: torch.device, dtype: str, length: int, tokens: int,
                   checkpointing: bool, compile: str) -> None:  # fmt: skip
    """In this process: print (bytes of peak growth, tokens) of two steps at crop `length`."""
    import resource

    torch.manual_seed(0)
    ours = Esmdist(size, device, dtype, tokens, compile, checkpointing)
    batch = long_batch(length, tokens)
    ours.step(long_batch(128, 256))  # optimizer state and allocator warm, at a small batch
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        ours.step(batch)
    synchronize(device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    print(peak - base, saved_bytes(ours, batch), batch.num_tokens)


def saved_bytes(ours: Esmdist, batch: PackedBatch) -> int:
    """Bytes autograd keeps for the backward of one micro-batch (esmdist.testing.memory)."""
    from esmdist.testing.memory import saved_bytes as measured

    engine = ours.engine

    def forward() -> torch.Tensor:
        from esmdist.train import masked_lm_loss

        return masked_lm_loss(engine, batch, ours.device) / batch.targets.numel()

    found = measured(forward, engine.module.parameters())
    engine.skip()
    return found


def memory_table(size: str, device: torch.device, dtype: str, tokens: int,
                 checkpointing: bool, compile: str) -> list[dict]:  # fmt: skip
    import subprocess

    rows = []
    for length in (1024, 2048, 4096):
        extra = ["--activation-checkpointing"] if checkpointing else []
        done = subprocess.run([sys.executable, __file__, "--model", size, "--device", str(device),
                               "--dtype", dtype, "--tokens", str(tokens), "--compile", compile,
                               "--memory-at", str(length), *extra],
                              capture_output=True, text=True, check=True)  # fmt: skip
        grown, saved, real = (int(v) for v in done.stdout.split()[-3:])
        rows.append({"crop": length, "tokens": real, "peak_gib": grown / 2**30,
                     "kib_per_token": grown / real / 1024,
                     "saved_kib_per_token": saved / real / 1024})  # fmt: skip
        print(f"  crop {length:5d}: {real:6d} tokens, peak +{grown / 2**30:.2f} GiB, "
              f"{grown / real / 1024:8.1f} KiB per token; saved for backward "
              f"{saved / real / 1024:8.1f} KiB per token")  # fmt: skip
    return rows


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every alternating A/B bench here (this one and overlap_bench)."""
    parser.add_argument("--steps", type=int, default=3, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    add_compile_argument(parser)
    parser.add_argument("--json", type=Path, help="also write the result here (rank 0)")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", nargs="?", const="true", default="auto",
                        choices=["auto", "true", "false"],
                        help="esmdist's train.compile (default auto: on a GPU; --compile: true)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_8M", choices=list(MODEL_SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="real tokens per step")
    parser.add_argument(
        "--micro-tokens", type=int, help="esmdist's micro-batch (default: the step)"
    )
    parser.add_argument("--hf-micro-tokens", default="auto",
                        help="HF's largest padded micro-batch, or auto (the largest that fits)")  # fmt: skip
    add_timing_arguments(parser)
    parser.add_argument("--memory", action="store_true", help="peak memory vs crop length")
    parser.add_argument("--memory-at", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.memory_at:
        return peak_memory_at(args.model, device, dtype, args.memory_at, args.tokens,
                              args.activation_checkpointing, args.compile)  # fmt: skip
    if args.memory:
        print(f"{args.model} on {device}, {dtype}, {args.tokens} tokens per micro-batch, "
              f"activation checkpointing {args.activation_checkpointing}, compile {args.compile}:")  # fmt: skip
        rows = memory_table(args.model, device, dtype, args.tokens, args.activation_checkpointing,
                            args.compile)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return None
    result = against_hf(args, device, dtype)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return None


def against_hf(args: argparse.Namespace, device: torch.device, dtype: str) -> dict:
    """esmdist's steps and HF's (grouped and random) alternately; the medians and ratios."""
    from esmdist.metrics import batch_flops, peak_tflops

    micro = args.micro_tokens or args.tokens
    per_step = max(1, args.tokens // micro)
    torch.manual_seed(0)
    ours = Esmdist(args.model, device, dtype, micro, args.compile,
                   overrides=(f"--train.tokens_per_step={micro * per_step}",))  # fmt: skip
    theirs = HuggingFace(ours, device, dtype)
    batches = real_batches(micro, args.steps * per_step, seed=1)
    host = [b.pin_memory() if device.type == "cuda" else b for b in batches]
    our_steps = [host[i * per_step : (i + 1) * per_step] for i in range(args.steps)]
    real = sum(b.num_tokens for b in batches) / args.steps
    flops = sum(batch_flops(MODEL_SIZES[args.model], b.cu_seqlens.diff(),
                            int(b.selected.sum())) for b in batches) / args.steps  # fmt: skip
    runners = {ours.name: (ours.step, our_steps)}
    result = {"model": args.model, "device": str(device), "dtype": dtype, "real_tokens": real,
              "micro_tokens": micro, "compile": args.compile}  # fmt: skip
    for grouped, name in ((True, "HF grouped by length"), (False, "HF random batches")):
        start = int(args.hf_micro_tokens) if args.hf_micro_tokens != "auto" else 4 * args.tokens
        fitting, steps = largest_fitting(theirs, our_steps, grouped, start, device)
        padded = sum(t.numel() for step in steps for t, _ in step) / len(steps)
        result[name] = {"micro_tokens": fitting, "padded_tokens": padded}
        runners[name] = (theirs.step, steps)
        print(f"  {name}: micro-batches of at most {fitting:,} padded tokens, {padded:,.0f} "
              f"padded tokens per step for {real:,.0f} real")  # fmt: skip
    peak = peak_tflops(0.0, dtype, device)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for round_number in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for name, (step, data) in runners.items():
            took = timed_steps(step, data, device)
            if round_number:
                seconds[name].append(took)
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads), {dtype}, "
          f"{real:,.0f} real tokens per step, esmdist micro-batches of {micro:,}, compile "
          f"{args.compile}; {args.rounds} rounds of {args.steps} steps, medians:")  # fmt: skip
    for name, times in seconds.items():
        step = statistics.median(times)
        tflops = flops / step / 1e12
        mfu = f", MFU {tflops / peak:.1%}" if peak else ""
        print(f"  {name:<34} {1000 * step:8.1f} ms/step  {real / step:10,.0f} tokens/s  "
              f"{tflops:.4f} TFLOP/s{mfu}")  # fmt: skip
        result.setdefault(name, {}).update(step_s=step, tokens_per_s=real / step, tflops=tflops,
                                           mfu=tflops / peak if peak else None)  # fmt: skip
    for name in list(runners)[1:]:
        ratio = statistics.median(seconds[name]) / statistics.median(seconds[ours.name])
        result[name]["ratio"] = ratio
        print(f"esmdist vs {name}: {ratio:.2f}x")
    result["ratio"] = result["HF grouped by length"]["ratio"]
    return result


if __name__ == "__main__":
    main()

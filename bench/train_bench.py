"""Training steps of esmdist (packed) against Hugging Face `EsmForMaskedLM` (padded) on the same
real sequences, same weights, same optimizer and tokens per step, alternately in one process.

    python bench/train_bench.py --model esm2_8M --device cpu [--tokens 4096] [--rounds 5]
    python bench/train_bench.py --model esm2_650M --device cuda [--tokens 16384] [--compile]
    python bench/train_bench.py --memory --model esm2_8M [--tokens 8192]   # peak vs crop length

Batches: real sequences of data/demo_4k.fasta (UniRef-like lengths), cropped to 1,022 residues,
drawn until `--tokens` real tokens (with <cls>/<eos>) per step; 15% masked (80/10/10). esmdist
runs its engine's step (packed, masked positions only through the LM head); HF the same
sequences padded to the batch's longest with its `sdpa` attention and its own loss (labels
-100 off the masked positions), torch's fused AdamW with the same settings (as esmdist's
engine; HF Trainer's `adamw_torch_fused`). Each round times `--steps` optimizer steps of each
(device-synchronised; one warm-up round not counted); the median over rounds is reported. Tokens/s count real tokens; TFLOP/s and MFU use
esmdist.metrics' formula for both, so padding earns HF nothing.

`--memory`: esmdist's peak training memory per token at crop lengths 1,024 / 2,048 / 4,096 with
the same tokens per (packed) micro-batch: the longest bundled sequences cropped to the length,
each length in a fresh process (CPU: peak RSS above the process after its warm-up step at
the smallest batch; GPU: torch's peak allocated).
"""

from __future__ import annotations

import argparse
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

    def __init__(self, size: str, device: torch.device, dtype: str, tokens: int, compile: bool,
                 checkpointing: bool = False, info=None, overrides: tuple[str, ...] = ()):  # fmt: skip
        """One process (`single`) unless `info` (a DistInfo) and `overrides` (config keys, after
        these: the backend, tokens per step) say otherwise."""
        from esmdist.config import load_config
        from esmdist.parallel.distributed import DistInfo
        from esmdist.train import engine_for

        config = load_config(None, [f"--model.size={size}", "--parallel.backend=single",
                                    f"--train.dtype={dtype}", f"--data.max_tokens={tokens}",
                                    f"--train.tokens_per_step={tokens}",
                                    f"--train.compile={str(compile).lower()}",
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

    def step(self, batch) -> None:
        tokens, labels = batch
        with self.autocast:
            loss = self.model(input_ids=tokens, attention_mask=tokens.ne(alphabet.PAD),
                              labels=labels).loss  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def padded(batch: PackedBatch, device: torch.device):
    tokens, selected = batch.to_padded()
    labels = torch.full_like(tokens, -100)
    labels[selected] = batch.targets
    return tokens.to(device), labels.to(device)


def timed(runner, batches: list, device: torch.device) -> float:
    """Seconds per step over `batches`."""
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        runner.step(batch)
    synchronize(device)
    return (time.perf_counter() - start) / len(batches)


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
                   checkpointing: bool) -> None:  # fmt: skip
    """In this process: print (bytes of peak growth, tokens) of two steps at crop `length`."""
    import resource

    torch.manual_seed(0)
    ours = Esmdist(size, device, dtype, tokens, False, checkpointing)
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
                 checkpointing: bool) -> list[dict]:  # fmt: skip
    import subprocess

    rows = []
    for length in (1024, 2048, 4096):
        extra = ["--activation-checkpointing"] if checkpointing else []
        done = subprocess.run([sys.executable, __file__, "--model", size, "--device", str(device),
                               "--dtype", dtype, "--tokens", str(tokens), "--memory-at",
                               str(length), *extra], capture_output=True, text=True, check=True)  # fmt: skip
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
    parser.add_argument("--compile", action="store_true", help="esmdist's train.compile")
    parser.add_argument("--json", type=Path, help="also write the result here (rank 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_8M", choices=list(MODEL_SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="real tokens per step")
    add_timing_arguments(parser)
    parser.add_argument("--memory", action="store_true", help="peak memory vs crop length")
    parser.add_argument("--memory-at", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.memory_at:
        return peak_memory_at(args.model, device, dtype, args.memory_at, args.tokens,
                              args.activation_checkpointing)  # fmt: skip
    if args.memory:
        print(f"{args.model} on {device}, {dtype}, {args.tokens} tokens per micro-batch, "
              f"activation checkpointing {args.activation_checkpointing}:")  # fmt: skip
        rows = memory_table(args.model, device, dtype, args.tokens, args.activation_checkpointing)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return None
    from esmdist.metrics import batch_flops, peak_tflops

    torch.manual_seed(0)
    ours = Esmdist(args.model, device, dtype, args.tokens, args.compile)
    theirs = HuggingFace(ours, device, dtype)
    batches = real_batches(args.tokens, args.steps, seed=1)
    host = [b.pin_memory() if device.type == "cuda" else b for b in batches]
    hf_batches = [padded(b, device) for b in batches]
    real = sum(b.num_tokens for b in batches) / len(batches)
    pad = sum(t.numel() for t, _ in hf_batches) / len(hf_batches)
    flops = statistics.mean(batch_flops(MODEL_SIZES[args.model], b.cu_seqlens.diff(),
                                        int(b.selected.sum())) for b in batches)  # fmt: skip
    peak = peak_tflops(0.0, dtype, device)
    seconds: dict[str, list[float]] = {ours.name: [], theirs.name: []}
    for round_number in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for runner, data in ((ours, host), (theirs, hf_batches)):
            took = timed(runner, data, device)
            if round_number:
                seconds[runner.name].append(took)
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads), {dtype}, "
          f"{real:,.0f} real tokens per step ({pad:,.0f} padded for HF), {args.rounds} rounds "
          f"of {args.steps} steps, medians:")  # fmt: skip
    result = {"model": args.model, "device": str(device), "dtype": dtype, "real_tokens": real,
              "padded_tokens": pad, "compile": args.compile}  # fmt: skip
    for name, times in seconds.items():
        step = statistics.median(times)
        tflops = flops / step / 1e12
        mfu = f", MFU {tflops / peak:.1%}" if peak else ""
        print(f"  {name:<34} {1000 * step:8.1f} ms/step  {real / step:10,.0f} tokens/s  "
              f"{tflops:.4f} TFLOP/s{mfu}")  # fmt: skip
        result[name] = {"step_s": step, "tokens_per_s": real / step, "tflops": tflops,
                        "mfu": tflops / peak if peak else None}  # fmt: skip
    ratio = statistics.median(seconds[theirs.name]) / statistics.median(seconds[ours.name])
    per_round = [h / e for h, e in zip(seconds[theirs.name], seconds[ours.name], strict=True)]
    print(f"esmdist vs HF: {ratio:.2f}x (per round: {', '.join(f'{r:.2f}' for r in per_round)})")
    result["ratio"] = ratio
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

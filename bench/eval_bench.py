"""`esmdist eval embed` against a plain Hugging Face loop over the same sequences, same weights,
same run: tokens per second of mean representations.

The baseline is what an HF user writes: `EsmModel` on batches of a fixed number of sequences
in file order, padded to the batch's longest (the tokenizer's `padding=True`), mean over the
residues by the attention mask. esmdist batches by tokens, sorted by length.

    python bench/eval_bench.py [--size esm2_8M] [--sequences 1000] [--batch 8] [--repeats 2]

`--contacts-memory`: peak host memory of `eval contacts` on one real sequence cropped to
L = 1,024 and 2,048 (each in a fresh process: its peak RSS above the loaded model's), against
the size of one float32 attention stack, layers × heads × L² × 4 bytes — the explicit path
keeps every layer's maps for the regression, so the cost is quadratic in L by nature.

`--long`: peak host memory of `eval embed` on one sequence of L = 1,024, 4,096 and 10,000
residues (real sequences of the bundled set joined end to end), each in a fresh process: fused
attention, so linear in L.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from esmdist.data.fasta import read_fasta
from esmdist.eval.embed import embed_fasta
from esmdist.model import build_model, model_config
from esmdist.model.convert import save_hf

REPO = Path(__file__).resolve().parents[1]


def hf_loop(hf, records, batch: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf.name_or_path)
    with torch.no_grad():
        for start in range(0, len(records), batch):
            chunk = [r.sequence for r in records[start : start + batch]]
            inputs = tokenizer(chunk, return_tensors="pt", padding=True)
            hidden = hf(**inputs).last_hidden_state
            mask = inputs["attention_mask"].clone()
            mask[:, 0] = 0
            mask[torch.arange(len(chunk)), mask.sum(1)] = 0  # <eos> after the last residue
            (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def contacts_peak(size: str, length: int) -> None:
    """In this process: print the peak RSS growth (GiB) of contacts at `length` residues."""
    from esmdist.eval.contacts import predict_contacts

    sequence = max((r.sequence for r in read_fasta(str(REPO / "data" / "demo_4k.fasta"))), key=len)
    torch.manual_seed(0)
    model = build_model(model_config(size)).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predict_contacts(model, sequence[:length])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 2**20)


def embed_peak(size: str, length: int) -> None:
    """In this process: print the peak RSS growth (GiB) of embedding one `length`-residue
    sequence (mean and per-residue vectors of the last layer)."""
    from esmdist.eval.embed import embed_batch

    joined = "".join(r.sequence for r in read_fasta(str(REPO / "data" / "demo_4k.fasta")))
    torch.manual_seed(0)
    model = build_model(model_config(size)).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    embed_batch(model, [("long", joined[:length])], [model.config.num_layers], True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 2**20)


def long_memory(size: str) -> None:
    peaks = {}
    for length in (1024, 4096, 10000):
        done = subprocess.run([sys.executable, __file__, "--size", size, "--embed-at",
                               str(length)], capture_output=True, text=True, check=True)  # fmt: skip
        peaks[length] = float(done.stdout.split()[-1])
        print(f"{size} embed of one {length:,}-residue sequence: peak +{peaks[length]:.3f} GiB "
              f"({peaks[length] * 2**30 / length / 1024:.1f} KiB per residue)")  # fmt: skip


def contacts_memory(size: str) -> None:
    config = model_config(size)
    peaks = {}
    for length in (1024, 2048):
        done = subprocess.run([sys.executable, __file__, "--size", size, "--contacts-at",
                               str(length)], capture_output=True, text=True, check=True)  # fmt: skip
        peaks[length] = float(done.stdout.split()[-1])
        stack = config.num_layers * config.attention_heads * (length + 2) ** 2 * 4 / 2**30
        print(f"{size} contacts at L={length}: peak +{peaks[length]:.2f} GiB "
              f"({peaks[length] / stack:.1f}× one attention stack of {stack:.2f} GiB)")  # fmt: skip
    print(f"L 2,048 vs 1,024: {peaks[2048] / peaks[1024]:.2f}× the memory (quadratic: 4×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="esm2_8M")
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="sequences per HF batch")
    parser.add_argument("--max-tokens", type=int, default=8192, help="esmdist tokens per batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contacts-memory", action="store_true")
    parser.add_argument("--contacts-at", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--embed-at", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contacts_at:
        return contacts_peak(args.size, args.contacts_at)
    if args.contacts_memory:
        return contacts_memory(args.size)
    if args.embed_at:
        return embed_peak(args.size, args.embed_at)
    if args.long:
        return long_memory(args.size)
    from transformers import EsmModel

    records = list(read_fasta(str(REPO / "data" / "demo_4k.fasta")))[: args.sequences]
    residues = sum(len(r.sequence) for r in records)
    torch.manual_seed(0)
    model = build_model(model_config(args.size)).eval()
    with tempfile.TemporaryDirectory() as scratch:
        save_hf(model.state_dict(), model.config, Path(scratch) / "hf")
        hf = EsmModel.from_pretrained(Path(scratch) / "hf", add_pooling_layer=False).eval()
        print(f"{args.size}, {len(records)} sequences ({residues:,} residues), "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        for repeat in range(args.repeats):
            started = time.perf_counter()
            hf_loop(hf, records, args.batch)
            baseline = time.perf_counter() - started
            started = time.perf_counter()
            embed_fasta(model, records, str(Path(scratch) / "e.parquet"),
                        [model.config.num_layers], max_tokens=args.max_tokens)  # fmt: skip
            ours = time.perf_counter() - started
            print(f"run {repeat + 1}: HF loop {baseline:.1f} s ({residues / baseline:,.0f} "
                  f"residues/s), esmdist embed {ours:.1f} s ({residues / ours:,.0f} residues/s): "
                  f"{baseline / ours:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()

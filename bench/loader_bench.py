"""Data-loader throughput per worker process: tokens/s delivered as finished packed, masked
batches, against a plain `webdataset.WebDataset(urls).decode()` loop over the same shards; and
the same batches without the shard checks (size and sha256 against shards.parquet), to show
what verifying every shard as it is read costs.

    python bench/loader_bench.py [--mb 128] [--max-tokens 16384]

Both run in this one process (a DataLoader worker does exactly this work), in the same run.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

from make_fasta import bench_fasta, scratch_directory

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=128, help="FASTA size to shard (MB)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    import webdataset as wds

    from esmdist.data.order import OrderState
    from esmdist.data.stream import DataConfig, ShardCheck, ShardSet, slot_batches

    scratch = scratch_directory(args.dir, "loader-bench-")
    shards_dir = scratch / "shards"
    if not (shards_dir / "manifest.json").exists():
        fasta = bench_fasta(scratch / "bench.fasta.gz", args.mb)
        subprocess.run([sys.executable, "-m", "esmdist.cli", "shard", str(fasta), "--out",
                        str(shards_dir), "--workers", "2", "--shard-size", "16MB"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shards = ShardSet.from_directory(str(shards_dir), "train")

    start = time.perf_counter()
    baseline_tokens = 0
    for sample in wds.WebDataset(shards.urls, shardshuffle=False, empty_check=False).decode():
        lines = sample["fasta"].split(b"\n")
        baseline_tokens += len(lines[1]) + 2
    baseline = time.perf_counter() - start

    config = DataConfig(path=str(shards_dir), max_tokens=args.max_tokens, num_workers=0)
    unchecked = ShardSet(shards.urls, shards.sizes, shards.split,
                         [ShardCheck(c.samples) for c in shards.checks])  # fmt: skip

    def packed(shard_set) -> tuple[float, int, int]:
        start = time.perf_counter()
        tokens = batches = 0
        for item in slot_batches(shard_set, config, OrderState.fresh(0, 1), 0, epochs=1):
            tokens += item.batch.num_tokens
            batches += 1
        return time.perf_counter() - start, tokens, batches

    ours, tokens, batches = packed(shards)
    plain, _, _ = packed(unchecked)

    print(f"# {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"{len(shards.urls)} shards, {shards.total:,} samples, one process")  # fmt: skip
    print("| reader | seconds | tokens | tokens/s | × baseline |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `wds.WebDataset(urls).decode()` loop | {baseline:.2f} | {baseline_tokens:,} | "
          f"{baseline_tokens / baseline:,.0f} | 1.00 |")  # fmt: skip
    print(f"| esmdist packed+masked batches (crop 1024, {args.max_tokens} tokens) | {ours:.2f} | "
          f"{tokens:,} | {tokens / ours:,.0f} | {(tokens / ours) / (baseline_tokens / baseline):.2f} |")  # fmt: skip
    print(f"| the same without the size/sha256 shard checks | {plain:.2f} | {tokens:,} | "
          f"{tokens / plain:,.0f} | {(tokens / plain) / (baseline_tokens / baseline):.2f} |")  # fmt: skip
    print(f"({batches:,} batches; the shard checks cost {100 * (ours - plain) / plain:+.1f}% of "
          "the loader's time)")  # fmt: skip


if __name__ == "__main__":
    main()

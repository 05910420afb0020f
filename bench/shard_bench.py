"""Sharder throughput against `zcat` on the same gzip FASTA, in one run.

    python bench/shard_bench.py [--mb 1024] [--workers 1 2]

Generates a gzip FASTA from the bundled real sequences (bench/make_fasta.py), times
`zcat FILE > /dev/null`, then `esmdist shard` with each worker count, and prints MB/s of
uncompressed FASTA and the ratios: by wall time, and by CPU time (user + system of every
process the command ran: the per-process cost, whatever the number of processes). Record the
table in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from make_fasta import bench_fasta, scratch_directory

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], **kw) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, **kw)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1024, help="uncompressed FASTA size (MB)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    scratch = scratch_directory(args.dir, "shard-bench-")
    fasta = bench_fasta(scratch / "bench.fasta.gz", args.mb)
    size = int(subprocess.run(f"zcat {fasta} | wc -c", shell=True, check=True,
                              capture_output=True, text=True).stdout)  # fmt: skip
    with open("/dev/null", "wb") as null:
        zcat = timed(["zcat", str(fasta)], stdout=null)
    rows = [("zcat > /dev/null", zcat)]
    for workers in args.workers:
        out = scratch / f"out-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        seconds = timed([sys.executable, "-m", "esmdist.cli", "shard", str(fasta), "--out",
                         str(out), "--workers", str(workers)], stderr=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL)  # fmt: skip
        rows.append((f"esmdist shard --workers {workers}", seconds))
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, input {size / 1e6:,.0f} MB uncompressed "
          f"({fasta.stat().st_size / 1e6:,.0f} MB gz)")  # fmt: skip
    print("| command | seconds | CPU s | MB/s (uncompressed) | × zcat (wall) | × zcat (CPU) "
          "| × 1 worker |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    one = next((wall for name, (wall, _) in rows if name.endswith("--workers 1")), None)
    zcat_wall, zcat_cpu = zcat
    for name, (wall, cpu) in rows:
        vs_one = f"{one / wall:.2f}" if one and "shard" in name else ""
        print(f"| `{name}` | {wall:.1f} | {cpu:.1f} | {size / 1e6 / wall:,.1f} | "
              f"{zcat_wall / wall:.3f} | {zcat_cpu / cpu:.3f} | {vs_one} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Generate a large gzip FASTA from the bundled real sequences (records repeated with new ids),
for the benchmarks; and the benchmarks' scratch directory."""

from __future__ import annotations

import argparse
import atexit
import gzip
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def scratch_directory(given: Path | None, prefix: str) -> Path:
    """`given` (kept, so that a later run can reuse what is in it), or a temporary directory
    removed when the benchmark exits: a benchmark leaves no gigabytes behind."""
    scratch = Path(given or tempfile.mkdtemp(prefix=prefix))
    scratch.mkdir(parents=True, exist_ok=True)
    if given is None:
        atexit.register(shutil.rmtree, scratch, True)
    return scratch


def bench_fasta(path: Path, mb: float) -> Path:
    """`path`, written first unless a previous run left it there."""
    if not path.exists():
        write_fasta(path, mb)
    return path


def write_fasta(out: Path, mb: float, level: int = 6) -> None:
    records = []
    header, chunks = None, []
    for line in (REPO / "data" / "demo_4k.fasta").read_text().splitlines():
        if line.startswith(">"):
            if header:
                records.append((header, "".join(chunks)))
            header, chunks = line[1:], []
        else:
            chunks.append(line)
    records.append((header, "".join(chunks)))
    target = int(mb * 1e6)
    written = copy = 0
    with gzip.open(out, "wt", compresslevel=level) as handle:
        while written < target:
            for number, (name, seq) in enumerate(records):
                wrapped = "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))
                # UniParc-style ids, unique per copy and record.
                text = f">UPI{copy:05d}{number:05d} status=active src={name}\n{wrapped}\n"
                handle.write(text)
                written += len(text)
            copy += 1
    print(f"{out}: {written / 1e6:.0f} MB uncompressed, {out.stat().st_size / 1e6:.0f} MB gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mb", type=float, default=1024, help="uncompressed size to reach (MB)")
    parser.add_argument("--level", type=int, default=6, help="gzip level (6 = gzip's default)")
    args = parser.parse_args()
    write_fasta(args.out, args.mb, args.level)


if __name__ == "__main__":
    main()

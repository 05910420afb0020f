"""Generate a large gzip FASTA from the bundled real sequences (records repeated with new ids),
for the sharder benchmark."""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mb", type=float, default=1024, help="uncompressed size to reach (MB)")
    parser.add_argument("--level", type=int, default=6, help="gzip level (6 = gzip's default)")
    args = parser.parse_args()
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
    target = int(args.mb * 1e6)
    written = copy = 0
    with gzip.open(args.out, "wt", compresslevel=args.level) as out:
        while written < target:
            for number, (name, seq) in enumerate(records):
                wrapped = "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))
                # UniParc-style ids, unique per copy and record.
                text = f">UPI{copy:05d}{number:05d} status=active src={name}\n{wrapped}\n"
                out.write(text)
                written += len(text)
            copy += 1
    print(
        f"{args.out}: {written / 1e6:.0f} MB uncompressed, {args.out.stat().st_size / 1e6:.0f} MB gz"
    )


if __name__ == "__main__":
    main()

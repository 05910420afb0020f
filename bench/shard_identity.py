"""The sharder's output bytes for three real-data runs — plain, `--clusters`, `--dedupe` — as
one sha256 per file, to compare two versions of the code: a refactoring must print the same.

    PYTHONPATH=<tree> python bench/shard_identity.py --work DIR > <tree>.sha256
    diff before.sha256 after.sha256

The inputs (the bundled sequences, a few hundred repeated under new ids so that `--dedupe` has
work, and a cluster table grouping them by their first residues) are written to DIR/inputs
once and reused, so both versions read the very same files (the manifest records their
modification stamps).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "plain": [],
    "clusters": ["--clusters", "{inputs}/members.tsv"],
    "dedupe": ["--dedupe"],
}


def make_inputs(folder: Path) -> None:
    if (folder / "members.tsv").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    records, header, chunks = [], None, []
    for line in (REPO / "data" / "demo_4k.fasta").read_text().splitlines():
        if line.startswith(">"):
            if header:
                records.append((header.split()[0], "".join(chunks)))
            header, chunks = line[1:], []
        else:
            chunks.append(line)
    records.append((header.split()[0], "".join(chunks)))
    repeated = [(f"copy{n}", seq) for n, (_, seq) in enumerate(records[:300])]
    every = records + repeated
    (folder / "in.fasta").write_text("".join(f">{name}\n{seq}\n" for name, seq in every))
    ids = [name.split("|")[1] if name.startswith(("sp|", "tr|")) else name for name, _ in every]
    (folder / "members.tsv").write_text(
        "".join(f"c{seq[:2]}\t{i}\n" for i, (_, seq) in zip(ids, every, strict=True))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    inputs = args.work / "inputs"
    make_inputs(inputs)
    for name, extra in RUNS.items():
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "esmdist.cli", "shard", str(inputs / "in.fasta"),
                   "--out", str(out), "--workers", str(args.workers), "--shard-samples", "500",
                   "--split", "valid=0.05,test=0.02",
                   *(part.format(inputs=inputs) for part in extra)]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{digest}  {name}/{path.relative_to(out)}")


if __name__ == "__main__":
    main()

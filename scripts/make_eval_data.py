"""Regenerate data/eval/ (the bundled evaluation sets) from the shared data collection.

    python scripts/make_eval_data.py ../shared/data

Deterministic: the same collection gives the same files. Sources and licences: data/eval/README.md.
"""

from __future__ import annotations

import gzip
import random
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "eval"
FIT_STRUCTURES = 20
"""The first 20 Pfam domains (by Pfam id) fit the contact regression; the rest evaluate it."""
SS_TRAIN_CHAINS = 2000


def gzip_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as raw, gzip.GzipFile(target, "wb", 9, mtime=0) as packed:
        shutil.copyfileobj(raw, packed)


def structures(shared: Path) -> None:
    domains = sorted((shared / "structures" / "kortemme_pfam_domains").glob("PF*.pdb"))
    for index, path in enumerate(domains):
        split = "fit" if index < FIT_STRUCTURES else "test"
        gzip_copy(path, OUT / "structures" / split / f"{path.name}.gz")


def fasta(path: Path) -> dict[str, tuple[str, str]]:
    """id → (header, sequence)."""
    records, header, lines = {}, None, []
    for line in [*path.read_text().splitlines(), ">"]:
        if line.startswith(">"):
            if header is not None:
                records[header.split()[0]] = (header, "".join(lines))
            header, lines = line[1:], []
        else:
            lines.append(line.strip())
    return records


def secondary_structure(shared: Path) -> None:
    """CB513 as published (NetSurfP-2.0 CSV); a seeded sample of the NetSurfP-2.0 training
    chains (FLIP's train split, not its validation part) in the same CSV layout, 3-state."""
    ss = shared / "secondary_structure"
    gzip_copy(
        ss / "netsurfp_cb513_ts115" / "CB513_HHblits.csv", OUT / "ss" / "CB513_HHblits.csv.gz"
    )
    flip = ss / "flip_netsurfp2"
    sequences, labels, masks = (
        fasta(flip / f"{n}.fasta") for n in ("sequences", "sampled", "mask")
    )
    train = sorted(
        k for k, (h, _) in labels.items() if "SET=train" in h and "VALIDATION=False" in h
    )
    chosen = sorted(random.Random(0).sample(train, SS_TRAIN_CHAINS))
    with gzip.open(OUT / "ss" / "netsurfp2_train_2k.csv.gz", "wt", compresslevel=9) as out:
        out.write("id, input, dssp3, mask\n")
        for key in chosen:
            sequence, ss3, mask = sequences[key][1], labels[key][1], masks[key][1]
            assert len(sequence) == len(ss3) == len(mask), key
            out.write(f"{key}, {' '.join(sequence)}, {' '.join(ss3)}, {' '.join(mask)}\n")


def homology(shared: Path) -> None:
    source = shared / "remote_homology" / "deepsf_scop175_D1" / "Testdata_id40againstTrain.fasta"
    gzip_copy(source, OUT / "scop" / "scop175_id40.fasta.gz")


def main(shared: str) -> None:
    root = Path(shared)
    for build in (structures, secondary_structure, homology):
        build(root)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")

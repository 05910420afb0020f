"""What a sharding run shows: one progress line per stage, and the final report."""

from __future__ import annotations

import sys
import time


class Progress:
    """One status line: sequences/s and MB/s of uncompressed input."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.monotonic()
        self.last = 0.0
        self.bytes = 0
        self.records = 0
        self.tty = sys.stderr.isatty()

    def update(self, nbytes: int = 0, records: int = 0, force: bool = False) -> None:
        self.bytes += nbytes
        self.records += records
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 15.0):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"{self.label}: {self.records:,} sequences, {self.bytes / 1e6:,.1f} MB "
            f"({self.records / elapsed:,.0f} seq/s, {self.bytes / 1e6 / elapsed:,.1f} MB/s)"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)

    def finish(self) -> float:
        self.update(force=True)
        if self.tty:
            print(file=sys.stderr)
        return time.monotonic() - self.start


def format_report(manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        f"read {counts['records_read']:,} records → {counts['sequences']:,} sequences in "
        f"{counts['samples']:,} samples ({counts['residues']:,} residues)",
    ]
    for split, numbers in counts["splits"].items():
        lines.append(
            f"  {split:<6} {numbers['shards']:>5} shards {numbers['samples']:>12,} samples "
            f"{numbers['sequences']:>12,} sequences {numbers['residues']:>15,} residues"
        )
    for title, table in (("skipped", counts["skipped"]), ("normalised", counts["normalised"])):
        if table:
            lines.append(f"  {title}: " + ", ".join(f"{k}={v:,}" for k, v in table.items()))
    lines += empty_split_warnings(manifest)
    return "\n".join(lines)


def empty_split_warnings(manifest: dict) -> list[str]:
    """A held-out split asked for but without a sample (too small an input for its fraction)."""
    counts = manifest["counts"]["splits"]
    total = manifest["counts"]["samples"]
    return [f"warning: split '{name}' is empty: {fraction} of {total:,} samples rounds to none "
            f"by the split hash; raise its fraction (--split {name}=…) to hold samples out"
            for name, fraction in manifest["options"]["splits"]
            if fraction > 0 and not counts.get(name, {}).get("samples")]  # fmt: skip

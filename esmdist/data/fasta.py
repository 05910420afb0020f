"""Streaming FASTA reader with validation, for UniParc / UniProtKB / UniRef dumps.

Reads inputs (`esmdist.data.inputs`: plain, `.gz` or `.zst`, local or `s3://`, each to its
proper end of stream) in large blocks cut at record boundaries. The sharder parses a block as a whole into Arrow columns (`parse_block_table`: array
operations, no Python per record) when the block is regular — the case for UniParc/UniProt/
UniRef dumps — and falls back to the per-record parser (`parse_block`), which owns every
normalisation and error, for a block that is not. Every problem names the file, the record
number and the line.

What is normalised (and counted in the report) and what is a policy decision:
- CRLF line ends and blanks/tabs inside sequence lines are removed (`whitespace_removed`);
- lowercase residues are uppercased (`lowercase_uppercased`): soft-masking is not a different
  residue;
- one terminal `*` (a translated stop codon) is removed (`terminal_stop_removed`);
- characters outside the ESM alphabet, an internal `*` (`internal_stop`), digits, an empty
  sequence, a header that is not UTF-8, has no id (`>` alone, `> text`), an id that is not
  printable ASCII without whitespace (`RECORD_ID`) or holds control characters (NUL and the
  like): governed by `on_invalid` — `error` (default, raise
  FastaError), `skip` (drop the record and count the reason), `map-x` (replace the characters
  with `X`; the problems of the header or an empty sequence are still errors);
- `min_length`/`max_length` are filters the user asked for: records outside are counted
  (`too_short`/`too_long`), never errors.
The three together are a `ReadPolicy`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from esmdist import alphabet
from esmdist.data.inputs import FastaError, InputFile

if TYPE_CHECKING:
    import pyarrow as pa

OnInvalid = Literal["error", "skip", "map-x"]
BLOCK_BYTES = 8 << 20

_VALID = alphabet.RESIDUE_SYMBOLS.encode()
_WHITESPACE = b"\r \t\v\f"
_TO_X = bytes(c if c in _VALID else ord("X") for c in range(256))
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
RECORD_ID = re.compile(r"[!-~]+")
"""The id rule: printable ASCII, no whitespace — what the sharder writes (`>id` members), what
every reader accepts and what a cluster table's tab-separated columns can match."""
_UNIREF = re.compile(r"^(UniRef\d+_\S+)\s*(.*?)\s*((?:n|Tax|TaxID|RepID)=.*)?$")
_UNIREF_FIELD = re.compile(r"(n|Tax|TaxID|RepID)=(.*?)(?=\s+(?:n|Tax|TaxID|RepID)=|$)")
_UNIPROT_FIELD = re.compile(r"\b(OS|OX|GN|PE|SV)=(.*?)(?=\s+(?:OS|OX|GN|PE|SV)=|$)")


@dataclass(frozen=True)
class ReadPolicy:
    """What reading does with records that are not clean, and which lengths it keeps."""

    on_invalid: OnInvalid = "error"
    min_length: int = 1
    max_length: int | None = None


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str
    header: str
    fields: dict[str, str]
    number: int
    """1-based record number in its file."""
    line: int
    """Line number of the header."""


@dataclass
class ReadReport:
    """What reading did besides yielding records: counted skips and normalisations."""

    records: int = 0
    residues: int = 0
    skipped: Counter = field(default_factory=Counter)
    normalised: Counter = field(default_factory=Counter)

    def merge(self, other: ReadReport) -> None:
        self.records += other.records
        self.residues += other.residues
        self.skipped.update(other.skipped)
        self.normalised.update(other.normalised)

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "residues": self.residues,
            "skipped": dict(sorted(self.skipped.items())),
            "normalised": dict(sorted(self.normalised.items())),
        }


def parse_header(header: str) -> tuple[str, dict[str, str]]:
    """Record id and fields of a UniParc, UniProtKB, UniRef or other header (without '>')."""
    first, _, rest = header.partition(" ")
    if first.startswith(("sp|", "tr|")) and first.count("|") == 2:
        db, accession, entry = first.split("|")
        fields = {"db": db, "accession": accession, "entry": entry}
        description = _UNIPROT_FIELD.split(rest, maxsplit=1)[0].strip()
        fields["description"] = description
        fields.update(dict(_UNIPROT_FIELD.findall(rest)))
        return accession, fields
    uniref = _UNIREF.match(header) if first.startswith("UniRef") else None
    if uniref:
        fields = {"description": uniref.group(2)}
        fields.update(dict(_UNIREF_FIELD.findall(uniref.group(3) or "")))
        return uniref.group(1), fields
    if first.startswith("UPI"):
        return first, dict(re.findall(r"(\w+)=(\S+)", rest))
    return first, {"description": rest} if rest else {}


def record_blocks(path: str, handle: InputFile | None = None) -> Iterator[tuple[bytes, int]]:
    """(block, lines before it not in any block): the file's bytes cut at record boundaries,
    each block holding whole records and starting with '>'. Only the first block can follow
    such lines (blank lines at the top of the file)."""
    with handle or InputFile(path) as handle:
        pending = b""
        leading = 0
        started = False
        while True:
            chunk = handle.read_decompressed(BLOCK_BYTES)
            data = pending + chunk
            if not started:
                stripped = data.lstrip()
                if not stripped and chunk:
                    pending = b""
                    continue
                if not stripped:
                    raise FastaError(f"{path}: the input is empty (no FASTA records)")
                leading = data[: len(data) - len(stripped)].count(b"\n")
                if not stripped.startswith(b">"):
                    raise FastaError(
                        f"{path}: line {leading + 1}: text before the first '>' header "
                        f"({stripped[:40]!r}); is this a FASTA file?"
                    )
                data = stripped
                started = True
            if chunk:
                cut = data.rfind(b"\n>")
                if cut < 0:
                    pending = data
                    continue
                block, pending = data[: cut + 1], data[cut + 1 :]
            else:
                block, pending = data, b""
            if block:
                yield block, leading
                leading = 0
            if not chunk:
                return


def raw_blocks(path: str, handle: InputFile | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(block, first record number, first line number) for each block of `record_blocks`."""
    record, line = 1, 1
    for block, leading in record_blocks(path, handle):
        line += leading
        yield block, record, line
        record, line = record + block.count(b"\n>") + 1, line + block.count(b"\n")


class _BadHeader(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _checked_header(header_bytes: bytes) -> tuple[str, str, dict]:
    """(header, id, fields) of a header line without its '>', or _BadHeader: the header's
    problems cannot be mapped to X, only refused or skipped."""
    try:
        header = header_bytes.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadHeader("non_utf8_header", f"header is not UTF-8 ({exc.reason} at byte "
                         f"{exc.start}): {header_bytes[:60]!r}") from None  # fmt: skip
    control = _CONTROL.search(header)
    if control:
        raise _BadHeader("control_character_in_header", f"header has the control character "
                         f"{control.group()!r}: {header[:60]!r}")  # fmt: skip
    record_id, fields = parse_header(header)
    if not record_id:
        raise _BadHeader("empty_id", f"header {header[:60]!r} has no id (the text right after "
                         "'>')")  # fmt: skip
    if not RECORD_ID.fullmatch(record_id):
        raise _BadHeader("invalid_id", f"id {record_id[:60]!r} is not printable ASCII without "
                         "whitespace (the one id rule of shards, their readers and cluster "
                         "tables; --on-invalid skip drops such records)")  # fmt: skip
    return header, record_id, fields


def parse_block(
    path: str,
    block: bytes,
    first_record: int,
    first_line: int,
    policy: ReadPolicy = ReadPolicy(),
    report: ReadReport | None = None,
) -> Iterator[FastaRecord]:
    """Validate and yield the records of one block from `raw_blocks`."""
    report = report if report is not None else ReadReport()
    on_invalid, min_length, max_length = policy.on_invalid, policy.min_length, policy.max_length
    line = first_line
    for number, raw in enumerate(block[1:].split(b"\n>"), start=first_record):
        header_bytes, _, body = raw.partition(b"\n")
        header_line = line
        line += raw.count(b"\n") + 1

        def problem(
            reason: str, message: str, fixable: bool = True, number=number, line=header_line
        ) -> bool:
            """Raise, or count and tell the caller to skip; False means map to X."""
            if on_invalid == "skip":
                report.skipped[reason] += 1
                return True
            if on_invalid == "map-x" and fixable:
                return False
            hint = "" if not fixable else "; use --on-invalid skip or map-x to continue"
            raise FastaError(f"{path}: record {number} (line {line}): {message}{hint}")

        try:
            header, record_id, fields = _checked_header(header_bytes)
        except _BadHeader as bad:
            problem(bad.reason, str(bad), fixable=False)  # raises, or counts a skip
            continue
        seq = body.replace(b"\n", b"")
        if seq.translate(None, _WHITESPACE) != seq:
            seq = seq.translate(None, _WHITESPACE)
            report.normalised["whitespace_removed"] += 1
        upper = seq.upper()
        if upper != seq:
            seq = upper
            report.normalised["lowercase_uppercased"] += 1
        if seq.endswith(b"*"):
            seq = seq[:-1]
            report.normalised["terminal_stop_removed"] += 1
        if not seq and problem("empty_sequence", f"header '{record_id}' has no sequence", False):
            continue
        bad = seq.translate(None, _VALID)
        if bad:
            position = seq.index(bad[:1])
            reason = "internal_stop" if bad[:1] == b"*" else "invalid_character"
            message = (
                f"sequence '{record_id}' has {bad[:1].decode('latin-1')!r} at residue "
                f"{position + 1}, outside the ESM alphabet ({alphabet.RESIDUE_SYMBOLS})"
            )
            if problem(reason, message):
                continue
            seq = seq.translate(_TO_X)
            report.normalised["mapped_to_x"] += 1
        if len(seq) < min_length:
            report.skipped["too_short"] += 1
            continue
        if max_length is not None and len(seq) > max_length:
            report.skipped["too_long"] += 1
            continue
        report.records += 1
        report.residues += len(seq)
        yield FastaRecord(record_id, seq.decode("ascii"), header, fields, number, header_line)


def read_fasta(
    path: str,
    on_invalid: OnInvalid = "error",
    min_length: int = 1,
    max_length: int | None = None,
    report: ReadReport | None = None,
) -> Iterator[FastaRecord]:
    """Every valid record of `path`, in file order."""
    policy = ReadPolicy(on_invalid, min_length, max_length)
    for block, first_record, first_line in raw_blocks(str(path)):
        yield from parse_block(str(path), block, first_record, first_line, policy, report)


RECORD_COLUMNS = ("id", "sequence", "record")
# Header bytes the fast path accepts: printable ASCII. Anything else (tabs, other controls,
# non-UTF-8 or non-ASCII text) goes through `parse_header`'s exact rules in `parse_block`.
_PRINTABLE = bytes(range(0x20, 0x7F))
_UNIPROT_ID = r"^(?:sp|tr)\|[^|]*\|[^|]*$"


def parse_block_table(
    path: str,
    block: bytes,
    first_record: int,
    first_line: int,
    policy: ReadPolicy = ReadPolicy(),
    report: ReadReport | None = None,
) -> pa.Table:
    """The valid records of one block from `raw_blocks` as Arrow columns `RECORD_COLUMNS`
    (id, sequence, 1-based record number), the same records `parse_block` yields.

    A regular block — printable ASCII headers, sequences already uppercase and in the ESM
    alphabet, no CR/tab/blank/empty sequence — is parsed with array operations over the whole
    block; any other block goes through `parse_block`, which applies every normalisation,
    policy and error message."""
    import pyarrow as pa
    import pyarrow.compute as pc

    report = report if report is not None else ReadReport()
    table = _regular_block_table(block, first_record) if b"\r" not in block else None
    if table is None:
        records = list(parse_block(path, block, first_record, first_line, policy, report))
        return pa.table(
            {
                "id": pa.array([r.id for r in records], pa.string()),
                "sequence": pa.array([r.sequence for r in records], pa.string()),
                "record": pa.array([r.number for r in records], pa.int64()),
            }
        )
    lengths = pc.binary_length(table.column("sequence")).to_numpy()
    too_short = lengths < policy.min_length
    too_long = ~too_short & (
        lengths > policy.max_length if policy.max_length is not None else False
    )
    for reason, dropped in (("too_short", too_short), ("too_long", too_long)):
        if dropped.any():
            report.skipped[reason] += int(dropped.sum())
    keep = ~(too_short | too_long)
    if not keep.all():
        table = table.filter(pa.array(keep))
        lengths = lengths[keep]
    report.records += len(table)
    report.residues += int(lengths.sum())
    return table


def _regular_block_table(block: bytes, first_record: int) -> pa.Table | None:
    """`parse_block_table`'s fast path, or None when the block is not regular."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    if len(newlines) == 0 or newlines[-1] != len(block) - 1:
        return None  # the last record has no line end (or a header without sequence)
    line_starts = np.concatenate([[0], newlines[:-1] + 1])
    heads = line_starts[data[line_starts] == ord(">")]
    head_ends = newlines[np.searchsorted(newlines, heads)]
    # Coordinates in the block without its newlines: x minus the newlines before x.
    joined = block.replace(b"\n", b"")
    count = len(heads)
    # Alternating ">header", sequence elements cover `joined` end to end, so one offsets
    # array views both without copying.
    offsets = np.empty(2 * count + 1, dtype=np.int64)
    offsets[0:-1:2] = heads - np.searchsorted(newlines, heads)
    offsets[1::2] = head_ends - np.searchsorted(newlines, head_ends)
    offsets[-1] = len(joined)
    both = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 2 * count, [None, pa.py_buffer(offsets), pa.py_buffer(joined)]
    )
    # Without '>' (an explicit stop: pyarrow 26's default fails on some inputs).
    headers = pc.binary_slice(both.take(pa.array(np.arange(0, 2 * count, 2))), 1, 1 << 30)
    headers = headers.cast(pa.binary())
    sequences = both.take(pa.array(np.arange(1, 2 * count, 2))).cast(pa.binary())
    header_bytes = headers.buffers()[2]
    sequence_bytes = sequences.buffers()[2]
    if (
        (sequence_bytes is not None and sequence_bytes.to_pybytes().translate(None, _VALID))
        or (header_bytes is not None and header_bytes.to_pybytes().translate(None, _PRINTABLE))
        or pc.min(pc.binary_length(sequences)).as_py() == 0
    ):
        return None
    headers = headers.cast(pa.string())
    ids = pc.list_element(pc.split_pattern(headers, " ", max_splits=1), 0)
    uniprot = pc.match_substring_regex(ids, _UNIPROT_ID)
    if pc.any(uniprot).as_py():
        accessions = pc.list_element(pc.split_pattern(ids, "|"), 1)
        ids = pc.if_else(uniprot, accessions, ids)
    if pc.min(pc.binary_length(ids)).as_py() == 0:
        return None  # a record without id: the per-record parser words the problem
    return pa.table(
        {
            "id": ids,
            "sequence": sequences.cast(pa.string()),
            "record": pa.array(np.arange(first_record, first_record + count, dtype=np.int64)),
        }
    )

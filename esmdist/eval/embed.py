"""Sequence embeddings: per-sequence means of chosen layers' representations over the residues
(specials excluded, as fair-esm's `mean_representations`), optionally every residue's vector,
for a FASTA file of any size, read in chunks of `CHUNK` records: each chunk sorted by length into
padded batches of up to `max_tokens` tokens (little padding, and attention stays per sequence —
a packed batch's block-diagonal mask would make CPU attention quadratic in the batch), written to
parquet in the input order, chunk by chunk: never all held in memory.

ESM-1b sees at most 1,022 residues: longer sequences are cut to their first 1,022, as fair-esm's
`extract.py` does (`--truncation_seq_length`), and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from esmdist import alphabet
from esmdist.eval.offload import compute_device
from esmdist.storage import writing


@dataclass
class EmbedReport:
    sequences: int = 0
    truncated: int = 0


def resolve_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """Layer numbers as fair-esm takes them: 0 the embeddings, -1 the last layer."""
    resolved = []
    for layer in layers:
        number = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= number <= num_layers:
            raise ValueError(f"--layers {layer}: the model has layers 0–{num_layers}")
        resolved.append(number)
    return sorted(set(resolved))


CHUNK = 2048


def _chunks(records: Iterable, limit: int | None,
            report: EmbedReport) -> Iterator[list[tuple[str, str]]]:  # fmt: skip
    chunk = []
    for record in records:
        sequence = record.sequence
        if limit is not None and len(sequence) > limit:
            sequence, report.truncated = sequence[:limit], report.truncated + 1
        chunk.append((record.id, sequence))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _length_batches(chunk: list[tuple[str, str]], max_tokens: int) -> Iterator[list[int]]:
    """Indices into `chunk`, longest first, in batches whose padded size fits `max_tokens`."""
    order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i][1]))
    batch: list[int] = []
    for index in order:
        width = len(chunk[batch[0]][1]) + 2 if batch else len(chunk[index][1]) + 2
        if batch and (len(batch) + 1) * width > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


@torch.no_grad()
def embed_batch(model, batch: list[tuple[str, str]], layers: list[int],
                per_residue: bool) -> dict[str, list]:  # fmt: skip
    """Per-sequence vectors of one batch: mean_<layer> (and residues_<layer>)."""
    encoded = [alphabet.encode(sequence) for _, sequence in batch]
    tokens = np.full((len(encoded), max(len(e) for e in encoded)), alphabet.PAD, dtype=np.int64)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = ids
    out = model(torch.from_numpy(tokens).to(compute_device(model)), repr_layers=layers)
    columns: dict[str, list] = {}
    for layer in layers:
        hidden = out.representations[layer].float().cpu()
        residues = [hidden[row, 1 : len(sequence) + 1] for row, (_, sequence) in enumerate(batch)]
        columns[f"mean_{layer}"] = [r.mean(0).numpy() for r in residues]
        if per_residue:
            columns[f"residues_{layer}"] = [r.numpy() for r in residues]
    return columns


def _embed_chunk(model, chunk, layers, per_residue, max_tokens) -> dict[str, list]:
    """Columns of a chunk in its own order: id, length and the vectors."""
    found: dict[int, dict[str, np.ndarray]] = {}
    for indices in _length_batches(chunk, max_tokens):
        columns = embed_batch(model, [chunk[i] for i in indices], layers, per_residue)
        for position, index in enumerate(indices):
            found[index] = {name: values[position] for name, values in columns.items()}
    names = list(found[0])
    return {"id": [i for i, _ in chunk], "length": [len(s) for _, s in chunk],
            **{name: [found[i][name] for i in range(len(chunk))] for name in names}}  # fmt: skip


def _table(columns: dict[str, list], width: int) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if name.startswith("mean_"):
            arrays[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(values)), width
            )
        elif name.startswith("residues_"):
            flat = pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(values).ravel()), width
            )
            offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), flat)
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def embed_fasta(model, records: Iterable, out: str, layers: list[int], per_residue: bool = False,
                max_tokens: int = 16384) -> EmbedReport:  # fmt: skip
    """Write the embeddings of `records` to the parquet file `out` (one row per sequence)."""
    config = model.config
    limit = config.max_positions - 2 if config.arch == "esm1b" else None
    if limit is not None and max_tokens < limit + 2:
        raise ValueError(f"--max-tokens must be at least {limit + 2} for this model")
    report, writer = EmbedReport(), None
    partial = Path(f"{out}.partial")  # renamed when complete: `out` is never half-written
    try:
        for chunk in _chunks(records, limit, report):
            columns = _embed_chunk(model, chunk, layers, per_residue, max_tokens)
            table = _table(columns, config.embed_dim)
            with writing(partial):
                if writer is None:
                    writer = pq.ParquetWriter(partial, table.schema)
                writer.write_table(table)
            report.sequences += len(chunk)
    except BaseException:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    if writer is None:
        raise ValueError("no sequences to embed")
    with writing(partial):
        writer.close()
    partial.rename(out)
    return report


def residue_features(model, sequences: list[str], layer: int, max_tokens: int = 16384,
                     desc: str = "features") -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """(index, [L, D] float32 representations at `layer`) of every sequence, as its length-sorted
    batch finishes (so in no fixed order), with a progress bar. ESM-1b reads a sequence longer
    than its 1,022 residues as consecutive windows, joined."""
    from tqdm import tqdm

    config = model.config
    window = config.max_positions - 2 if config.arch == "esm1b" else None
    pieces = []  # (sequence index, text); a sequence's windows in order
    for index, sequence in enumerate(sequences):
        step = window or max(len(sequence), 1)
        pieces += [(index, sequence[start : start + step])
                   for start in range(0, max(len(sequence), 1), step)]  # fmt: skip
    left = np.bincount([index for index, _ in pieces], minlength=len(sequences))
    done: dict[int, dict[int, np.ndarray]] = {}
    batches = list(_length_batches([("", text) for _, text in pieces], max_tokens))
    for batch in tqdm(batches, desc=desc, unit="batch"):
        columns = embed_batch(model, [("", pieces[i][1]) for i in batch], [layer], True)
        for position, piece in enumerate(batch):
            index = pieces[piece][0]
            done.setdefault(index, {})[piece] = columns[f"residues_{layer}"][position]
            left[index] -= 1
            if left[index] == 0:
                parts = done.pop(index)
                yield index, np.concatenate([parts[k] for k in sorted(parts)])


def mean_embeddings(model, sequences: list[str], layer: int, max_tokens: int = 16384,
                    desc: str = "embeddings") -> np.ndarray:  # fmt: skip
    """[N, D] mean representation over each sequence's residues at `layer`."""
    means = np.zeros((len(sequences), model.config.embed_dim), dtype=np.float32)
    for index, residues in residue_features(model, sequences, layer, max_tokens, desc):
        means[index] = residues.mean(0)
    return means

"""Remote homology from embeddings, the ESM-1b paper's setting (its Table 2): every SCOP domain
of the set queries all the others by cosine similarity of mean embeddings; a hit at the
superfamily level is a neighbour of the same superfamily from another family, at the fold level
one of the same fold from another superfamily — neighbours in the query's own family
(superfamily level) or superfamily (fold level) are left out of its ranking. Reported: the
fraction of queries with a hit at rank 1 and within the top 10 ("Hit-1", "Hit-10"), over the
queries that have at least one possible hit at that level.

Labels come from ASTRAL / SCOPe FASTA headers (`>d1sctb_ a.1.1.2 (B:) …`: class.fold.
superfamily.family). Nearest neighbours by faiss-cpu when it is installed, numpy otherwise
(exact either way: an inner product over normalised vectors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SCCS = re.compile(r"^[a-l]\.\d+\.\d+\.\d+$")
LEVELS = {"superfamily": 3, "fold": 2}
"""level → how many parts of the sccs a hit shares (the part after it must differ)."""
TOP = 10


@dataclass(frozen=True)
class Domain:
    id: str
    sccs: str
    sequence: str


def read_scop_fasta(records, where: str) -> list[Domain]:
    """Domains of ASTRAL-style records; a header without an sccs is an error naming it."""
    domains = []
    for record in records:
        fields = record.header.split()
        if len(fields) < 2 or not SCCS.match(fields[1]):
            raise ValueError(f"{where}: record {record.id!r} has no SCOP class in its header "
                             f"(expected '>d1sctb_ a.1.1.2 …', got {record.header[:60]!r})")  # fmt: skip
        domains.append(Domain(record.id, fields[1], record.sequence))
    if len(domains) < 2:
        raise ValueError(f"{where}: needs at least two domains")
    return domains


def nearest(embeddings: np.ndarray, k: int) -> np.ndarray:
    """[N, k] indices of each row's nearest other rows by cosine, best first."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32)
    k = min(k + 1, len(unit))
    try:
        import faiss
    except ImportError:
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        order = np.argsort(-similarity, axis=1, kind="stable")[:, : k - 1]
        return order
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    _, found = index.search(unit, k)
    return np.array([[j for j in row if j != i][: k - 1] for i, row in enumerate(found)])


def _parts(sccs: str, depth: int) -> tuple[str, str]:
    parts = sccs.split(".")
    return ".".join(parts[:depth]), ".".join(parts[: depth + 1])


def hit_rates(domains: list[Domain], embeddings: np.ndarray) -> dict[str, float]:
    """`{level}_hit1`, `{level}_hit10` and `{level}_queries` for superfamily and fold."""
    # Leaving out same-family / same-superfamily neighbours means ranking deeper than 10.
    ranked = nearest(embeddings, len(domains) - 1)
    results: dict[str, float] = {}
    for level, depth in LEVELS.items():
        keys = [_parts(d.sccs, depth) for d in domains]
        hit1 = hit10 = queries = 0
        for query, (shared, own) in enumerate(keys):
            candidates = [j for j in ranked[query] if keys[j][1] != own]
            hits = [keys[j][0] == shared for j in candidates]
            if not any(hits):
                continue  # no domain of its superfamily / fold outside its family / superfamily
            queries += 1
            hit1 += hits[0]
            hit10 += any(hits[:TOP])
        results[f"{level}_hit1"] = hit1 / max(queries, 1)
        results[f"{level}_hit10"] = hit10 / max(queries, 1)
        results[f"{level}_queries"] = queries
    return results

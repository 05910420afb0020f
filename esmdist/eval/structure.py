"""One protein chain of a PDB, mmCIF or BinaryCIF file (biotite) as what contact evaluation
needs: its sequence and the true contact map.

The sequence is the chain's observed amino-acid residues in order (first model, first altloc,
insertion codes as their own residues, modified residues by their parent's letter: MSE → M);
a HETATM amino acid counts only when it is bonded into the chain (a free amino acid bound as
a ligand under the same chain id is not); residues absent from the coordinates are absent from
the sequence. (fair-esm's contact notebook takes the sequence from the MSA file instead, drops
MSE, and fails on a residue without CA.) Contacts are Cβ–Cβ < 8 Å with fair-esm's virtual Cβ for every residue (built
from N, CA and C, its notebook's `extend(C, N, CA, 1.522, 1.927, -2.143)`); a residue missing
one of those atoms has no contacts (-1: not scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONTACT_ANGSTROM = 8.0
PEPTIDE_BOND_ANGSTROM = 1.9
"""Covalent: a peptide bond is 1.33 Å; a ligand's closest approach (a hydrogen bond) ~2.6 Å."""


class StructureError(ValueError):
    """A structure file or chain that cannot be evaluated: names the file and chain."""


@dataclass(frozen=True)
class Chain:
    name: str
    """`file:chain`, for reports."""
    sequence: str
    contacts: np.ndarray
    """[L, L] int8: 1 contact, 0 none, -1 not scored (a residue without N, CA or C)."""


def extend(a: np.ndarray, b: np.ndarray, c: np.ndarray, length: float, angle: float,
           dihedral: float) -> np.ndarray:  # fmt: skip
    """The point at `length` from `c`, making `angle` with b–c and `dihedral` with a–b–c
    (fair-esm's notebook, for the virtual Cβ)."""

    def unit(x):
        return x / np.sqrt(np.square(x).sum(-1, keepdims=True) + 1e-8)

    bc = unit(b - c)
    n = unit(np.cross(b - a, bc))
    frame = [bc, np.cross(n, bc), n]
    offsets = [length * np.cos(angle), length * np.sin(angle) * np.cos(dihedral),
               -length * np.sin(angle) * np.sin(dihedral)]  # fmt: skip
    return c + sum(m * d for m, d in zip(frame, offsets, strict=True))


def virtual_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    return extend(c, n, ca, 1.522, 1.927, -2.143)


def contact_map(cb: np.ndarray) -> np.ndarray:
    distance = np.sqrt(np.square(cb[:, None] - cb[None]).sum(-1))
    contacts = (distance < CONTACT_ANGSTROM).astype(np.int8)
    missing = np.isnan(cb).any(-1)
    contacts[missing] = -1
    contacts[:, missing] = -1
    return contacts


def _atoms(path: Path):
    import gzip

    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    suffix = path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
    readers = {"pdb": lambda f: pdb.PDBFile.read(f).get_structure(model=1),
               "cif": lambda f: pdbx.get_structure(pdbx.CIFFile.read(f), model=1),
               "bcif": lambda f: pdbx.get_structure(pdbx.BinaryCIFFile.read(f), model=1)}  # fmt: skip
    readers["mmcif"] = readers["cif"]
    if suffix not in readers:
        raise StructureError(f"{path}: not a .pdb, .cif or .bcif file (optionally .gz)")
    mode = "rb" if suffix == "bcif" else "rt"
    try:
        with (gzip.open(path, mode) if path.name.lower().endswith(".gz")
              else open(path, mode)) as handle:  # fmt: skip
            return readers[suffix](handle)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise StructureError(f"{path}: cannot read the structure ({exc})") from None


def _bonded(a, b) -> bool:
    """Whether any atom of residue `a` is within covalent distance of any atom of `b`."""
    distances = np.linalg.norm(a.coord[:, None] - b.coord[None], axis=-1)
    return bool(distances.size) and float(distances.min()) < PEPTIDE_BOND_ANGSTROM


def _in_the_chain(residues: list) -> list:
    """The residues of the polymer: every ATOM residue, and a HETATM amino acid only where it
    is bonded to a neighbour in the chain (MSE, a chromophore), not a free amino acid bound as
    a ligand (a glutamate in its receptor, glycines in a pocket), which shares the chain id."""
    kept = [not residue.hetero[0] for residue in residues]
    changed = True
    while changed:  # a run of modified residues joins the chain from either end
        changed = False
        for index, residue in enumerate(residues):
            if kept[index]:
                continue
            neighbours = [j for j in (index - 1, index + 1) if 0 <= j < len(residues) and kept[j]]
            if any(_bonded(residue, residues[j]) for j in neighbours):
                kept[index] = changed = True
    return [residue for residue, keep in zip(residues, kept, strict=True) if keep]


def read_chain(path: str | Path, chain: str | None = None) -> Chain:
    """`chain` (author chain id; the first protein chain when None) of the structure file."""
    import biotite.structure as struc
    import biotite.structure.info as info

    path = Path(path)
    if not path.is_file():
        raise StructureError(f"{path}: no such structure file")
    atoms = _atoms(path)
    atoms = atoms[struc.filter_amino_acids(atoms)]
    chains = list(dict.fromkeys(atoms.chain_id.tolist()))
    if not chains:
        raise StructureError(f"{path}: no amino-acid residues")
    chain = chain or chains[0]
    if chain not in chains:
        raise StructureError(f"{path}: no protein chain {chain!r} (chains: {', '.join(chains)})")
    residues = _in_the_chain(list(struc.residue_iter(atoms[atoms.chain_id == chain])))
    letters, coordinates = [], np.full((len(residues), 3, 3), np.nan)
    for index, residue in enumerate(residues):
        code = info.one_letter_code(residue.res_name[0])
        # One letter per residue, as the contact map has one row per residue: a chromophore
        # made of three (NRQ: "MYG") or an unknown parent is X.
        letters.append(code if code and len(code) == 1 else "X")
        for slot, atom in enumerate(("N", "CA", "C")):
            found = residue.coord[residue.atom_name == atom]
            if len(found):
                coordinates[index, slot] = found[0]
    cb = virtual_cb(coordinates[:, 0], coordinates[:, 1], coordinates[:, 2])
    return Chain(f"{path.name}:{chain}", "".join(letters), contact_map(cb))


def read_structures(specs: list[str]) -> list[Chain]:
    """`FILE[:CHAIN]` arguments; a directory stands for every structure file in it, sorted."""
    chains = []
    for spec in specs:
        path, _, chain = spec.rpartition(":") if ":" in spec else (spec, "", "")
        if Path(path).is_dir():
            files = sorted(p for p in Path(path).iterdir() if ".pdb" in p.name or "cif" in p.name)
            if not files:
                raise StructureError(f"{path}: no .pdb/.cif/.bcif files in the directory")
            chains += [read_chain(f) for f in files]
        else:
            chains.append(read_chain(path, chain or None))
    return chains

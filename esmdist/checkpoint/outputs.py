"""The one check every command makes before it writes an output: that writing it cannot destroy
what the command reads or what a run has committed.

An output is refused when it is one of the command's inputs (`eval embed --out` equal to the
FASTA), when it lies inside a committed checkpoint (`export STEP --to hf STEP` would replace the
checkpoint's config.json: the run could no longer resume while `status` still said
"committed"), or when it lies in a checkpoint root — a directory holding committed step
directories — whose listing the trainer owns (pruning, resume) and in which a stray directory
would be taken for a checkpoint or deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from esmdist.checkpoint.manifest import COMMITTED, STEP_DIR


def _is_checkpoint_root(folder: Path) -> bool:
    try:
        children = list(os.scandir(folder))
    except OSError:
        return False
    return any(child.is_dir() and STEP_DIR.match(child.name) and
               (Path(child.path) / COMMITTED).is_file() for child in children)  # fmt: skip


def _same(path: str, other: str) -> bool:
    """Whether two paths name one file (URLs compared as text; local paths resolved, so that
    links and `..` do not hide an input)."""
    if "://" in path or "://" in other:
        return path.rstrip("/") == other.rstrip("/")
    return Path(path).resolve() == Path(other).resolve()


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                 option: str) -> None:  # fmt: skip
    """ValueError naming `option` if writing `out` could destroy an input (any of `inputs`;
    None entries skipped), a committed checkpoint or a checkpoint root's listing."""
    out = str(out)
    for given in inputs:
        if given is not None and str(given) and _same(out, str(given)):
            raise ValueError(f"{option} {out} is an input of this command ({given}): writing "
                             "it would destroy what is read; choose another path")  # fmt: skip
    if "://" in out:
        return
    resolved = Path(out).resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / COMMITTED).is_file():
            raise ValueError(f"{option} {out} lies inside the committed checkpoint {folder}: "
                             "writing there would break it (its files are checked against "
                             f"{COMMITTED}); choose a path outside it")  # fmt: skip
        if _is_checkpoint_root(folder):
            raise ValueError(f"{option} {out} lies inside the checkpoint root {folder}, whose "
                             "listing the trainer owns (resume, pruning); choose a path outside it")  # fmt: skip

"""DeepSpeed ZeRO checkpoint files: DeepSpeed reads them from a local directory only, so they
are checked in place or copied from object storage to node-local scratch, each against
COMMITTED's sha256, before DeepSpeed (always inside `torch_pickles_without_code`) opens one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from esmdist.checkpoint.manifest import CheckpointError
from esmdist.checkpoint.safe_load import torch_pickles_without_code
from esmdist.checkpoint.scratch import local_scratch, remove_scratch
from esmdist.collectives import gather_objects
from esmdist.storage import Digests

DEEPSPEED_TAG = "deepspeed"


@contextlib.contextmanager
def verified_local_copy(store, *parts: str, expected: Digests,
                        collective: bool = True) -> Iterator[str]:  # fmt: skip
    """A local directory holding `store/parts` (a CheckpointStore), every file checked against
    `expected`. `collective`: every rank of the process group calls this, and every rank learns
    every rank's failure before any goes on to DeepSpeed's collectives."""
    scratch = local_scratch(needed=sum(size for size, _ in expected.values()))
    problems = []
    try:
        try:
            copy_to = scratch if store.remote else None
            for name in store.files(*parts):
                store.check_file(expected, *parts, name, copy_to=copy_to)
        except CheckpointError as exc:
            problems.append(str(exc))
        if collective:
            problems = sorted({p for part in gather_objects(problems) for p in part})
        if problems:
            raise CheckpointError("; ".join(problems))
        yield str(scratch) if store.remote else store.path(*parts)
    finally:
        remove_scratch(scratch)


def zero_fp32_state(store, *parts: str, expected: Digests) -> dict:
    """The full fp32 parameters of a ZeRO checkpoint (any stage), consolidated on this process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with (
        verified_local_copy(store, *parts, expected=expected) as directory,
        torch_pickles_without_code(store.url_of(*parts)),
    ):
        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=DEEPSPEED_TAG)

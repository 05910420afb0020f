"""Checkpoints: the commit protocol (`checkpointer`), what a committed checkpoint is and how it
is checked (`manifest`), DCP files written hashed and read without running code (`dcp`),
DeepSpeed's pickles read the same way (`safe_load`), background uploads (`upload`), node-local
scratch (`scratch`), the one-run-per-root lock (`lock`) and the check that no command's output
destroys an input or committed state (`outputs`)."""

from esmdist.checkpoint.checkpointer import CheckpointConfig, Checkpointer
from esmdist.checkpoint.manifest import (
    COMMITTED,
    STEP_DIR,
    CheckpointError,
    CheckpointStore,
    Committed,
    open_checkpoint,
    step_name,
)
from esmdist.checkpoint.outputs import check_output
from esmdist.checkpoint.scratch import local_path, local_scratch, remove_scratch

__all__ = [
    "COMMITTED",
    "STEP_DIR",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointStore",
    "Checkpointer",
    "Committed",
    "check_output",
    "local_path",
    "local_scratch",
    "open_checkpoint",
    "remove_scratch",
    "step_name",
]

"""Where a run stands, read from what it left behind: the newest committed checkpoint, the final
export, and the stop marker of its last attempt. The Slurm job script asks this after the ranks
have exited, so that requeueing never depends on which rank's exit status `srun` reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from esmdist.checkpoint import CheckpointStore
from esmdist.config import JobConfig
from esmdist.export import FINAL_EXPORT

PREEMPTED_MARKER = "PREEMPTED"
"""Written by rank 0 in train.output_dir after a stop request's checkpoint is committed
("stopped after step N"); removed when the next attempt starts."""


@dataclass(frozen=True)
class RunStatus:
    root: str
    committed_step: int | None
    max_steps: int
    exported: bool
    stopped_at: int | None
    """The step the last attempt stopped after on request, if it did."""

    @property
    def finished(self) -> bool:
        return self.exported and self.committed_step == self.max_steps

    @property
    def stopped(self) -> bool:
        """The last attempt stopped on request and its checkpoint is the newest committed."""
        return self.stopped_at is not None and self.stopped_at == self.committed_step

    def describe(self) -> str:
        step = "none" if self.committed_step is None else str(self.committed_step)
        state = ("finished" if self.finished
                 else "stopped on request, checkpoint committed" if self.stopped
                 else "unfinished")  # fmt: skip
        return f"{self.root}: committed step {step} of {self.max_steps}; {state}"


def run_status(config: JobConfig) -> RunStatus:
    out = Path(config.train.output_dir)
    committed, _ = CheckpointStore(config.checkpoint_root, config.checkpoint.retries).steps()
    marker = out / PREEMPTED_MARKER
    stopped_at = None
    if marker.is_file():
        found = re.search(r"after step (\d+)", marker.read_text())
        stopped_at = int(found.group(1)) if found else None
    return RunStatus(
        root=config.checkpoint_root,
        committed_step=committed[-1] if committed else None,
        max_steps=config.train.max_steps,
        exported=(out / FINAL_EXPORT / "config.json").is_file(),
        stopped_at=stopped_at,
    )

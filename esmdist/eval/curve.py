"""The emergence curve: one evaluation run on every committed checkpoint of a training run, in
step order (`--checkpoints RUN_DIR` on `esmdist eval contacts`, `perplexity` and `ss-probe`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from esmdist.checkpoint import CheckpointStore, step_name


def checkpoint_root(run: str) -> CheckpointStore:
    """The checkpoint root of `run`: the directory itself when it holds `step_…` checkpoints,
    else its `checkpoints/` (a run's default checkpoint.root under train.output_dir)."""
    for candidate in (run, f"{run.rstrip('/')}/checkpoints"):
        store = CheckpointStore(candidate)
        if store.steps()[0]:
            return store
    raise FileNotFoundError(f"{run}: no committed checkpoints in it or in its checkpoints/ "
                            "(give the run's checkpoint.root)")  # fmt: skip


def committed_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, location) of every committed checkpoint of `run`, oldest first."""
    store = checkpoint_root(run)
    return [(step, store.url_of(step_name(step))) for step in store.steps()[0]]


def evaluate_checkpoints(run: str, load: Callable[[str], object],
                         evaluate: Callable[[object], dict]) -> Iterator[dict]:  # fmt: skip
    """`{"step": …, **evaluate(load(location))}` per committed checkpoint, oldest first."""
    for step, location in committed_checkpoints(run):
        print(f"checkpoint {location}")
        yield {"step": step, **evaluate(load(location))}

"""Checkpoint store logic without processes: listing, retention, retries."""

from __future__ import annotations

import pytest

from esmdist.checkpoint import (
    COMMITTED,
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    CheckpointStore,
)
from esmdist.storage import StorageError, Store


def make(root, step: int, committed: bool = True) -> None:
    folder = root / f"step_{step:09d}"
    (folder / "model_optim").mkdir(parents=True)
    (folder / "model_optim" / "__0_0.distcp").write_bytes(b"x")
    if committed:
        (folder / COMMITTED).write_text('{"files": {}}')


def test_retention_keeps_newest_and_every_mth(tmp_path):
    for step in range(100, 1100, 100):
        make(tmp_path, step)
    make(tmp_path, 650, committed=False)  # a killed save, older than the newest committed
    make(tmp_path, 1200, committed=False)  # a save in progress: newer, so left alone
    (tmp_path / "step_000000700" / "model_optim" / "__0_0.distcp").unlink()
    checkpointer = Checkpointer(CheckpointConfig(keep=2, keep_every=500), str(tmp_path))
    checkpointer.prune()
    committed, partial = CheckpointStore(str(tmp_path)).steps()
    assert committed == [500, 900, 1000]
    assert partial == [1200]


def test_latest_is_the_newest_committed(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, committed=False)
    (tmp_path / "not_a_step").mkdir()
    assert Checkpointer(CheckpointConfig(), str(tmp_path)).find() == "step_000000020"
    assert Checkpointer(CheckpointConfig(resume="none"), str(tmp_path)).find() is None
    assert Checkpointer(CheckpointConfig(), str(tmp_path / "empty")).find() is None


def test_transient_errors_are_retried_then_fail_loudly(tmp_path, monkeypatch):
    store = Store(str(tmp_path), retries=3)
    monkeypatch.setattr("esmdist.storage.time.sleep", lambda seconds: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert store.retry("writing x", flaky) == "ok" and len(calls) == 3
    with pytest.raises(StorageError, match="writing y: failed after 3 attempts"):
        store.retry("writing y", lambda: (_ for _ in ()).throw(TimeoutError("timed out")))


def test_uncommitted_checkpoint_is_refused(tmp_path):
    make(tmp_path, 5, committed=False)
    checkpointer = Checkpointer(
        CheckpointConfig(resume=str(tmp_path / "step_000000005")), str(tmp_path)
    )
    with pytest.raises(CheckpointError, match="not committed"):
        checkpointer.open(checkpointer.find())


def test_a_checkpoint_cannot_run_code(tmp_path):
    """DCP's `.metadata` is a pickle: one that names anything but DCP's own types is refused
    before it can run, even when COMMITTED vouches for it."""
    import hashlib
    import json
    import os
    import pickle

    import torch

    from esmdist.config import load_config
    from esmdist.parallel.distributed import DistInfo
    from esmdist.train import engine_for

    config = load_config(None, ["--model.size=debug", "--parallel.backend=single"])
    engine = engine_for(config, DistInfo(0, 1, 0, torch.device("cpu")))
    checkpointer = Checkpointer(CheckpointConfig(), str(tmp_path))
    state = {"step": 1, "schedule": engine.schedule.state_dict(), "world_size": 1}
    checkpointer.save(1, engine, state, {})
    genuine = checkpointer.open("step_000000001")
    checkpointer.load(genuine, engine)  # the genuine one loads
    assert genuine.json("train_state.json")["step"] == 1

    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    folder = tmp_path / "step_000000001"
    evil = pickle.dumps(Payload())
    (folder / "model_optim" / ".metadata").write_bytes(evil)
    manifest = json.loads((folder / COMMITTED).read_text())
    manifest["files"]["model_optim/.metadata"] = [len(evil), hashlib.sha256(evil).hexdigest()]
    (folder / COMMITTED).write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"\.metadata: refusing to unpickle (posix|os)\.system"
    ):
        checkpointer.load(checkpointer.open("step_000000001"), engine)
    assert not witness.exists()


def test_staging_goes_to_host_memory_and_orphans_are_removed(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from esmdist.checkpoint import local_scratch, remove_scratch

    memory = Path("/dev/shm")
    if not memory.is_dir():
        pytest.skip("no /dev/shm here")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    orphan = memory / f"esmdist-ckpt-{dead}-abc"
    orphan.mkdir()
    (orphan / "shard").write_bytes(b"x" * 1000)
    mine, unsized = local_scratch(needed=1000), local_scratch()
    try:
        assert mine.parent == memory and mine.name.startswith(f"esmdist-ckpt-{os.getpid()}-")
        assert not orphan.exists()
        assert unsized.parent != memory  # nothing said about its size: not in memory
    finally:
        remove_scratch(mine)
        remove_scratch(unsized)

"""Checkpoint store logic without processes: listing, retention, retries."""

from __future__ import annotations

import pytest

from esmdist.checkpoint import COMMITTED, CheckpointConfig, Checkpointer, CheckpointError, Store


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
    committed, partial = Store(str(tmp_path)).steps()
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
    monkeypatch.setattr("esmdist.checkpoint.time.sleep", lambda seconds: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert store.retry("writing x", flaky) == "ok" and len(calls) == 3
    with pytest.raises(CheckpointError, match="writing y: failed after 3 attempts"):
        store.retry("writing y", lambda: (_ for _ in ()).throw(TimeoutError("timed out")))


def test_uncommitted_checkpoint_is_refused(tmp_path):
    make(tmp_path, 5, committed=False)
    checkpointer = Checkpointer(
        CheckpointConfig(resume=str(tmp_path / "step_000000005")), str(tmp_path)
    )
    with pytest.raises(CheckpointError, match="not committed"):
        checkpointer.load(checkpointer.find(), engine=None)

"""Signals and deaths at the worst moments: SIGUSR1 while the launcher is still starting, Ctrl-C
(once, twice) while a checkpoint uploads in the background, SIGKILL of the trainer or of the
sharder's main process. Nothing may outlive its parent, and nothing staged may stay in
/dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esmdist.checkpoint import CheckpointStore
from tests.adversarial.faulty_s3 import FaultyS3
from tests.adversarial.helpers import (
    environment,
    handles_signal,
    has_mapped,
    launcher,
    processes_with,
    wait_until,
)
from tests.conftest import REPO

SHM = Path("/dev/shm")
UPLOADER = "esmdist.storage upload"


def staging_of(pid: int) -> list[Path]:
    return sorted(SHM.glob(f"esmdist-ckpt-{pid}-*")) if SHM.is_dir() else []


def test_sigusr1_during_start_up_is_a_stop_request(small_shards, tmp_path):
    """The handler is in place before torch is even imported: a preemption warning in the
    first seconds leads to a saved checkpoint and exit 75, not death by signal (138)."""
    process = subprocess.Popen(launcher(small_shards, tmp_path / "out", str(tmp_path / "root"),
                                        steps=50), cwd=REPO, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(lambda: handles_signal(process.pid, signal.SIGUSR1), 60,
               "the launcher installs its SIGUSR1 handler", process)  # fmt: skip
    assert not has_mapped(process.pid, "libtorch"), "the handler came only after torch loaded"
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-3000:]
    committed, _ = CheckpointStore(str(tmp_path / "root")).steps()
    assert committed == [1]


@pytest.fixture
def slow_s3(s3_server):
    """The test S3 server behind a proxy that holds every request 0.3 s: uploads take seconds."""
    proxy = FaultyS3(s3_server.endpoint).start()
    proxy.delay = 0.3
    fs = s3_server.filesystem()
    if not fs.exists("adversarial"):
        fs.mkdir("adversarial")
    yield proxy, environment(**{**s3_server.env(), "AWS_ENDPOINT_URL": proxy.endpoint})
    proxy.stop()


def start_uploading_run(small_shards, tmp_path, env, name: str) -> tuple[subprocess.Popen, list]:
    """A run with periodic background uploads to S3, caught while one is in flight: (process,
    its staging directories)."""
    root = f"s3://adversarial/{name}-{time.monotonic_ns()}"
    process = subprocess.Popen(launcher(small_shards, tmp_path / "out", root, steps=200),
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    staged = wait_until(lambda: processes_with(UPLOADER) and staging_of(process.pid), 300,
                        "a background upload starts", process)  # fmt: skip
    return process, staged


@pytest.mark.s3
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_background_upload(presses, slow_s3, small_shards, tmp_path):
    proxy, env = slow_s3
    process, staged = start_uploading_run(small_shards, tmp_path, env, f"ctrl-c-{presses}")
    for _ in range(presses):
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
    proxy.delay = 0.0  # caught in flight; the rest may go fast
    out, err = process.communicate(timeout=300)
    if presses == 1:  # stop after the step, wait for the upload, save, exit for requeue
        assert process.returncode == 75, err[-3000:]
        assert "stopping after this step and saving" in err
    else:  # abort: nothing saved, the upload abandoned
        assert process.returncode == 130, err[-3000:]
        assert "aborted by a second Ctrl-C" in err
    assert not staging_of(process.pid) and not any(path.exists() for path in staged)
    wait_until(lambda: not processes_with(str(staged[0])), 5, "the uploader exits")


@pytest.mark.s3
def test_an_uploader_does_not_outlive_a_killed_trainer(slow_s3, small_shards, tmp_path):
    proxy, env = slow_s3
    process, staged = start_uploading_run(small_shards, tmp_path, env, "kill-9")
    uploaders = processes_with(str(staged[0]))
    assert uploaders
    process.kill()
    process.communicate(timeout=60)
    wait_until(lambda: not processes_with(str(staged[0])), 10, "the orphaned uploader exits")
    wait_until(lambda: not any(path.exists() for path in staged), 10, "its staging is removed")


def big_fasta(path: Path, megabytes: int) -> Path:
    """Real sequences repeated under new ids (as bench/make_fasta.py does, uncompressed)."""
    from tests.conftest import DEMO_FASTA, read_fasta

    records = read_fasta(DEMO_FASTA)
    with open(path, "w") as out:
        written, copy = 0, 0
        while written < megabytes * 1_000_000:
            text = "".join(f">UPI{copy:05d}{n:05d}\n{seq}\n" for n, (_, seq) in enumerate(records))
            out.write(text)
            written += len(text)
            copy += 1
    return path


def test_a_killed_sharder_leaves_no_worker_and_no_lock(tmp_path):
    source = big_fasta(tmp_path / "big.fasta", 120)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "esmdist.cli", "shard", str(source), "--out", str(out),
           "--workers", "2"]  # fmt: skip
    main = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip

    def workers() -> list[int]:
        children = Path(f"/proc/{main.pid}/task/{main.pid}/children")
        return [int(c) for c in children.read_text().split()] if children.exists() else []

    running = wait_until(lambda: len(workers()) >= 2 and workers(), 120, "workers start", main)
    # Frozen, the first run holds its lock for as long as the test needs: on a fast machine it
    # could otherwise finish before the second run has imported esmdist. Its workers go on.
    os.kill(main.pid, signal.SIGSTOP)
    second = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert second.returncode == 2
    assert f"another esmdist shard (pid {main.pid}) is running on {out / '_work'}" in second.stderr
    os.kill(main.pid, signal.SIGKILL)
    main.communicate(timeout=60)

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
        except FileNotFoundError:
            return False

    wait_until(lambda: not any(alive(pid) for pid in running), 5, "every worker exits")
    from esmdist.shard.run import work_lock

    with work_lock(out / "_work"):  # the kernel released the dead run's lock
        pass

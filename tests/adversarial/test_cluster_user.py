"""What a real cluster user does wrong, or has done to them: the same job submitted twice on one
checkpoint root, a new run started in a root that holds another, a roll-back that retention
would undo, a disk that fills during a save, an object store that answers 503 for a while,
wrong credentials, a read-only root, and nonsense in the config."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from esmdist.checkpoint import CheckpointError, CheckpointStore
from esmdist.config import load_config
from esmdist.storage import StorageError
from esmdist.testing.s3server import SECRET_KEY
from esmdist.train import train
from tests.adversarial.faulty_s3 import FaultyS3
from tests.adversarial.helpers import environment, job, launcher, run, wait_until
from tests.conftest import REPO


def test_the_same_job_twice_on_one_root(small_shards, tmp_path):
    root = tmp_path / "root"
    first = subprocess.Popen(launcher(small_shards, tmp_path / "a", str(root), steps=60),
                             cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(lambda: (root / "LOCK").exists(), 120, "the first run takes the root", first)
    second = run(launcher(small_shards, tmp_path / "b", str(root), steps=60))
    assert second.returncode == 2
    assert f"{root}: in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not (root / "LOCK").exists()  # released at the end: the root can be resumed
    again = run(launcher(small_shards, tmp_path / "a", str(root), steps=62))
    assert again.returncode == 0 and "resumed from step_000000060" in again.stdout


def test_one_root_holds_one_run(trained, small_shards, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(trained, root)
    with pytest.raises(CheckpointError, match=r"holds checkpoints up to step_000000004, but this "
                                              "run starts fresh"):  # fmt: skip
        train(job(small_shards, tmp_path / "a", str(root), "--checkpoint.resume=none"))
    with pytest.raises(CheckpointError, match="but this run resumes from .*step_000000002"):
        train(job(small_shards, tmp_path / "b", str(root),
                  f"--checkpoint.resume={root}/step_000000002", steps=6))  # fmt: skip
    assert CheckpointStore(str(root)).steps() == ([2, 4], [])  # nothing was pruned or written
    # The newest checkpoint, however its path is spelled, is this root's own run: it continues.
    newest = f"{os.path.relpath(root)}/./step_000000004"
    train(job(small_shards, tmp_path / "c", str(root), f"--checkpoint.resume={newest}", steps=6))
    assert CheckpointStore(str(root)).steps() == ([2, 4, 6], [])


@contextlib.contextmanager
def small_filesystem(path, size: str):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                            "tmpfs", str(path)]).returncode:  # fmt: skip
        pytest.skip("needs root and mount(8) for a small filesystem")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_disk_that_fills_during_a_save(small_shards, tmp_path):
    """One checkpoint of the debug model (≈1.3 MB) fits a 2 MB filesystem, two do not."""
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        started = time.monotonic()
        with pytest.raises((CheckpointError, StorageError), match="No space left on device"):
            train(job(small_shards, tmp_path / "out", str(disk / "root"), steps=8))
        assert time.monotonic() - started < 60  # a full disk is not retried for minutes
        store = CheckpointStore(str(disk / "root"))
        committed, _ = store.steps()
        assert committed == [2]
        assert not (disk / "root" / "LOCK").exists()
        from esmdist.export import consolidated_weights

        consolidated_weights(str(disk / "root" / "step_000000002"))  # intact, verified


def test_a_read_only_root_fails_before_training(small_shards, tmp_path):
    with small_filesystem(tmp_path / "ro", "1m") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(StorageError, match="Read-only file system"):
            train(job(small_shards, tmp_path / "out", str(ro / "root")))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.s3
def test_an_object_store_answering_503_for_a_while(s3_server, s3_env, small_shards, tmp_path):
    proxy = FaultyS3(s3_server.endpoint).start()
    fs = s3_server.filesystem()
    if not fs.exists("adversarial-503"):
        fs.mkdir("adversarial-503")
    root = f"s3://adversarial-503/run-{time.monotonic_ns()}"
    env = environment(**{**s3_server.env(), "AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        process = subprocess.Popen(launcher(small_shards, tmp_path / "out", root, steps=16),
                                   cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        store = CheckpointStore(root)
        wait_until(lambda: store.exists("step_000000002", "COMMITTED"), 300, "a first commit",
                   process)  # fmt: skip
        proxy.fail_for(8)
        time.sleep(8)
        assert process.poll() is None, "the run did not live through the outage"
        out, err = process.communicate(timeout=600)
    finally:
        proxy.stop()
    assert proxy.refused > 0, "the outage was not felt: the test proves nothing"
    assert process.returncode == 0, err[-3000:]
    assert store.steps() == ([12, 14, 16], [])


@pytest.mark.s3
def test_wrong_credentials_for_the_checkpoint_root(s3_server, small_shards, tmp_path):
    fs = s3_server.filesystem()
    if not fs.exists("adversarial-creds"):
        fs.mkdir("adversarial-creds")
    env = environment(**s3_server.env(secret=SECRET_KEY + "-wrong"))
    done = run(launcher(small_shards, tmp_path / "out", "s3://adversarial-creds/run"), env)
    assert done.returncode == 2
    assert "s3://adversarial-creds/run" in done.stderr and "access denied" in done.stderr
    assert "AWS_SECRET_ACCESS_KEY" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("override, message", [
    ("--train.tokens_per_step=0", "train.tokens_per_step must be in [1, 17179869184], got 0"),
    ("--train.max_steps=-1", "train.max_steps must be in [1, 10000000000], got -1"),
    ("--train.max_steps=0", "train.max_steps must be in [1, 10000000000], got 0"),
    ("--optim.lr=nan", "optim.lr: expected a finite number, got 'nan'"),
    ("--optim.lr=-1e-3", "optim.lr must be in (0.0, 1.0], got -0.001"),
    ("--optim.warmup_steps=-5", "optim.warmup_steps must be in [0, 10000000000], got -5"),
    ("--checkpoint.keep=0", "checkpoint.keep must be in [1, 1000000], got 0"),
    ("--data.mask_probability=1.5", "data.mask_probability must be in (0.0, 1.0), got 1.5"),
    ("--train.log_every=true", "train.log_every: expected int, got 'true'"),
])  # fmt: skip
def test_nonsense_in_the_config_names_the_key(override, message):
    with pytest.raises(ValueError) as refused:
        load_config(REPO / "configs/debug-cpu.toml", [override])
    assert message in str(refused.value)

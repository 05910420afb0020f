"""Checkpoints against a real S3 server (SeaweedFS on 127.0.0.1) with real 2-rank training:
exact resume after kill -9, partial checkpoints, SIGUSR1, resharding, corruption, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esmdist.checkpoint import COMMITTED, CheckpointStore
from tests.checkpoints import tensors
from tests.conftest import REPO, make_shards
from tests.distributed import child_processes, free_port

pytestmark = pytest.mark.s3
STEPS = 16
EXTENSIONS = os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/esmdist/torch_extensions")
)
BACKENDS = {
    "ddp": ["--parallel.backend=ddp"],
    "fsdp": ["--parallel.backend=fsdp"],
    "zero2": ["--parallel.backend=deepspeed", "--parallel.zero_stage=2"],
    "zero3": ["--parallel.backend=deepspeed", "--parallel.zero_stage=3"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("ckpt"), demo_records[:1200], 150)


def command(shards, out, root, ranks=2, *extra) -> list[str]:
    args = [
        "--config", "configs/debug-cpu.toml", f"--data.path={shards}", "--data.num_workers=0",
        "--data.max_tokens=2048", "--data.crop_length=512", f"--train.max_steps={STEPS}",
        f"--train.tokens_per_step={2048 * ranks}", "--train.log_every=4", "--train.valid_every=0",
        f"--train.output_dir={out}", "--optim.warmup_steps=4", f"--checkpoint.root={root}",
        "--checkpoint.every=4", *extra,
    ]  # fmt: skip
    if ranks == 1:
        return [sys.executable, "launcher/pretrain.py", *args]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
            "launcher/pretrain.py", *args]  # fmt: skip


def environment(s3_server) -> dict[str, str]:
    return {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": EXTENSIONS}  # fmt: skip


def bucket(s3_server, name: str) -> tuple[dict[str, str], str]:
    """A fresh bucket on the test server: (environment for the runs, its s3:// URL)."""
    s3_server.filesystem().mkdir(name, exist_ok=True)
    return environment(s3_server), f"s3://{name}"


def run(cmd, env, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def wait_for(store: CheckpointStore, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while not store.exists(f"step_{step:09d}", COMMITTED):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def checkpoint_tensors(store: CheckpointStore, step: int, scratch: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a checkpoint, whatever wrote it (test code: trusted)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    local = scratch / f"step{step}-{time.monotonic_ns()}"
    store.download_dir(local, f"step_{step:09d}", "model_optim")
    if (local / ".metadata").exists():
        dcp_to_torch_save(str(local), str(local / "all.pt"))
        return dict(tensors(torch.load(local / "all.pt", weights_only=False)))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed pads each rank's partition of odd-sized parameters; the padding of its fp32
    # master copy is never written and holds whatever memory held. Compare the parameters
    # consolidated without padding, and every other tensor (Adam moments, step counts) as is.
    found = {f"param/{k}": v for k, v in get_fp32_state_dict_from_zero_checkpoint(
        str(local), tag="deepspeed").items()}  # fmt: skip
    for file in sorted(local.rglob("*.pt")):
        data = torch.load(file, weights_only=False)
        found.update({f"{file.name}{k}": v for k, v in tensors(data)
                      if "fp32_flat_groups" not in k and "frozen_param_fragments" not in k})  # fmt: skip
    return found


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_kill_9_then_resume_is_bitwise_exact(backend, shards, s3_server, s3_env, tmp_path):
    env, url = bucket(s3_server, f"ckpt-{backend}")
    extra = BACKENDS[backend]
    whole_root, cut_root = f"{url}/whole", f"{url}/cut"
    run(command(shards, tmp_path / "whole", whole_root, 2, *extra), env)

    process = subprocess.Popen(command(shards, tmp_path / "cut", cut_root, 2, *extra), cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    cut = CheckpointStore(cut_root)
    wait_for(cut, 8, process)
    os.kill(child_processes(process.pid, b"launcher/pretrain.py")[1], signal.SIGKILL)
    process.communicate(timeout=300)
    assert process.returncode != 0
    committed, _ = cut.steps()
    assert 8 in committed and STEPS not in committed

    resumed = run(command(shards, tmp_path / "cut", cut_root, 2, *extra), env)
    assert f"resumed from step_{max(committed):09d}" in resumed.stdout
    whole = checkpoint_tensors(CheckpointStore(whole_root), STEPS, tmp_path)
    again = checkpoint_tensors(cut, STEPS, tmp_path)
    assert whole.keys() == again.keys() and len(whole) > 20
    different = [k for k in whole if not torch.equal(whole[k], again[k])]
    assert not different, f"{backend}: not bitwise equal after resume: {different[:5]}"
    # The same run id continues: metrics.jsonl has every logged step once after the resume.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == STEPS


def test_partial_checkpoint_is_ignored_and_cleaned(shards, s3_server, s3_env, tmp_path):
    fs = s3_server.filesystem()
    env, url = bucket(s3_server, "ckpt-partial")
    root = f"{url}/run"
    first = command(shards, tmp_path / "a", root, 1, "--parallel.backend=single",
                    "--train.max_steps=8")  # fmt: skip
    run(first, env)
    store = CheckpointStore(root)
    # What a save killed before its marker leaves behind: every file but COMMITTED.
    fs.copy("ckpt-partial/run/step_000000008", "ckpt-partial/run/step_000000010", recursive=True)
    fs.rm("ckpt-partial/run/step_000000010/COMMITTED")
    assert store.steps() == ([4, 8], [10])
    done = run(command(shards, tmp_path / "a", root, 1, "--parallel.backend=single",
                       "--train.max_steps=12"), env)  # fmt: skip
    assert "resumed from step_000000008" in done.stdout
    assert store.steps() == ([4, 8, 12], []), "the partial step_000000010 was removed"


def test_sigusr1_saves_exits_75_and_resumes_exactly(shards, s3_server, s3_env, tmp_path):
    env, url = bucket(s3_server, "ckpt-signal")
    whole_root, cut_root = f"{url}/whole", f"{url}/cut"
    single = ["--parallel.backend=single", "--checkpoint.every=0"]
    run(command(shards, tmp_path / "whole", whole_root, 1, *single), env)
    process = subprocess.Popen(command(shards, tmp_path / "cut", cut_root, 1, *single), cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "cut/metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() or not metrics.read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 75, out[-2000:]
    assert (tmp_path / "cut/PREEMPTED").exists()
    cut = CheckpointStore(cut_root)
    (stopped,), _ = cut.steps()
    assert 4 <= stopped < STEPS
    run(command(shards, tmp_path / "cut", cut_root, 1, *single), env)
    whole = checkpoint_tensors(CheckpointStore(whole_root), STEPS, tmp_path)
    again = checkpoint_tensors(cut, STEPS, tmp_path)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_two_ranks_resume_on_one(shards, s3_server, s3_env, tmp_path, monkeypatch):
    from esmdist.eval import plot
    from esmdist.export import consolidated_weights

    env, url = bucket(s3_server, "ckpt-reshard")
    root = f"{url}/run"
    run(command(shards, tmp_path / "two", root, 2, "--parallel.backend=fsdp",
                "--train.max_steps=8"), env)  # fmt: skip
    _, saved = consolidated_weights(f"{root}/step_000000008")
    done = run(command(shards, tmp_path / "one", root, 1, "--parallel.backend=single",
                       "--train.max_steps=12", "--train.tokens_per_step=4096",
                       "--data.max_tokens=2048"), env)  # fmt: skip
    assert "resumed from step_000000008" in done.stdout
    # The change of shape is said, and written down: train_state.json and metrics.jsonl.
    change = "this resume changes the run's shape: world size 2 → 1, backend fsdp → single"
    assert change in done.stdout
    state = json.loads(CheckpointStore(root).read_bytes("step_000000012", "train_state.json"))
    assert [c["step"] for c in state["changes"]] == [8] and change in state["changes"][0]["change"]
    records = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 8 and change in records[0]["resume_change"]
    drawn = []
    monkeypatch.setattr(plot, "_save", lambda figure, out: drawn.append(figure) or out)
    plot.plot_run(tmp_path / "one")  # the marker at step 8 on every panel of the curves
    marked = [[list(line.get_xdata()) for line in axis.lines if line.get_linestyle() == ":"]
              for axis in drawn[0].axes]  # fmt: skip
    assert marked == [[[8, 8]]] * 4
    records = records[1:]
    assert records[0]["step"] == 12 and records[0]["loss"] < 3.3
    # Loading on one rank gave back the two-rank model exactly: resume again with no steps left
    # (into a root of its own: step_000000012 is newer in this one).
    same = run(command(shards, tmp_path / "check", f"{url}/check", 1, "--parallel.backend=single",
                       "--train.max_steps=8", "--checkpoint.resume=" + f"{root}/step_000000008",
                       "--train.tokens_per_step=4096"), env)  # fmt: skip
    assert "resumed from" in same.stdout
    from esmdist.model.convert import load_hf

    _, loaded = load_hf(tmp_path / "check/final")
    assert all(torch.allclose(loaded[k], saved[k], atol=1e-6) for k in saved)


def test_corrupted_or_truncated_files_are_named(shards, s3_server, s3_env, tmp_path):
    fs = s3_server.filesystem()
    env, url = bucket(s3_server, "ckpt-corrupt")
    root = f"{url}/run"
    run(command(shards, tmp_path / "a", root, 1, "--parallel.backend=single",
                "--train.max_steps=5"), env)  # fmt: skip
    shard = "ckpt-corrupt/run/step_000000005/model_optim/__0_0.distcp"
    data = bytearray(fs.cat(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(shard, bytes(data))
    again = command(
        shards, tmp_path / "a", root, 1, "--parallel.backend=single", "--train.max_steps=8"
    )
    done = run(again, env, check=False)
    assert done.returncode == 2
    assert "step_000000005/model_optim/__0_0.distcp: sha256 differs" in done.stderr
    fs.pipe(shard, bytes(data[:1000]))
    done = run(again, env, check=False)
    assert "__0_0.distcp: 1000 bytes" in done.stderr and "truncated" in done.stderr


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_export_consolidates_checkpoints(backend, shards, s3_server, s3_env, tmp_path):
    """`esmdist export CKPT --to hf|fair-esm` from sharded checkpoints in S3 (run above)."""
    from transformers import EsmForMaskedLM

    from esmdist.model.convert import load_hf

    env = environment(s3_server)
    root = f"s3://ckpt-{backend}/whole/step_{STEPS:09d}"
    if not CheckpointStore(root.rsplit("/", 1)[0]).exists(f"step_{STEPS:09d}", COMMITTED):
        pytest.skip("needs the kill -9 test's checkpoints")
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "esmdist.cli", "export", root, "--to", "hf", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    model = EsmForMaskedLM.from_pretrained(out)
    _, weights = load_hf(out)
    assert torch.equal(model.esm.embeddings.word_embeddings.weight, weights["embed_tokens.weight"])
    fair = tmp_path / "esm2_t2_export.pt"
    done = subprocess.run([sys.executable, "-m", "esmdist.cli", "export", root, "--to", "fair-esm",
                           str(fair)], cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert fair.exists() and fair.with_name("esm2_t2_export-contact-regression.pt").exists()


def test_training_survives_an_s3_restart(shards, s3_server, s3_env, tmp_path):
    from esmdist.export import consolidated_weights

    env, url = bucket(s3_server, "ckpt-restart")
    root = f"{url}/run"
    cmd = command(shards, tmp_path / "a", root, 1, "--parallel.backend=single",
                  "--checkpoint.every=2", "--checkpoint.keep=20", "--train.max_steps=24")  # fmt: skip
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    store = CheckpointStore(root)
    wait_for(store, 4, process)
    s3_server.stop()  # the server goes away in the middle of the next saves
    time.sleep(4)
    s3_server.start()
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-2000:] + err[-2000:]
    committed, partial = store.steps()
    assert committed == list(range(2, 25, 2)) and not partial
    for step in committed:
        consolidated_weights(f"{root}/step_{step:09d}")  # every file matches its sha256

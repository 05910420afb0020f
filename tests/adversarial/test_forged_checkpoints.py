"""Checkpoints rewritten by someone who can write the checkpoint root (COMMITTED is not signed,
so every forgery here re-vouches for itself): pickles that try to run code through every door
a checkpoint has, names that lead out of it, files added after the commit, a damaged marker.
Each is refused with an error naming the file, and nothing in it runs."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

from esmdist.checkpoint import COMMITTED, CheckpointError
from esmdist.checkpoint.dcp import METADATA_GLOBALS
from esmdist.export import consolidated_weights
from esmdist.train import train
from tests.adversarial.helpers import (
    copy_checkpoint_root,
    environment,
    job,
    launcher,
    revouch,
    run,
)
from tests.distributed import free_port

STEP = "step_000000004"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


class Payload:
    """What a forger pickles: unpickling it runs a shell command."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


def stack_global(module: str, name: str, command: str) -> bytes:
    """A protocol-4 pickle calling `module`.`name`(command), the name resolved by STACK_GLOBAL
    (dotted names walk attributes: `torch.distributed.checkpoint.metadata` + `os.system`)."""

    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(command) + b"\x85R."


@pytest.mark.parametrize("module", sorted({module for module, _ in METADATA_GLOBALS}))
def test_metadata_cannot_reach_os_through_an_allowed_module(module, trained, small_shards,
                                                            tmp_path):  # fmt: skip
    root = copy_checkpoint_root(trained, tmp_path / "root")
    witness = tmp_path / "ran"
    step = root / STEP
    payload = stack_global(module, "os.system", f"touch {witness}")
    (step / "model_optim" / ".metadata").write_bytes(payload)
    revouch(step)
    refused = rf"\.metadata: refusing to unpickle {re.escape(module)}\.os\.system"
    with pytest.raises(CheckpointError, match=refused):
        consolidated_weights(str(step))
    with pytest.raises(CheckpointError, match=refused):
        train(job(small_shards, tmp_path / "out", str(root), steps=6))
    assert not witness.exists()


def test_a_stored_value_cannot_run_code(trained, small_shards, tmp_path):
    """DCP keeps non-tensor values (the optimizer's lr, betas) as torch.save blobs, which its
    default planner loads with weights_only=False."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = copy_checkpoint_root(trained, tmp_path / "root")
    witness = tmp_path / "ran"
    folder = root / STEP / "model_optim"
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))  # fmt: skip
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(Payload(witness), blob)
    target = folder / info.relative_path
    data = target.read_bytes()
    target.write_bytes(data + blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=len(data),
                                                       length=len(blob.getvalue()))  # fmt: skip
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    revouch(root / STEP)
    with pytest.raises(CheckpointError, match=rf"refusing to unpickle the stored value {key}"):
        train(job(small_shards, tmp_path / "out", str(root), steps=6))
    assert not witness.exists()


@pytest.fixture(scope="module")
def zero_checkpoint(small_shards, tmp_path_factory):
    """A real DeepSpeed ZeRO-2 checkpoint (one rank under torchrun)."""
    base = tmp_path_factory.mktemp("zero")
    cmd = launcher(small_shards, base / "out", str(base / "root"), "--parallel.backend=deepspeed",
                   "--parallel.zero_stage=2", steps=2)  # fmt: skip
    cmd = [TORCHRUN, "--nproc_per_node", "1", "--master_port", str(free_port()), *cmd[1:]]
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    return base


def test_deepspeed_files_cannot_run_code(zero_checkpoint, small_shards, tmp_path):
    """DeepSpeed's own files are torch.save pickles that DeepSpeed (and zero_to_fp32) load with
    weights_only=False: esmdist reads them weights-only, on export and on resume."""
    root = copy_checkpoint_root(zero_checkpoint / "root", tmp_path / "root")
    witness = tmp_path / "ran"
    step = root / "step_000000002"
    target = step / "model_optim" / "deepspeed" / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)  # our own file: trusted
    state["buffer_names"] = Payload(witness)
    torch.save(state, target)
    revouch(step)
    done = run([sys.executable, "-m", "esmdist.cli", "export", str(step), "--to",
                "hf", str(tmp_path / "hf")])  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "mp_rank_00_model_states.pt" in done.stderr or "refusing to unpickle" in done.stderr
    assert "refusing to unpickle a DeepSpeed file" in done.stderr
    cmd = launcher(small_shards, tmp_path / "out", str(root), "--parallel.backend=deepspeed",
                   "--parallel.zero_stage=2", steps=4)  # fmt: skip
    done = run([TORCHRUN, "--nproc_per_node", "1", "--master_port", str(free_port()), *cmd[1:]],
               environment())  # fmt: skip
    assert done.returncode != 0
    assert "refusing to unpickle a DeepSpeed file" in done.stderr + done.stdout
    assert not witness.exists()


def test_names_in_committed_stay_inside_the_checkpoint(trained, tmp_path):
    root = copy_checkpoint_root(trained, tmp_path / "root")
    step = root / STEP
    manifest = json.loads((step / COMMITTED).read_text())
    manifest["files"]["../../outside"] = [3, "0" * 64]
    (step / COMMITTED).write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"'\.\./\.\./outside' is not a plain file name inside it"
    ):
        consolidated_weights(str(step))


def test_dcp_storage_names_stay_inside_the_checkpoint(trained, tmp_path):
    """From object storage each file DCP names is fetched into node-local scratch: a name like
    `../../x` would write outside it."""
    root = copy_checkpoint_root(trained, tmp_path / "root")
    folder = root / STEP / "model_optim"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = dataclasses.replace(metadata.storage_data[first],
                                                       relative_path="../../../tmp/planted")  # fmt: skip
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    revouch(root / STEP)
    with pytest.raises(
        CheckpointError, match=r"names the storage file '\.\./\.\./\.\./tmp/planted'"
    ):
        consolidated_weights(str(root / STEP))


def test_a_file_added_after_the_commit_is_named(trained, small_shards, tmp_path):
    root = copy_checkpoint_root(trained, tmp_path / "root")
    (root / STEP / "model_optim" / "__9_0.distcp").write_bytes(b"planted")
    with pytest.raises(
        CheckpointError, match=r"model_optim/__9_0\.distcp: not listed in COMMITTED"
    ):
        train(job(small_shards, tmp_path / "out", str(root), steps=6))


@pytest.mark.parametrize("marker", [b"{not json", b'{"files": {"a": [1]}}', b"\xff\xfe"])
def test_a_damaged_marker_is_named(marker, trained, small_shards, tmp_path):
    root = copy_checkpoint_root(trained, tmp_path / "root")
    (root / STEP / COMMITTED).write_bytes(marker)
    with pytest.raises(CheckpointError, match=rf"{STEP}/COMMITTED: "):
        train(job(small_shards, tmp_path / "out", str(root), steps=6))


def _drop_storage_entry(metadata) -> None:
    del metadata.storage_data[next(iter(metadata.storage_data))]


def _shift_offset(metadata) -> None:
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = dataclasses.replace(metadata.storage_data[first],
                                                       offset=10**12)  # fmt: skip


def _shrink_length(metadata) -> None:
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = dataclasses.replace(metadata.storage_data[first], length=3)


def _wrong_shape(metadata) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    name, entry = next((k, v) for k, v in metadata.state_dict_metadata.items()
                       if isinstance(v, TensorStorageMetadata))  # fmt: skip
    metadata.state_dict_metadata[name] = dataclasses.replace(entry, size=torch.Size([3, 3, 3]))


@pytest.mark.parametrize(
    "forge", [_drop_storage_entry, _shift_offset, _shrink_length, _wrong_shape]
)
def test_forged_dcp_metadata_fields_are_one_error_naming_the_checkpoint(forge, trained, small_shards,
                                                                        tmp_path):  # fmt: skip
    """Metadata that names entries its files do not hold, offsets past them, lengths or shapes
    that contradict them: a traceback (`KeyError: MetadataIndex(...)`) that named no file."""
    root = copy_checkpoint_root(trained, tmp_path / "root")
    folder = root / STEP / "model_optim"
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted
    forge(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    revouch(root / STEP)
    done = run(launcher(small_shards, tmp_path / "out", str(root), steps=6))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert str(root / STEP) in last, last

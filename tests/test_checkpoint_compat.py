"""A checkpoint written by an earlier esmdist (commit fa66926, before the structure change)
loads and resumes with this code: model and optimizer state restored bit for bit, the run
continuing at its step (tests/data/README.md says how the checkpoint was made)."""

from __future__ import annotations

import json
import shutil

import torch

from esmdist.checkpoint import Checkpointer
from esmdist.parallel.distributed import DistInfo
from esmdist.train import engine_for, train
from tests.adversarial.helpers import job
from tests.checkpoints import tensors
from tests.conftest import TEST_DATA, make_shards

FIXTURE = TEST_DATA / "checkpoint-fa66926"
SMALL = ("--model.overrides.num_layers=1", "--model.overrides.embed_dim=32",
         "--model.overrides.attention_heads=2")  # fmt: skip


def test_an_earlier_checkpoint_loads_bit_for_bit_and_resumes(demo_records, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    shards = make_shards(tmp_path, demo_records[:600], 100)  # the same shards, made again
    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)
    config = job(shards, tmp_path / "out", str(root), *SMALL, steps=6)
    engine = engine_for(config, DistInfo(0, 1, 0, torch.device("cpu")))
    checkpointer = Checkpointer(config.checkpoint, str(root))
    checkpointer.load(checkpointer.open("step_000000004"), engine)
    model, optim = get_state_dict(engine.model, engine.optimizer)
    loaded = dict(tensors({"model": model, "optim": optim}))
    dcp_to_torch_save(str(root / "step_000000004/model_optim"), str(tmp_path / "stored.pt"))
    stored = dict(tensors(torch.load(tmp_path / "stored.pt", weights_only=False)))  # ours
    assert loaded.keys() == stored.keys() and len(stored) > 10
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)

    train(config)
    steps = [json.loads(line)["step"] for line in (tmp_path / "out/metrics.jsonl").open()]
    assert steps == [5, 6]  # continued at step 5: the saved step, schedule and data position

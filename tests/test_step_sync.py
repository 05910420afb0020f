"""The training step without device→host reads (issue 16): the forward reads nothing back from
the device when it is handed the batch's host lengths and masked positions, and a non-finite
step is dropped on the device — on every rank, with the optimizer untouched — while the loop
reads each step's outcome a step late; under DeepSpeed, a non-finite loss stops every rank
before the update."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from esmdist.config import load_config
from esmdist.data.stream import ShardSet, TrainLoader
from esmdist.model import ESM, model_config
from tests.conftest import REPO, make_shards
from tests.distributed import run_ranks
from tests.test_train import overrides

STEPS, BAD_CALL = 12, 5  # two micro-batches per rank per step: call 5 is step 3's first


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("sync"), demo_records[:1000], 100)


def test_the_training_forward_reads_nothing_back_from_the_device(shards):
    """On the meta device every read of a tensor's values raises, so a forward and backward
    that run there read nothing back — what on a GPU would make the host wait for all the work
    queued before the read. The same forward given the packed lengths only on the device, or a
    boolean mask of the masked positions, does read (the controls)."""
    config = load_config(REPO / "configs/debug-cpu.toml", overrides(shards, "unused"))
    batch = next(iter(TrainLoader(ShardSet.open(str(shards), "train"), config.data)))
    with torch.device("meta"):
        model = ESM(model_config("debug"))
    meta = batch.to("meta")
    positions = batch.masked_positions("meta")
    lengths = batch.cu_seqlens.diff().tolist()

    logits = model(meta.tokens, meta.cu_seqlens, output_mask=positions, lengths=lengths).logits
    F.cross_entropy(logits.float(), meta.targets, reduction="sum").backward()
    assert logits.shape == (len(batch.targets), 33)
    trained = [(n, p) for n, p in model.named_parameters() if not n.startswith("contact_head")]
    assert all(p.grad is not None for _, p in trained)

    for reading in ({"output_mask": positions}, {"output_mask": meta.selected, "lengths": lengths}):
        with pytest.raises((RuntimeError, NotImplementedError)):
            model(meta.tokens, meta.cu_seqlens, **reading)


def run_with_one_bad_loss(rank: int, args: list[str]):
    """Training in which rank 1's loss is NaN in step 3's first micro-batch only."""
    import esmdist.train as train_module

    calls = 0

    def cross_entropy(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = F.cross_entropy(*args, **kwargs)
        return loss * float("nan") if rank == 1 and calls == BAD_CALL else loss

    train_module.F = types.SimpleNamespace(cross_entropy=cross_entropy)
    last, engine = train_module.train(load_config(REPO / "configs/debug-cpu.toml", args))
    adam_steps = {int(state["step"]) for state in engine.optimizer.state.values()}
    return last, adam_steps, engine.full_state_dict()


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_a_non_finite_loss_on_one_rank_drops_that_step_on_every_rank(shards, tmp_path, backend):
    args = overrides(shards, tmp_path / "out", **{"parallel.backend": backend,
                                                   "train.max_steps": STEPS, "train.log_every": 5,
                                                   "train.valid_every": 0})  # fmt: skip
    (last, steps, state), (last1, steps1, state1) = run_ranks(
        run_with_one_bad_loss, 2, tmp_path, args
    )
    # Both ranks counted one skipped step and went on learning from finite losses …
    assert last["skipped_steps"] == last1["skipped_steps"] == 1
    assert last["loss"] == last1["loss"] and last["loss"] < 3.5
    # … AdamW made one update fewer on every rank (the fused kernel left its step count too) …
    assert steps == steps1 == {STEPS - 1}
    # … and the ranks hold the same parameters.
    assert all(torch.equal(state[k], state1[k]) for k in state)
    # Step 3 was read a step late (steps 5, 10 and 12 are logged); so were its neighbours.
    log = (tmp_path / "out/metrics.jsonl").read_text()
    assert [json.loads(line)["skipped_steps"] for line in log.splitlines()] == [1, 1, 1]


def run_deepspeed_with_one_bad_loss(rank: int, args: list[str]) -> str:
    try:
        run_with_one_bad_loss(rank, args)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_under_deepspeed_a_non_finite_loss_stops_every_rank_before_the_update(shards, tmp_path):
    """DeepSpeed applies its optimizer inside the step's last backward, so the step's losses
    are agreed on before it (once per step, over their sum): both ranks stop at step 3 with
    the message, none hangs, and the last checkpoint is the one to resume from."""
    args = overrides(shards, tmp_path / "out", **{"parallel.backend": "deepspeed",
                                                   "parallel.zero_stage": 1,
                                                   "train.max_steps": STEPS,
                                                   "train.valid_every": 0})  # fmt: skip
    errors = run_ranks(run_deepspeed_with_one_bad_loss, 2, tmp_path, args)
    assert all("step 3: non-finite loss under deepspeed" in e for e in errors), errors

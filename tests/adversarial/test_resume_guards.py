"""Resumes that must not happen quietly: another model, another dataset or order, a hostile
or damaged train_state.json — each an error naming the key before any state is loaded — and
a learning rate that comes from the run's config, never from what the checkpoint says."""

from __future__ import annotations

import json
import math

import pytest

from esmdist.checkpoint import CheckpointError
from esmdist.train import train
from tests.adversarial.helpers import copy_checkpoint_root, edit_json, job, revouch

STEP = "step_000000004"


def test_a_smaller_model_does_not_load_partially(trained, small_shards, tmp_path):
    root = copy_checkpoint_root(trained, tmp_path / "root")
    smaller = job(small_shards, tmp_path / "out", str(root), "--model.overrides.num_layers=1",
                  "--model.overrides.attention_heads=8", steps=6)  # fmt: skip
    with pytest.raises(CheckpointError) as refused:
        train(smaller)
    message = str(refused.value)
    assert "model.num_layers: checkpoint 2, this run 1" in message
    assert "model.attention_heads: checkpoint 4, this run 8" in message
    assert not (tmp_path / "out" / "final").exists()


def test_unexpected_entries_fail_the_load_even_when_config_json_agrees(trained, small_shards,
                                                                       tmp_path):  # fmt: skip
    """A config.json forged to match the smaller run: the tensors of layer 1 are still stored,
    and DCP's load refuses entries this model does not have."""
    root = copy_checkpoint_root(trained, tmp_path / "root")
    edit_json(root / STEP / "config.json",
              lambda c: c["model"].update(overrides={"num_layers": 1}))  # fmt: skip
    revouch(root / STEP)
    smaller = job(small_shards, tmp_path / "out", str(root), "--model.overrides.num_layers=1",
                  steps=6)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"entr\(ies\) this run does not have.*layers\.1\."):
        train(smaller)


def test_another_dataset_or_order_is_refused(trained, small_shards, demo_records, tmp_path):
    from tests.conftest import make_shards

    root = copy_checkpoint_root(trained, tmp_path / "root")
    with pytest.raises(CheckpointError, match="data.seed: checkpoint 0, this run 7"):
        train(job(small_shards, tmp_path / "a", str(root), "--data.seed=7", steps=6))
    (tmp_path / "other").mkdir()
    other = make_shards(tmp_path / "other", demo_records[600:1200], 100)
    with pytest.raises(CheckpointError, match="data.path: the checkpoint was trained on another"):
        train(job(other, tmp_path / "b", str(root), steps=6))


HOSTILE = {
    "step far beyond any run": lambda s: s.update(step=1e30),
    "negative tokens": lambda s: s.update(tokens_seen=-5),
    "step as text": lambda s: s.update(step="4"),
    "a missing key": lambda s: s.pop("data"),
    "an unknown key": lambda s: s.update(extra=1),
    "more skipped steps than steps": lambda s: s.update(skipped_steps=9),
    "short RNG state": lambda s: s["rng"].update(cpu=[1, 2, 3]),
    "RNG values beyond a byte": lambda s: s["rng"]["cpu"].__setitem__(0, 300),
    "negative read count": lambda s: s["data"]["order"]["slots"][0].__setitem__(1, -1),
    "overlapping consumed intervals": lambda s: s["data"]["order"]["consumed"].update(
        {"0": [[0, 10], [5, 20]]}
    ),
    "a boolean world size": lambda s: s.update(world_size=True),
    "an unknown backend": lambda s: s.update(backend="horovod"),
    "changes not a list": lambda s: s.update(changes={"step": 2}),
    "a change after the checkpoint's step": lambda s: s.update(
        changes=[{"step": 9, "change": "world size 2 → 1"}]
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_train_state_is_an_error_naming_the_key(case, trained, small_shards, tmp_path):
    root = copy_checkpoint_root(trained, tmp_path / "root")
    edit_json(root / STEP / "train_state.json", HOSTILE[case])
    revouch(root / STEP)
    with pytest.raises(CheckpointError, match=rf"{STEP}/train_state\.json: "):
        train(job(small_shards, tmp_path / "out", str(root), steps=6))


def test_a_renamed_step_directory_is_refused(trained, small_shards, tmp_path):
    root = copy_checkpoint_root(trained, tmp_path / "root")
    (root / STEP).rename(root / "step_000000040")
    with pytest.raises(CheckpointError, match="train_state.json is of step 4, not of this"):
        train(job(small_shards, tmp_path / "out", str(root), steps=60))


def test_the_learning_rate_comes_from_the_config_not_the_checkpoint(trained, small_shards,
                                                                    tmp_path):  # fmt: skip
    """A schedule state saved by older esmdist versions (base learning rate 1e9 here) is not
    loaded: the resumed run's rates follow its own config — also a lowered optim.lr."""
    root = copy_checkpoint_root(trained, tmp_path / "root")
    edit_json(root / STEP / "train_state.json", lambda s: s.update(schedule={
        "base_lrs": [1e9], "last_epoch": 4, "_step_count": 5, "_last_lr": [1e9],
        "lr_lambdas": [None]}))  # fmt: skip
    revouch(root / STEP)
    out = tmp_path / "out"
    train(job(small_shards, out, str(root), "--optim.lr=1e-3", steps=6))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Warm-up 1, then linear decay from step 1 to 6 down to 0.1 of the peak: after step 5 the
    # factor is 1 - 0.9 * 4/5; after step 6, 0.1.
    rates = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert math.isclose(rates[5], 1e-3 * (1 - 0.9 * 4 / 5), rel_tol=1e-12)
    assert math.isclose(rates[6], 1e-3 * 0.1, rel_tol=1e-12)

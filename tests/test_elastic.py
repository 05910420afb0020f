"""Elastic resume: a checkpoint written by any engine (single, DDP, FSDP2, DeepSpeed ZeRO-1/2/3)
on one world size continues under any other engine on another world size, with real processes
(gloo). Each source trains two steps from one seed and saves through the checkpointer; each
target, built from another seed, loads it through the path a resume takes, then takes the
third step on the same global batch, split among its own ranks.

Checked: the fp32 parameters (master weights) after the load equal the saved ones bit for bit,
and the third step's update (which depends on the carried Adam moments and step count) equals
the uninterrupted source's to 1e-5 of the update's norm in fp32 (measured ≤ 1.3e-6: gradient
reductions in another order), and to 5e-2 where either side computes in bf16 (measured
0.9–1.6e-2: bf16 arithmetic). The same load with the step count lost is 0.58 away."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from esmdist import alphabet
from esmdist.config import load_config
from esmdist.data.batch import MaskingConfig, pack, with_specials
from esmdist.data.order import OrderState
from esmdist.train_state import TrainState, needs_conversion, rng_state
from tests.conftest import DEMO_FASTA, REPO, read_fasta
from tests.distributed import run_ranks

EXTENSIONS = os.environ.get(
    "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/esmdist/torch_extensions")
)
ENGINES = {
    "single": {"parallel.backend": "single"},
    "ddp": {"parallel.backend": "ddp"},
    "fsdp": {"parallel.backend": "fsdp"},
    "zero1": {"parallel.backend": "deepspeed", "parallel.zero_stage": 1},
    "zero2": {"parallel.backend": "deepspeed", "parallel.zero_stage": 2},
    "zero3": {"parallel.backend": "deepspeed", "parallel.zero_stage": 3},
    "zero2_bf16": {
        "parallel.backend": "deepspeed",
        "parallel.zero_stage": 2,
        "train.dtype": "bf16",
    },
}
SEQUENCES_PER_STEP = 6
TOLERANCE = 1e-5
BF16_TOLERANCE = 5e-2


def config(engine: str, world: int, seed: int):
    overrides = {**ENGINES[engine], "data.max_tokens": 1024, "train.seed": seed,
                 "train.tokens_per_step": 1024 * world, "train.compile": False}  # fmt: skip
    return load_config(REPO / "configs/debug-cpu.toml",
                       [f"--{k}={v}" for k, v in overrides.items()])  # fmt: skip


def global_batch(step: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The step's sequences (real proteins) with their own mask draws: the same masked tokens
    however the batch is split among ranks."""
    records = read_fasta(DEMO_FASTA)[step * SEQUENCES_PER_STEP : (step + 1) * SEQUENCES_PER_STEP]
    batch = []
    for index, (_, sequence) in enumerate(records):
        tokens = with_specials(alphabet.encode_residues(sequence[:120]))
        draws = np.random.default_rng(1000 * step + index).random((3, len(tokens)))
        batch.append((tokens, draws))
    return batch


def take_step(engine, info, step: int) -> None:
    from esmdist.train import masked_lm_loss

    whole = global_batch(step)
    masked = sum(len(pack([t], MaskingConfig(), d).targets) for t, d in whole)
    mine = whole[info.rank :: info.world_size]
    batch = pack([t for t, _ in mine], MaskingConfig(), np.concatenate([d for _, d in mine], 1))
    loss = masked_lm_loss(engine, batch, info.device)
    engine.backward(loss * (info.world_size / masked), last=True)
    engine.step()


def full_params(engine) -> dict[str, torch.Tensor]:
    """The whole model with the fp32 master weights (DeepSpeed's module holds bf16 copies)."""
    state = {k: v.float().clone() for k, v in engine.full_state_dict().items()}
    if engine.checkpoint_format == "files":
        from deepspeed.utils import safe_get_full_fp32_param

        state.update({n: safe_get_full_fp32_param(p).clone()
                      for n, p in engine.module.named_parameters() if p.requires_grad})  # fmt: skip
    return state


def save_sources(rank: int, names: list[str], base: str) -> dict:
    """For each engine: two steps from seed 1, a checkpoint of step 2 under `base/name`; the
    parameters then and after step 3."""
    from esmdist.checkpoint import CheckpointConfig, Checkpointer
    from esmdist.parallel import init_distributed
    from esmdist.train import engine_for

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)
    world = int(os.environ["WORLD_SIZE"])
    info = init_distributed("single" if names == ["single"] else "deepspeed")
    found = {}
    for name in names:
        run = config(name, world, seed=1)
        engine = engine_for(run, info)
        for step in range(2):
            take_step(engine, info, step)
        saved = full_params(engine)
        root = f"{base}/{name}"
        checkpointer = Checkpointer(CheckpointConfig(root=root), root)
        checkpointer.begin(None)
        order = {"order": OrderState.fresh(run.data.seed, world).to_dict(),
                 "rotations": [0] * world}  # fmt: skip
        state = TrainState(2, 0, 0, order, rng_state(), world, run.parallel.backend)
        checkpointer.save(2, engine, state.to_dict(), run.to_dict())
        checkpointer.close()
        take_step(engine, info, 2)
        found[name] = (root, world, saved, full_params(engine))
    return found


def resume_all(rank: int, sources: dict[str, str], targets: list[str]):
    """Every target engine from seed 2, loaded from every source checkpoint, then step 3."""
    from esmdist.checkpoint import CheckpointConfig, Checkpointer
    from esmdist.optim import set_schedule_step
    from esmdist.parallel import init_distributed
    from esmdist.train import engine_for

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)
    world = int(os.environ["WORLD_SIZE"])
    info = init_distributed("deepspeed" if any("zero" in t for t in targets) else "ddp")
    results = {}
    for source, root in sources.items():
        checkpointer = Checkpointer(CheckpointConfig(root=root), root)
        checkpoint = checkpointer.open("step_000000002")
        saved = checkpoint.json("config.json")
        for target in targets:
            run = config(target, world, seed=2)
            engine = engine_for(run, info)
            state = TrainState.from_dict(checkpoint.json("train_state.json"), checkpoint.url)
            convert = needs_conversion(state, saved, run, world)
            checkpointer.load(checkpoint, engine, convert=convert)
            set_schedule_step(engine.schedule, 2, run.optim.lr)
            loaded = full_params(engine)
            take_step(engine, info, 2)
            results[source, target] = (convert, loaded, full_params(engine))
    return results


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name → (checkpoint root, world size, parameters at step 2, after step 3)."""
    base = tmp_path_factory.mktemp("elastic")
    found = run_ranks(save_sources, 1, base, ["single"], str(base))[0]
    found.update(run_ranks(save_sources, 2, base, [n for n in ENGINES if n != "single"],
                           str(base))[0])  # fmt: skip
    return found


def _check(results, sources):
    for (source, target), (_, loaded, after) in results.items():
        _, _, saved, reference = sources[source]
        assert loaded.keys() == saved.keys()
        # Frozen weights (the contact head, fitted after pretraining) have no fp32 master:
        # DeepSpeed in bf16 holds them in bf16.
        expected = {k: v.bfloat16().float() if "bf16" in target and k.startswith("contact_head.")
                    else v for k, v in saved.items()}  # fmt: skip
        different = [k for k in saved if not torch.equal(expected[k], loaded[k])]
        assert not different, (
            f"{source} → {target}: parameters differ after the load: {different[:3]}"
        )
        update = torch.cat([(reference[k] - saved[k]).flatten() for k in saved])
        off = torch.cat([(after[k] - reference[k]).flatten() for k in saved])
        assert update.norm() > 0
        # A bf16 side computes its step in bf16: the update agrees to bf16's precision.
        tolerance = BF16_TOLERANCE if "bf16" in source + target else TOLERANCE
        assert off.norm() <= tolerance * update.norm(), (
            f"{source} → {target}: the next update is off by "
            f"{(off.norm() / update.norm()).item():.2e} of its norm"
        )


def test_every_engine_resumes_on_three_ranks_under_every_other(sources, tmp_path):
    targets = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_bf16"]
    wanted = {name: sources[name][0] for name in sources}
    results = run_ranks(resume_all, 3, tmp_path, wanted, targets)[0]
    _check(results, sources)
    # The engine's own reader where it can: DCP onto DCP engines, never DeepSpeed onto another
    # world size.
    assert not results["ddp", "fsdp"][0] and not results["single", "ddp"][0]
    assert all(results[s, t][0] for s in ["zero1", "zero2", "zero3", "zero2_bf16"] for t in targets)


def test_every_engine_resumes_on_one_process(sources, tmp_path):
    wanted = {name: sources[name][0] for name in sources}
    results = run_ranks(resume_all, 1, tmp_path, wanted, ["single"])[0]
    _check(results, sources)


def test_convert_ahead_of_time(sources, tmp_path, capsys):
    """`esmdist convert` writes what the target engine itself writes: its own reader takes it
    back (no conversion at the resume), to the same parameters and next update."""
    from esmdist.checkpoint import open_checkpoint
    from esmdist.cli import main

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)
    zero3, dcp = str(tmp_path / "zero3"), str(tmp_path / "dcp")
    assert main(["convert", f"{sources['zero2'][0]}/step_000000002", "--to", "deepspeed",
                 "--world-size", "3", "--zero-stage", "3", "--out", zero3]) == 0  # fmt: skip
    assert main(["convert", f"{sources['zero3'][0]}/step_000000002", "--to", "dcp",
                 "--out", dcp]) == 0  # fmt: skip
    # A DCP checkpoint is for any world size; an existing checkpoint root is not overwritten.
    assert main(["convert", f"{sources['zero3'][0]}/step_000000002", "--to", "dcp",
                 "--world-size", "2", "--out", str(tmp_path / "other")]) == 2  # fmt: skip
    assert main(["convert", f"{sources['zero3'][0]}/step_000000002", "--to", "dcp",
                 "--out", dcp]) == 2  # fmt: skip
    out = capsys.readouterr().out
    assert "(deepspeed ZeRO-2 fp32 on 2 rank(s)) to deepspeed ZeRO-3 fp32 on 3 rank(s)" in out
    state = open_checkpoint(f"{zero3}/step_000000002").json("train_state.json")
    assert state["world_size"] == 3 and "esmdist convert" in state["changes"][-1]["change"]
    results = run_ranks(resume_all, 3, tmp_path, {"zero2": zero3, "zero3": dcp}, ["zero3", "fsdp"])[
        0
    ]
    _check(results, sources)
    assert not results["zero2", "zero3"][0] and not results["zero3", "fsdp"][0]
    assert results["zero2", "fsdp"][0] and results["zero3", "zero3"][0]


def test_a_zero_file_that_does_not_hold_zero_state_is_named(sources, tmp_path):
    """A conversion reads DeepSpeed's files itself: one that hashes as committed but holds
    something else fails with one line naming the checkpoint, not a KeyError."""
    import hashlib
    import shutil

    from esmdist.checkpoint import CheckpointError, CheckpointStore
    from esmdist.checkpoint.full_state import read_full_state

    root = tmp_path / "forged"
    shutil.copytree(sources["zero2"][0], root)
    files = root / "step_000000002" / "model_optim"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": 2}},
               next(files.rglob("*optim_states.pt")))  # fmt: skip
    expected = {p.relative_to(files).as_posix(): (p.stat().st_size,
                                                  hashlib.sha256(p.read_bytes()).hexdigest())
                for p in files.rglob("*") if p.is_file()}  # fmt: skip
    with pytest.raises(CheckpointError, match="not a readable DeepSpeed ZeRO checkpoint"):
        read_full_state(CheckpointStore(str(root)), "step_000000002", "model_optim",
                        expected=expected)  # fmt: skip

"""model.init_from: continued pretraining from a published model — a fair-esm file, its Hugging
Face export, or an esmdist checkpoint — with a fresh optimizer, schedule and data position."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esmdist.config import load_config
from esmdist.model import build_model, model_config
from esmdist.model.convert import save_fair_esm_checkpoint, save_hf
from tests.conftest import REPO, make_shards
from tests.distributed import run_ranks

EXTENSIONS = os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/esmdist/torch_extensions")
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("init"), demo_records[:1000], 200)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A stand-in for a published model: the debug ESM-2 with its own random weights (seed 7,
    not the runs' train.seed), written as a fair-esm file and as its HF export."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(7)
    model = build_model(model_config("debug")).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_fair_esm_checkpoint(state, model.config, folder / "esm2_debug.pt")
    save_hf(state, model.config, folder / "hf")
    return model, {"fair-esm": str(folder / "esm2_debug.pt"), "hf": str(folder / "hf")}


def job(shards, out, init: str, **extra):
    values = {"data.path": shards, "data.num_workers": 0, "data.max_tokens": 2048,
              "data.crop_length": 256, "train.max_steps": 3, "train.tokens_per_step": 2048,
              "train.log_every": 1, "train.valid_every": 0, "train.output_dir": out,
              "optim.warmup_steps": 1, "parallel.backend": "single", "model.init_from": init,
              **extra}  # fmt: skip
    return load_config(REPO / "configs/debug-cpu.toml", [f"--{k}={v}" for k, v in values.items()])


def test_step_zero_is_the_published_model(shards, published, tmp_path):
    from esmdist.train import setup

    source, paths = published
    for kind, path in paths.items():
        run = setup(job(shards, tmp_path / kind, path))
        try:
            state = run.engine.module.state_dict()
            assert all(torch.equal(state[k], v) for k, v in source.state_dict().items()), kind
            batch = next(iter(run.loader))
            with torch.no_grad():
                ours = run.engine.module.eval()(batch.tokens, batch.cu_seqlens).logits
                theirs = source(batch.tokens, batch.cu_seqlens).logits
            assert torch.equal(ours, theirs), kind
        finally:
            run.close()


def test_the_fair_esm_file_and_its_hf_export_train_identically(shards, published, tmp_path):
    """The README's commands: `python launcher/pretrain.py --config … --model.init_from=FILE
    --data.path=… --train.output_dir=…`, from the fair-esm file and from its HF directory."""
    _, paths = published
    final = {}
    for kind, path in paths.items():
        out = tmp_path / kind
        done = subprocess.run(
            [sys.executable, str(REPO / "launcher/pretrain.py"), "--config",
             str(REPO / "configs/debug-cpu.toml"), f"--model.init_from={path}",
             f"--data.path={shards}", f"--train.output_dir={out}", "--train.max_steps=3",
             "--train.tokens_per_step=4096", "--optim.warmup_steps=1", "--data.crop_length=256"],
            capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"initialised from {path}" in done.stdout
        final[kind] = load_file(out / "final" / "model.safetensors")
    assert final["hf"].keys() == final["fair-esm"].keys()
    assert all(torch.equal(final["fair-esm"][k], v) for k, v in final["hf"].items())
    start = published[0].state_dict()
    assert not torch.equal(final["hf"]["esm.encoder.layer.0.intermediate.dense.weight"],
                           start["layers.0.fc1.weight"])  # fmt: skip


@pytest.mark.s3
def test_init_from_object_storage(shards, published, tmp_path, s3_env):
    """Both file kinds from s3:// (the fair-esm file with its regression companion)."""
    from esmdist.storage import Store
    from esmdist.train import setup

    store = Store("s3://models")
    store.fs.mkdir("models")
    source, paths = published
    for kind, path in paths.items():
        name = Path(path).name
        if kind == "hf":
            store.fs.put(path, f"models/{kind}/", recursive=True)
        else:  # the file and its companion, as fair-esm publishes them
            for file in Path(path).parent.glob(Path(path).stem + "*.pt"):
                store.fs.put(str(file), f"models/{kind}/{file.name}")
        run = setup(job(shards, tmp_path / kind, f"s3://models/{kind}/{name}"))
        try:
            state = run.engine.module.state_dict()
            assert all(torch.equal(state[k], v) for k, v in source.state_dict().items()), kind
        finally:
            run.close()


def test_another_architecture_is_refused_naming_the_fields(shards, published, tmp_path, capsys):
    from esmdist.launch import main

    argv = ["--config", str(REPO / "configs/debug-cpu.toml")]
    for key, value in {"data.path": shards, "train.output_dir": tmp_path, "model.size": "esm2_8M",
                       "parallel.backend": "single", "model.init_from": published[1]["hf"]}.items():  # fmt: skip
        argv.append(f"--{key}={value}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "num_layers=2" in err and "num_layers=6" in err and 'set model.size = "debug"' in err


def test_a_resume_continues_the_run_not_the_initialisation(shards, published, tmp_path):
    from esmdist.train import train

    path = published[1]["fair-esm"]
    whole = train(job(shards, tmp_path / "whole", path, **{"train.max_steps": 4}))[1]
    train(job(shards, tmp_path / "parts", path, **{"train.max_steps": 2}))
    resumed = train(job(shards, tmp_path / "parts", path, **{"train.max_steps": 4}))[1]
    expected = whole.full_state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.full_state_dict().items())

    # An esmdist checkpoint is a source too: its weights, nothing else of it.
    from esmdist.train import setup

    run = setup(job(shards, tmp_path / "from-ckpt",
                    tmp_path / "whole" / "checkpoints" / "step_000000004"))  # fmt: skip
    try:
        state = run.engine.module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
        assert run.progress.step == 0 and run.engine.lr > whole.lr  # not decayed: a new schedule
    finally:
        run.close()


def _start(rank: int, config):
    from esmdist.train import setup

    run = setup(config)
    try:
        return run.engine.full_state_dict()
    finally:
        run.close()


@pytest.mark.parametrize("backend", [{"parallel.backend": "fsdp", "parallel.meta_init": True},
                                     {"parallel.backend": "deepspeed", "parallel.zero_stage": 3}],
                         ids=["fsdp", "zero3"])  # fmt: skip
def test_sharded_engines_load_the_published_weights(shards, published, tmp_path, backend):
    """FSDP2 on the meta device (rank 0 reads the file, every rank gets its shards) and ZeRO-3
    (partitioned after loading): the full state at step 0 is the file's."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)
    config = job(shards, tmp_path / "sharded", published[1]["hf"],
                 **{**backend, "train.tokens_per_step": 4096})  # fmt: skip
    for state in run_ranks(_start, 2, tmp_path, config):
        assert all(torch.equal(state[k], v) for k, v in published[0].state_dict().items())

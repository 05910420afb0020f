"""Nonsense numbers and unbounded work from a config (issue 25, classes 2–4): every numeric
field of every config section declares its range (esmdist.ranges), the model's architecture is
bounded whatever file it comes from, a step's micro-batches are bounded, and a misspelt key is
named with its nearest valid one and the file."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import typing

import pytest

from esmdist.config import JobConfig, load_config
from esmdist.model.config import ModelConfig
from esmdist.ranges import RANGE, numeric_fields
from tests.adversarial.helpers import run
from tests.conftest import REPO


def config_classes() -> list[type]:
    """Every dataclass a run config or a model file is read into."""
    found, todo = [], [JobConfig, ModelConfig]
    while todo:
        cls = todo.pop()
        found.append(cls)
        for kind in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(kind) and kind not in found:
                todo.append(kind)
        todo += [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b) and b not in found]
    return found


def test_every_number_of_every_section_has_a_declared_range():
    """A numeric field without a range is a number a user, or a forged file, can make
    nonsense of: each must be made with esmdist.ranges.bounded."""
    unbounded = [f"{cls.__name__}.{name}" for cls in config_classes()
                 for name in numeric_fields(cls)
                 if RANGE not in {f.name: f for f in dataclasses.fields(cls)}[name].metadata]  # fmt: skip
    assert len(config_classes()) >= 8 and not unbounded, unbounded


@pytest.mark.parametrize("override, message", [
    ("--model.overrides.attention_heads=0", "model.attention_heads must be in [1, 4096], got 0"),
    ("--model.overrides.num_layers=-1", "model.num_layers must be in [1, 1024], got -1"),
    ("--model.overrides.vocab_size=5", "model.vocab_size must be in [33, 33], got 5"),
    ("--model.overrides.embed_dim=0", "model.embed_dim must be in [2, 65536], got 0"),
    ("--model.overrides.rotary_base=-1", "model.rotary_base must be in (1.0"),
    ("--model.overrides.layer_norm_eps=-1", "model.layer_norm_eps must be in (0.0, 0.1]"),
    ("--model.overrides.num_layers=1000000", "model.num_layers must be in [1, 1024]"),
    ("--model.overrides.num_layers=2.5", "model.overrides.num_layers: expected int, got '2.5'"),
    ("--data.mask_fraction=-0.5", "data.mask_fraction must be in [0.0, 1.0]"),
    ("--data.max_tokens=1000000000000", "data.max_tokens must be in [3, 16777216]"),
    ("--optim.lr=5", "optim.lr must be in (0.0, 1.0]"),
    ("--optim.betas=0.9,1.0", "optim.betas must be in [0.0, 1.0)"),
    ("--checkpoint.retries=1000000", "checkpoint.retries must be in [1, 100]"),
    ("--parallel.zero_stage=4", "parallel.zero_stage must be in [1, 3]"),
    ("--train.tokens_per_step=100000071680", "train.tokens_per_step must be in [1, "),
])  # fmt: skip
def test_nonsense_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError) as caught:
        load_config(REPO / "configs/debug-cpu.toml", [override]).model.build()
    assert message in str(caught.value) and "configs/debug-cpu.toml" in str(caught.value)


def test_a_step_of_unbounded_micro_batches_is_refused_by_check_and_at_launch(tmp_path):
    """10¹² tokens per step passed `esmdist check` and the trainer then gathered 488M
    micro-batches in a list (22 GB, deaf to SIGTERM); 10¹⁰ (2.4M micro-batches) is within
    tokens_per_step's own range, and refused for its micro-batches."""
    args = ["--train.tokens_per_step=10000007168", "--data.max_tokens=4096"]
    config = load_config(REPO / "configs/debug-cpu.toml", args)
    with pytest.raises(ValueError, match="past the 4,096 a step may hold"):
        config.check(1)
    started = time.monotonic()
    done = run([sys.executable, "launcher/pretrain.py", "--config", "configs/debug-cpu.toml", *args,
                f"--train.output_dir={tmp_path}"], timeout=120)  # fmt: skip
    assert done.returncode == 2 and "past the 4,096 a step may hold" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 60


def test_a_misspelt_key_names_the_file_and_the_nearest_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nmax_step = 5\n")
    with pytest.raises(ValueError) as caught:
        load_config(config)
    said = str(caught.value)
    assert said.startswith(str(config)) and "did you mean train.max_steps?" in said


def test_a_forged_model_config_is_refused_before_anything_is_built(tmp_path):
    """A Hugging Face config.json asking for 10⁶ layers took ~30 minutes of building on the
    meta device before any check; huge widths allocated 100–200 GB. Now: refused at once,
    naming the file and the key — by export, and by anything else that reads the file."""
    from esmdist.cli import main

    model = tmp_path / "forged"
    model.mkdir()
    config = {"position_embedding_type": "rotary", "num_hidden_layers": 1_000_000,
              "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
              "max_position_embeddings": 1026}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"\x00" * 16)
    for forged, key in ((config, "model.num_layers"),
                        ({**config, "num_hidden_layers": 33, "hidden_size": 60000,
                          "num_attention_heads": 600, "intermediate_size": 240000},
                         "parameters is past")):  # fmt: skip
        (model / "config.json").write_text(json.dumps(forged))
        started = time.monotonic()
        done = run([sys.executable, "-m", "esmdist.cli", "export", str(model), "--to", "hf",
                    str(tmp_path / "out")], timeout=120)  # fmt: skip
        assert done.returncode == 2 and key in done.stderr and "config.json" in done.stderr
        assert "Traceback" not in done.stderr and time.monotonic() - started < 60
    (model / "config.json").write_text("{not json")
    assert main(["export", str(model), "--to", "hf", str(tmp_path / "out")]) == 2


def test_under_torchrun_each_rank_ends_a_config_error_with_its_one_line_and_status_2(tmp_path):
    """Under torchrun a config error was the line, then ~40 lines of traceback and status 1:
    now each rank prints the line and exits 2; torchrun's own summary follows (its
    ChildFailedError report, which names each rank's status), and it exits 1."""
    from pathlib import Path

    from tests.distributed import free_port

    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                "launcher/pretrain.py", "--config", "configs/debug-cpu.toml",
                "--model.overrides.attention_heads=0", f"--train.output_dir={tmp_path}"],
               timeout=300)  # fmt: skip
    ours = [line for line in done.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(ours) == 2 and all("attention_heads" in line for line in ours), done.stderr
    assert "exitcode  : 2" in done.stderr, done.stderr
    esmdist_frames = [line for line in done.stderr.splitlines() if "/esmdist/" in line]
    assert not esmdist_frames, done.stderr

"""A new user's first hour, from the README and --help alone: the documented single-process
commands work as written, errors arrive before anything slow starts and name the fix
(`esmdist check`), progress says how long is left, and `esmdist --version` answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esmdist.config import load_config
from tests.conftest import REPO, make_shards

EXTENSIONS = os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/esmdist/torch_extensions")
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("first"), demo_records[:600], 100)


def small(shards, out, **extra) -> list[str]:
    values = {"data.path": shards, "data.max_tokens": 2048, "data.crop_length": 256,
              "train.max_steps": 3, "train.tokens_per_step": 2048, "train.log_every": 1,
              "train.valid_every": 0, "train.output_dir": out, "optim.warmup_steps": 1, **extra}  # fmt: skip
    return [f"--{k}={v}" for k, v in values.items()]


def pretrain(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "2", "TORCH_EXTENSIONS_DIR": EXTENSIONS,
                   **(env or {})}  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)  # plain `python`, as the launcher's docstring shows
    return subprocess.run([sys.executable, str(REPO / "launcher/pretrain.py"), "--config",
                           str(REPO / "configs/debug-cpu.toml"), *args], env=environment,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("backend", [{}, {"parallel.backend": "deepspeed"}], ids=["ddp", "zero2"])
def test_the_launchers_own_example_runs_as_one_plain_process(shards, tmp_path, backend):
    """`python launcher/pretrain.py --config configs/debug-cpu.toml --train.max_steps=…`: the
    shipped config says ddp; DeepSpeed under plain python used to look for MPI."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "PREEMPTED").write_text("stopped after step 1\n")  # an old stop's
    done = pretrain(*small(shards, tmp_path / "run", **backend))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "run" / "PREEMPTED").exists()  # a finished run leaves no stale marker
    assert "mpi4py" not in done.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    last = records[-1]
    assert last["step"] == 3 and last["done_pct"] == 100.0 and last["eta_s"] == 0.0
    assert records[0]["eta_s"] > 0 and records[0]["step_time_s"] > 0 and last["wall_s"] > 0
    assert " done_pct=100 eta_s=0:00:00 wall_s=0:00:0" in done.stdout  # H:MM:SS on the console


def test_help_lists_every_config_key_with_its_default():
    done = subprocess.run([sys.executable, str(REPO / "launcher/pretrain.py"), "--help"],
                          capture_output=True, text=True)  # fmt: skip
    for line in ("train.max_steps = 500000", "parallel.backend = 'ddp'", "model.init_from = ''",
                 "checkpoint.resume = 'auto'", "data.crop_length = 1024"):  # fmt: skip
        assert line in done.stdout


@pytest.mark.parametrize("override, message", [
    ({"optim.warmup_steps": 10}, "optim.warmup_steps (10) must be below train.max_steps (3)"),
    ({"model.size": "esm1b_650M", "data.crop_length": 2048, "data.max_tokens": 4096},
     "data.crop_length (2048) exceeds ESM-1b's 1024 learned positions"),
    ({"train.tokens_per_step": 3000}, "must be a multiple of data.max_tokens"),
])  # fmt: skip
def test_config_errors_come_before_deepspeed_starts(shards, tmp_path, override, message):
    done = pretrain(*small(shards, tmp_path, **{"parallel.backend": "deepspeed", **override}))
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "real_accelerator" not in done.stdout + done.stderr  # DeepSpeed was never imported


def test_s3_without_credentials_is_one_line_naming_the_variables(shards, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_PROFILE": "",
           "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none")}  # fmt: skip
    env = {k: v for k, v in env.items() if v}
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-m", "esmdist.cli", "check", "--config",
                           str(REPO / "configs/debug-cpu.toml"), "--world-size", "2",
                           "--data.path=s3://bucket/ur50"], env={**environment, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no AWS credentials are set: export AWS_ACCESS_KEY_ID" in done.stderr
    assert "Traceback" not in done.stderr
    # The shipped 650M config as is (data on s3://YOUR-BUCKET): the launcher says the same.
    done = subprocess.run([sys.executable, str(REPO / "launcher/pretrain.py"), "--config",
                           str(REPO / "configs/esm2_650M.toml")], env={**environment, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "data.path on s3:// but no AWS credentials are set" in done.stderr


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    import importlib.util

    from esmdist import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    config = load_config(REPO / "configs/esm2_650M.toml", ["--data.path=x"])
    assert config.log.wandb
    found = preflight.quick_problems(config, 8)
    assert any("log.wandb = true needs the wandb package: pip install -e '.[wandb]'" in p
               for p in found), found  # fmt: skip


def test_esmdist_check_finds_each_problem_before_sbatch(shards, tmp_path, capsys):
    from esmdist.cli import main

    base = ["check", "--config", str(REPO / "configs/debug-cpu.toml"), "--world-size", "2",
            f"--data.path={shards}", f"--train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(base) == 0
    assert "ok: " in capsys.readouterr().out
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the test write is removed
    (tmp_path / "file").write_text("not a directory")
    cases = {
        "--data.path=" + str(tmp_path / "nowhere"): "data.path: ",
        f"--checkpoint.root={tmp_path / 'file'}": "checkpoint.root (",
        f"--model.init_from={tmp_path / 'esm2_missing.pt'}": "esm2_missing.pt does not exist",
        "--world-size=3": "must be a multiple of data.max_tokens × world size",
    }
    for extra, message in cases.items():
        args = base + ([extra] if not extra.startswith("--world-size") else [])
        if extra.startswith("--world-size"):
            args[args.index("--world-size") + 1] = "3"
        assert main(args) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_version_names_the_package_and_commit():
    done = subprocess.run([sys.executable, "-m", "esmdist.cli", "--version"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.startswith("esmdist 0.") and "(git " in done.stdout


def write_fasta(path: Path, records) -> Path:
    path.write_text("".join(f">{h}\n{s}\n" for h, s in records))
    return path


def test_a_failed_sharding_run_reruns_with_another_policy_by_restart(demo_records, tmp_path,
                                                                     capsys):  # fmt: skip
    """After "not in the cluster table (use --on-missing-member skip …)", the rerun with that
    option used to be refused for the unfinished run's other options, with no way named."""
    from esmdist.cli import main

    records = demo_records[:60]
    fasta = write_fasta(tmp_path / "in.fasta", records)
    ids = [h.split()[0] for h, _ in records]
    table = tmp_path / "members.tsv"
    # 50 of the 60 members, and 5 members of a larger database that the FASTA does not hold.
    table.write_text("".join(f"c{i % 7}\t{m}\n" for i, m in enumerate(ids[:50]))
                     + "".join(f"c0\tABSENT{i}\n" for i in range(5)))  # fmt: skip
    base = ["shard", str(fasta), "--out", str(tmp_path / "out"), "--clusters", str(table),
            "--workers", "1", "--split", "valid=0.2"]  # fmt: skip
    assert main(base) == 2
    assert "looked up by that id" in capsys.readouterr().err
    assert main([*base, "--on-missing-member", "skip"]) == 2
    err = capsys.readouterr().err
    assert "other options (on_missing_member)" in err and "--restart" in err
    assert main([*base, "--on-missing-member", "skip", "--restart"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"]["missing_from_clusters"] == 10
    assert manifest["counts"]["skipped"]["cluster_member_without_sequence"] == 5


def test_an_empty_held_out_split_is_warned_about(demo_records, tmp_path, capsys):
    from esmdist.cli import main

    fasta = write_fasta(tmp_path / "in.fasta", demo_records[:40])
    assert main(["shard", str(fasta), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "warning: split 'valid' is empty: 0.005 of 40 samples" in out


def test_pppl_limit_is_shown_and_zero_is_an_error(tmp_path, capsys, demo_records):
    from esmdist.cli import main

    fasta = write_fasta(tmp_path / "in.fasta", demo_records[:3])
    assert main(["eval", "pppl", "--model", "debug", "--fasta", str(fasta), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "pppl", "--help"])
    assert "default: 16" in capsys.readouterr().out


def test_offloaded_evaluation_scores_as_the_plain_model(tmp_path, demo_records):
    """fair-esm's 15B example (fairscale FSDP + CPU offload) done with FSDP2: the model built
    on the meta device, its parameters in host memory, each block run on its own — the same
    pseudo-perplexities as the model held whole."""
    import torch

    from esmdist.model import build_model, model_config
    from esmdist.model.convert import save_hf

    torch.manual_seed(5)
    model = build_model(model_config("debug"))
    save_hf(model.state_dict(), model.config, tmp_path / "hf")
    fasta = write_fasta(tmp_path / "in.fasta", [r for r in demo_records if len(r[1]) < 120][:2])
    scores = {}
    for flag in ([], ["--offload"]):
        done = subprocess.run([sys.executable, "-m", "esmdist.cli", "eval", "pppl", "--model",
                               str(tmp_path / "hf"), "--fasta", str(fasta), *flag],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        scores[bool(flag)] = [x for x in done.stdout.splitlines() if "pseudo_perplexity=" in x]
    assert len(scores[False]) == 2 and scores[True] == scores[False]

"""Issue 25, classes 5–10: outputs that would overwrite inputs or committed state, job scripts
broken by their own options, an unreachable S3 endpoint, a shard table that points outside its
dataset, and what a user's own files and environment do (a fair-esm file without its contact
regression, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, `plan --gpu-memory 80`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from esmdist.cli import main
from tests.adversarial.helpers import copy_checkpoint_root, environment, run
from tests.conftest import REPO


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_no_output_may_destroy_an_input_or_committed_state(trained, tmp_path, capsys):
    """`export STEP --to hf STEP` replaced the checkpoint's config.json (the run could no
    longer resume, `status` still said committed); `eval embed --out` equal to the FASTA
    replaced it. Every command's outputs are checked against all it reads, committed
    checkpoints and checkpoint roots — before anything runs."""
    root = copy_checkpoint_root(trained, tmp_path / "root")
    step = root / "step_000000004"
    before = digest(root)
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    for argv, said in (
        (["export", str(step), "--to", "hf", str(step)], "is an input"),
        (["export", str(step), "--to", "hf", str(step / "hf")], "inside the committed checkpoint"),
        (["export", str(step), "--to", "fair-esm", str(root / "esm2_x.pt")], "checkpoint root"),
        (["eval", "embed", "--model", str(step), "--fasta", str(fasta), "--out", str(fasta)],
         "is an input"),
        (["eval", "embed", "--model", str(step), "--fasta", str(fasta), "--out",
          str(tmp_path / "e.parquet"), "--plot", str(tmp_path / "." / "in.fasta")], "is an input"),
        (["shard", str(fasta), "--out", str(step)], "inside the committed checkpoint"),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        assert said in capsys.readouterr().err, argv
    assert digest(root) == before and fasta.read_text() == ">a\nMKTAYIAKQR\n"
    main(["status", "--config", "configs/debug-cpu.toml", f"--checkpoint.root={root}"])
    assert "committed step 4" in capsys.readouterr().out  # still resumable, as it says
    assert main(["export", str(step), "--to", "hf", str(tmp_path / "fine")]) == 0


@pytest.mark.parametrize("option, value", [("--partition", "gpu\ntouch X"),
                                           ("--account", "a\rb"), ("--sbatch-arg", "--x=\x00")])  # fmt: skip
def test_a_control_character_in_a_job_option_is_refused(option, value, tmp_path, capsys,
                                                        monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "debug-cpu.toml"
    assert main(["submit", "--config", str(config), "--time", "10", f"{option}={value}",
                 "--dependency=afterok:1", "--dry-run"]) == 2  # fmt: skip
    assert "control character" in capsys.readouterr().err


def test_rendered_job_scripts_are_valid_shell_whatever_the_paths(tmp_path, capsys, monkeypatch):
    """A config path with a newline broke the script's "Rendered from" comment into a shell
    line; with spaces, quotes and `$(…)` the script must still parse (`bash -n`)."""
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "it's $(touch X) a run"
    odd.mkdir()
    config = odd / "run.toml"
    shutil.copy(REPO / "configs" / "debug-cpu.toml", config)
    assert main(["submit", "--config", str(config), "--time", "10", "--dependency=afterok:1",
                 "--dry-run", "--", "--train.output_dir=out dir"]) == 0  # fmt: skip
    script = capsys.readouterr().out
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    newline = tmp_path / "a\nb.toml"
    shutil.copy(REPO / "configs" / "debug-cpu.toml", newline)
    assert main(["submit", "--config", str(newline), "--time", "10", "--dependency=afterok:1",
                 "--dry-run"]) == 2  # fmt: skip
    assert "control character" in capsys.readouterr().err and not (tmp_path / "X").exists()


def test_an_unreachable_s3_endpoint_is_one_line_naming_the_url(tmp_path):
    """botocore's EndpointConnectionError is no OSError: storage neither retried nor converted
    it, and every command ended in tracebacks (the lock's heartbeat thread died with one)."""
    env = environment(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_MAX_ATTEMPTS="1",
                      AWS_ENDPOINT_URL="http://127.0.0.1:9")  # fmt: skip
    done = run([sys.executable, "-m", "esmdist.cli", "status", "--config",
                "configs/debug-cpu.toml", "--checkpoint.root=s3://bucket/run"], env=env,
               timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://bucket/run" in lines[0] and "after 6 attempts" in lines[0]
    assert "EndpointConnectionError" in lines[0]


@pytest.mark.parametrize("change, said", [
    (lambda row: row.update(name="../../outside/train-000000.tar"), "is not 'train-NNNNNN.tar'"),
    (lambda row: row.update(name="train-000000.tar/../x"), "is not 'train-NNNNNN.tar'"),
    (lambda row: row.update(sha256=None), "sha256 None"),
    (lambda row: row.update(bytes=None), "bytes None"),
])  # fmt: skip
def test_a_shard_table_row_that_escapes_or_disables_checks_is_refused(change, said, small_shards,
                                                                      tmp_path):  # fmt: skip
    from esmdist.data.stream import DataError, ShardSet

    dataset = tmp_path / "shards"
    shutil.copytree(small_shards, dataset)
    rows = pq.read_table(dataset / "shards.parquet").to_pylist()
    change(next(r for r in rows if r["split"] == "train"))
    pq.write_table(pa.Table.from_pylist(rows), dataset / "shards.parquet")
    with pytest.raises(DataError, match="shards.parquet") as caught:
        ShardSet.open(str(dataset), "train")
    assert said in str(caught.value)


def test_a_fair_esm_file_without_its_contact_regression_starts_a_run(tmp_path, small_shards):
    """ESM-1v's files are published without `-contact-regression.pt`; fair-esm loads them, and
    `init_from` crashed on the missing contact_head.regression.*."""
    from esmdist.model import ESM
    from esmdist.model.config import MODEL_SIZES
    from esmdist.model.convert import load_fair_esm_checkpoint, save_fair_esm_checkpoint
    from esmdist.train import train
    from tests.adversarial.helpers import job

    torch.manual_seed(0)
    model = ESM(MODEL_SIZES["debug"])
    model.init_weights()
    path = tmp_path / "esm2_t2_debug.pt"
    save_fair_esm_checkpoint(model.state_dict(), model.config, path)
    path.with_name(path.stem + "-contact-regression.pt").unlink()
    config, state = load_fair_esm_checkpoint(path)
    assert not state["contact_head.regression.weight"].any()
    assert torch.equal(state["layers.1.fc2.weight"], model.state_dict()["layers.1.fc2.weight"])
    last, _ = train(job(small_shards, tmp_path / "out", str(tmp_path / "root"),
                        f"--model.init_from={path}", steps=2))  # fmt: skip
    assert last["loss"] > 0


def test_torch_force_no_weights_only_load_does_not_unlock_or_break_checkpoint_reads(tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """A common workaround on torch ≥ 2.6: with it, every DeepSpeed checkpoint read failed
    ("only one of … should be set"), blaming the user. esmdist's reads stay weights-only and
    work; the variable is the user's again afterwards."""
    from esmdist.checkpoint.safe_load import torch_pickles_without_code

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with torch_pickles_without_code(str(tmp_path)):
        assert torch.load(tmp_path / "plain.pt")["w"].sum() == 2
    import os

    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


def test_plan_reads_a_plain_number_as_gigabytes(capsys):
    assert main(["plan", "--model", "esm2_650M", "--gpus", "1", "--backend", "single",
                 "--gpu-memory", "80"]) == 0  # fmt: skip
    assert "GPU(s) of 80 GB" in capsys.readouterr().out
    assert main(["plan", "--model", "esm2_15B", "--gpus", "8", "--gpu-memory", "80GB",
                 "--scaling"]) == 0  # fmt: skip
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_resuming_with_a_longer_schedule_says_how_the_rate_changes(trained, tmp_path, capsys):
    from esmdist.config import load_config
    from esmdist.train_state import schedule_change

    saved = json.loads((trained / "step_000000004" / "config.json").read_text())
    config = load_config(REPO / "configs/debug-cpu.toml", ["--train.max_steps=40",
                                                           "--optim.warmup_steps=1"])  # fmt: skip
    said = schedule_change(config, saved, 4)
    assert "train.max_steps 4 → 40" in said and "at step 4 the rate is" in said

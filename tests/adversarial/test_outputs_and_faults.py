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


@pytest.mark.parametrize("header", ["protéine_1 a French name", "sp\tP12345 a tab"])
def test_the_sharder_keeps_to_the_id_rule_its_readers_accept(header, tmp_path, capsys,
                                                             demo_records):  # fmt: skip
    """`>protéine_1` was sharded with exit 0, and every reader then refused the shard; a tab
    inside an id was stored and could never match a cluster table."""
    from esmdist.data.stream import ShardSet

    fasta = tmp_path / "in.fasta"
    good = "".join(f">{h}\n{s}\n" for h, s in demo_records[:30])
    fasta.write_text(good + f">{header}\n{demo_records[31][1]}\n")
    assert main(["shard", str(fasta), "--out", str(tmp_path / "refused")]) == 2
    said = capsys.readouterr().err
    assert "record 31" in said and "printable ASCII without whitespace" in said
    assert main(["shard", str(fasta), "--out", str(tmp_path / "kept"), "--on-invalid",
                 "skip"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert "invalid_id" in json.dumps(manifest)
    shards = ShardSet.open(str(tmp_path / "kept"), "train")
    assert sum(len(shards.read(i)) for i in range(len(shards.urls))) == 30


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_payload_in_a_contact_regression_file_is_refused_naming_it(tmp_path):
    from esmdist.eval.contact_fit import load_regression

    path = tmp_path / "esm2_t2-contact-regression.pt"
    torch.save({"model": {"contact_head.regression.weight": _RunsCode()}}, path)
    with pytest.raises(ValueError, match=f"{path}: refused to load"):
        load_regression(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"{path}: not a readable torch checkpoint"):
        load_regression(path)


def test_a_data_position_past_the_dataset_is_refused_at_resume(trained, small_shards, tmp_path):
    """A slot's read count past its run (train_state.json edited, or a checkpoint resumed on
    another dataset of the same fingerprint rules) silently skipped the rest of the epoch."""
    from tests.adversarial.helpers import edit_json, launcher, revouch

    root = copy_checkpoint_root(trained, tmp_path / "root")
    step = root / "step_000000004"
    edit_json(step / "train_state.json",
              lambda state: state["data"]["order"].update(slots=[[0, 10**9]]))  # fmt: skip
    revouch(step)
    done = run(launcher(small_shards, tmp_path / "out", str(root), steps=6))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "has read 1,000,000,000 samples of epoch 0" in done.stderr


def test_a_model_directory_in_s3_is_fetched_with_its_subfolders_and_safe_names(trained, s3_server,
                                                                                s3_env, tmp_path):  # fmt: skip
    """A flat copy of an S3 model directory failed on any subfolder (a tokenizer or a
    checkpoint kept beside the weights, as Hugging Face repositories have), and joined listed
    object names to the local directory unchecked."""
    from esmdist.export import model_weights
    from esmdist.model import convert
    from esmdist.storage import StorageError, plain_relative

    config, state = model_weights(str(trained / "step_000000004"))
    local = convert.save_hf(state, config, tmp_path / "hf")
    (local / "extra" / "deeper").mkdir(parents=True)
    (local / "extra" / "deeper" / "notes.txt").write_text("kept beside the weights\n")
    fs = s3_server.filesystem()
    fs.mkdir("model-subfolders")
    fs.put(str(local), "model-subfolders/hf", recursive=True)
    where = "s3://model-subfolders/hf"
    fetched_config, fetched = model_weights(where)
    assert fetched_config == config
    assert all(torch.equal(fetched[k], state[k]) for k in state)
    for name in ("../outside", "a/../../b", "/etc/passwd", "a//b", "x\nline"):
        with pytest.raises(StorageError, match=f"{where}: .* not a plain file name"):
            plain_relative(name, where)


def test_a_full_disk_names_the_file_it_could_not_write(small_shards, tmp_path):
    """ENOSPC arrives in write() or close() as an OSError without a file name (and in
    torch.save as a RuntimeError without an errno): "[Errno 28] No space left on device" named
    nothing. /dev/full fails every write with ENOSPC."""
    from esmdist.storage import writing
    from tests.adversarial.helpers import launcher

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    done = run(launcher(small_shards, out, str(tmp_path / "root")))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"No space left on device: '{out / 'metrics.jsonl'}'" in done.stderr.splitlines()[-1]

    (tmp_path / "model.pt").symlink_to("/dev/full")
    full = pytest.raises(OSError, match="writing failed .* MiB free there.*model.pt")
    with full, writing(tmp_path / "model.pt"):
        torch.save({"weight": torch.zeros(4096)}, tmp_path / "model.pt")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "variants.csv").symlink_to("/dev/full")
    from esmdist.cli_eval.common import write_results

    with pytest.raises(OSError, match="No space left on device: '.*variants.csv'"):
        write_results(str(tmp_path / "results"), "variants", {}, [{"a": 1}] * 10)

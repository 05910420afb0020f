"""The Slurm side without a cluster: node lists, the srun → torch.distributed mapping, the job
scripts `esmdist submit` renders, and `esmdist status` (the job script's requeue decision)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esmdist.cli import main as cli
from esmdist.parallel.slurm_env import expand_nodelist, fill_from_slurm, job_port
from esmdist.slurm.submit import JobOptions, render, template_body

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
])  # fmt: skip
def test_slurm_node_lists_expand_without_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node[a-b]", ""])
def test_an_unreadable_node_list_names_itself(bad):
    with pytest.raises(ValueError, match="Slurm node list"):
        expand_nodelist(bad)


def srun_task(**extra) -> dict[str, str]:
    return {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242", "PATH": "/nonexistent", **extra}  # fmt: skip


def test_an_srun_task_gets_its_rank_and_the_first_nodes_address():
    env = srun_task(SLURM_JOB_NODELIST="localhost,gpu-b[3-4]")
    fill_from_slurm(env)  # no scontrol on the PATH (a container): parsed here
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1"  # the first node, resolved to its address
    assert env["MASTER_PORT"] == str(job_port("4242")) == str(20000 + 4242)


def test_the_steps_node_list_comes_before_the_jobs():
    # A step on part of the allocation: its rank 0 runs on the step's first node.
    env = srun_task(SLURM_JOB_NODELIST="gpu-unresolvable[1-4]", SLURM_STEP_NODELIST="localhost")
    fill_from_slurm(env)
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_an_unresolvable_first_node_is_named_with_the_way_out():
    env = srun_task(SLURM_JOB_NODELIST="esmdist-no-such-host[1-2]")
    with pytest.raises(RuntimeError, match="'esmdist-no-such-host1' does not resolve.*MASTER_ADDR"):
        fill_from_slurm(env)


def test_a_launchers_variables_win():
    env = srun_task(RANK="0", SLURM_JOB_NODELIST="x[1-2]")
    fill_from_slurm(env)  # torchrun inside srun: nothing to do
    assert env["RANK"] == "0" and "MASTER_ADDR" not in env
    env = srun_task(SLURM_JOB_NODELIST="x[1-2]", MASTER_ADDR="10.0.0.9", MASTER_PORT="1234")
    fill_from_slurm(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.9", "1234")


def test_the_rendered_script_is_the_template_body_after_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = JobOptions(job_name="esmdist-esm2_650M", time="1-00:00:00", nodes=4,
                         ntasks_per_node=8, gpus_per_node=8, cpus_per_task=12,
                         partition="gpu", account="bio", dependency="afterok:77",
                         sbatch_args=("--exclusive",))  # fmt: skip
    script = render("pretrain.sbatch", options, ["/abs/run.toml", "--optim.lr=1e-4"], "x")
    header, body = script.split("set -- ", 1)
    lines = header.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                 "--time=1-00:00:00", "--signal=B:USR1@300", "--requeue", "--open-mode=append",
                 "--partition=gpu", "--account=bio", "--dependency=afterok:77", "--exclusive",
                 f"--output={tmp_path / 'logs'}/%x-%j.out", f"--chdir={tmp_path}"):  # fmt: skip
        assert f"#SBATCH {line}" in lines
    assert f"export ESMDIST_PYTHON={sys.executable}" in lines
    assert body.split("\n", 1) == ["/abs/run.toml --optim.lr=1e-4",
                                   template_body("pretrain.sbatch")]  # fmt: skip
    assert "#SBATCH" not in body
    (tmp_path / "job.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], check=True)  # valid bash


def test_a_container_image_runs_the_ranks_inside_it():
    options = JobOptions(job_name="j", time="10", container_image="nvcr.io#org/esmdist:1",
                         container_mounts="/data:/data")  # fmt: skip
    script = render("pretrain.sbatch", options, ["run.toml"], "x")
    assert "export ESMDIST_CONTAINER_IMAGE='nvcr.io#org/esmdist:1'" in script  # quoted
    assert "export ESMDIST_CONTAINER_MOUNTS=/data:/data" in script
    assert "export ESMDIST_PYTHON=python3" in script  # the image's own Python
    assert '--container-image="$ESMDIST_CONTAINER_IMAGE"' in script


def test_the_repositorys_job_scripts_are_the_templates():
    for link, name in (("slurm/pretrain.sbatch", "pretrain.sbatch"),
                       ("shards/shard.sbatch", "shard.sbatch")):  # fmt: skip
        assert (REPO / link).resolve() == REPO / "esmdist" / "slurm" / name


@pytest.mark.parametrize("options, message", [
    ({"time": "1 day"}, "--time"),
    ({"nodes": 0}, "--nodes"),
    ({"max_restarts": -1}, "--max-restarts"),
    ({"job_name": "a b"}, "--job-name"),
])  # fmt: skip
def test_impossible_job_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        JobOptions(**{"job_name": "j", "time": "10", **options})


def test_submit_checks_the_config_for_the_world_size_before_queueing(tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "debug-cpu.toml"
    assert cli(["submit", "--config", str(config), "--nodes", "3", "--time", "10",
                "--dry-run"]) == 2  # fmt: skip
    assert "4096 × 3 = 12288" in capsys.readouterr().err
    assert cli(["submit", "--config", str(config), "--nodes", "2", "--time", "10", "--dry-run",
                "--", "--train.max_stepz=3"]) == 2  # fmt: skip
    assert "max_stepz" in capsys.readouterr().err
    # `esmdist check`'s storage checks too: the data is not there (the job waits on none).
    assert cli(["submit", "--config", str(config), "--nodes", "2", "--time", "10", "--dry-run",
                "--", "--train.max_steps=30"]) == 2  # fmt: skip
    assert "data.path" in capsys.readouterr().err
    assert cli(["submit", "--config", str(config), "--nodes", "2", "--time", "10", "--dry-run",
                "--dependency=afterok:17", "--", "--train.max_steps=30"]) == 0  # fmt: skip
    script = capsys.readouterr().out
    assert f"set -- {config} --train.max_steps=30" in script and (tmp_path / "logs").is_dir()
    assert "#SBATCH --cpus-per-task=1" in script  # debug-cpu.toml reads with no loader worker


def test_a_node_range_is_checked_at_every_count_it_may_start_on(tmp_path, capsys, monkeypatch):
    """`--nodes MIN-MAX` (Slurm's range): the job takes what it is given and each start derives
    its world size; the step's tokens must fit every count, else the ones that do are named."""
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "debug-cpu.toml"  # 8,192 tokens per step, 4,096 per micro-batch
    assert cli(["submit", "--config", str(config), "--nodes", "1-3", "--time", "10",
                "--dry-run", "--dependency=afterok:1"]) == 2  # fmt: skip
    assert "on 3 rank(s) the run cannot start" in (err := capsys.readouterr().err)
    assert "world sizes that work: 1, 2" in err
    assert cli(["submit", "--config", str(config), "--nodes", "1-4", "--time", "10",
                "--dry-run", "--dependency=afterok:1"]) == 2  # fmt: skip
    assert "on 3, 4 rank(s) the run cannot start" in capsys.readouterr().err
    assert cli(["submit", "--config", str(config), "--nodes", "2-4", "--time", "10",
                "--dry-run", "--dependency=afterok:1", "--", "--train.tokens_per_step=16384",
                "--data.max_tokens=1024"]) == 2  # fmt: skip
    assert "world sizes that work: 2, 4" in capsys.readouterr().err
    assert cli(["submit", "--config", str(config), "--nodes", "1-2", "--time", "10",
                "--dry-run", "--dependency=afterok:1"]) == 0  # fmt: skip
    script = capsys.readouterr().out
    # Whole nodes and the tasks placed by the script: with a task count Slurm would size the
    # job for MIN nodes (seen on the two-node cluster).
    assert "#SBATCH --nodes=1-2" in script and "#SBATCH --exclusive" in script
    assert "--ntasks-per-node" not in script.split("set --")[0]
    assert "export ESMDIST_TASKS_PER_NODE=1" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # DeepSpeed's ZeRO checkpoints are converted when the world size changes (test_elastic).
    assert cli(["submit", "--config", str(config), "--nodes", "1-2", "--time", "10",
                "--dry-run", "--dependency=afterok:1", "--",
                "--parallel.backend=deepspeed"]) == 0  # fmt: skip
    assert "#SBATCH --nodes=1-2" in capsys.readouterr().out
    for bad in ("2-1", "a-3", "1-"):
        assert cli(["submit", "--config", str(config), "--nodes", bad, "--time", "10",
                    "--dry-run"]) == 2  # fmt: skip
        assert "--nodes" in capsys.readouterr().err


def test_submit_shard_checks_the_shard_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli(["submit", "shard", "--time", "10", "--dry-run", "--", "in.fasta"])  # no --out
    assert cli(["submit", "shard", "--time", "10", "--cpus-per-task", "32", "--dry-run", "--",
                "in.fasta.gz", "--out", "s3://b/ur50"]) == 0  # fmt: skip
    script = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=32" in script and "--signal" not in script
    assert "set -- in.fasta.gz --out s3://b/ur50" in script


def write_committed(root: Path, step: int) -> None:
    directory = root / f"step_{step:09d}"
    directory.mkdir(parents=True)
    (directory / "COMMITTED").write_text('{"files": {}}')


def test_status_says_finished_stopped_or_unfinished(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["status", "--config", str(REPO / "configs" / "debug-cpu.toml"),
            f"--train.output_dir={out}", "--train.max_steps=12", "--optim.warmup_steps=2"]  # fmt: skip
    assert cli(args) == 1
    assert "committed step none of 12; unfinished" in capsys.readouterr().out
    write_committed(out / "checkpoints", 8)
    (out / "PREEMPTED").write_text("stopped after step 4\n")  # an older stop: not this one
    assert cli(args) == 1
    (out / "PREEMPTED").write_text("stopped after step 8\n")
    assert cli(args) == 3
    assert "committed step 8 of 12; stopped on request" in capsys.readouterr().out
    write_committed(out / "checkpoints", 12)
    assert cli(args) == 1  # the last step committed, but not yet exported
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    assert cli(args) == 0
    assert "committed step 12 of 12; finished" in capsys.readouterr().out


def test_the_job_scripts_are_valid_bash():
    for name in ("pretrain.sbatch", "shard.sbatch"):
        subprocess.run(["bash", "-n", str(REPO / "esmdist" / "slurm" / name)], check=True)
    assert os.access(REPO / "tests" / "slurm" / "up.sh", os.R_OK)


FAKE_SRUN = """#!/usr/bin/env bash
# Plays the ranks: leaves what the scenario says in the run's output and exits with its status.
out="$FAKE_OUTPUT"
mkdir -p "$out/checkpoints/step_000000008" && echo '{"files": {}}' > "$out/checkpoints/step_000000008/COMMITTED"
case "$FAKE_SCENARIO" in
    finished) mkdir -p "$out/checkpoints/step_000000012" "$out/final"
              echo '{"files": {}}' > "$out/checkpoints/step_000000012/COMMITTED"
              echo '{}' > "$out/final/config.json"; exit 0 ;;
    stopped) echo "stopped after step 8" > "$out/PREEMPTED"; exit 143 ;;  # a rank terminated
    crashed) exit 137 ;;
    waiting) trap 'echo "stopped after step 8" > "$out/PREEMPTED"; exit 75' USR1
             touch "$out.started"; sleep 30 & wait; exit 1 ;;
esac
"""


@pytest.mark.parametrize("scenario, restarts, status, requeued", [
    ("finished", "0", 0, False),
    ("stopped", "0", 0, True),
    ("stopped", "5", 75, False),  # ESMDIST_MAX_RESTARTS=5 reached
    ("crashed", "0", 137, False),
])  # fmt: skip
def test_the_job_script_requeues_only_an_unfinished_stopped_run(tmp_path, scenario, restarts,
                                                                 status, requeued):  # fmt: skip
    """The decision after the ranks exit, with srun and scontrol played by scripts and the real
    `esmdist status` reading what the 'ranks' left."""
    done = run_job_script(tmp_path, scenario, restarts)
    assert done.returncode == status, done.stdout + done.stderr
    calls = Path(f"{tmp_path / 'run'}.scontrol")
    assert (calls.read_text() if calls.exists() else "") == ("requeue 77\n" if requeued else "")
    assert f"esmdist job 77 restart {restarts} " in done.stdout


def test_sigterm_to_the_job_script_stops_the_ranks_and_requeues(tmp_path):
    """A preemption's SIGTERM is handled as the time-limit warning is: passed to the ranks as
    SIGUSR1, then the same decision (the cluster tests send SIGUSR1)."""
    job = run_job_script(tmp_path, "waiting", "0", wait=False)
    started = Path(f"{tmp_path / 'run'}.started")
    for _ in range(300):
        if started.exists():
            break
        time.sleep(0.1)
    time.sleep(0.2)  # the fake ranks' trap is set right before the marker file
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stdout + stderr
    assert "got SIGTERM: asking every rank to commit a checkpoint and stop" in stdout
    assert Path(f"{tmp_path / 'run'}.scontrol").read_text() == "requeue 77\n"


def run_job_script(tmp_path: Path, scenario: str, restarts: str, wait: bool = True):
    """slurm/pretrain.sbatch as Slurm would start it, with srun and scontrol played by
    scripts (FAKE_SRUN) and the real `esmdist status`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$@" >> "$FAKE_OUTPUT.scontrol"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ESMDIST_PYTHON": sys.executable,
           "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": restarts, "ESMDIST_MAX_RESTARTS": "5",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2",
           "FAKE_OUTPUT": str(out), "FAKE_SCENARIO": scenario}  # fmt: skip
    command = ["bash", str(REPO / "slurm" / "pretrain.sbatch"),
               str(REPO / "configs" / "debug-cpu.toml"), f"--train.output_dir={out}",
               "--train.max_steps=12", "--optim.warmup_steps=2"]  # fmt: skip
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip

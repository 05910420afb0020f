"""The GPU check's own machinery, on this CPU machine: a lent GPU gives one call of minutes, so
what turns its benches into the summary must not fail there for the first time.
- bench/gpu_check.sh keeps to its budget: with none left, every step is skipped, the summary
  still comes back, and every GPU target reads "unmeasured";
- bench/gpu_summary.py reads what the benches really write (bench/train_bench.py,
  bench/step_profile.py and bench/loop_bench.py run here on the debug model, loop_bench with its loss-curve check against
  a second copy of this checkout) into its targets and tables;
- what the check runs imports nothing beyond the machine's image and the wheels that
  `gpu_check.sh prepare` carries (a missing python-hostlist would have failed every step)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, TEST_DATA

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


def bench(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_gpu_check_keeps_to_its_budget(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "correctness", "loop", "hf"], cwd=REPO,
                          env={**ENV, "OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "0"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["results"]["steps"]
    assert [s["step"] for s in steps] == ["correctness", "loop_650M", "loop_3B", "loop_35M",
                                          "loop_150M", "hf"]  # fmt: skip
    assert {s["outcome"] for s in steps} == {"skipped"}
    assert {t["status"] for t in summary["targets"]} == {"unmeasured"}
    assert "skipped: 0 s of the budget left" in (tmp_path / "steps.log").read_text()


def test_summary_of_real_bench_results(tmp_path, image_env):
    """The benches run as on the GPU machine: with only the image's packages importable."""
    raw, baseline = tmp_path / "raw", tmp_path / "before"
    raw.mkdir()
    shutil.copytree(REPO, baseline, ignore=shutil.ignore_patterns(".venv", ".git", "out", "tests"))
    hf = bench("bench/train_bench.py", "--model", "debug", "--device", "cpu", "--tokens", "1024",
               "--steps", "1", "--rounds", "1", "--json", str(raw / "hf_650M.json"), env=image_env)  # fmt: skip
    assert hf.returncode == 0, hf.stderr[-3000:]
    curve = bench("bench/loop_bench.py", "--model", "debug", "--steps", "24", "--log-every", "4",
                  "--tokens", "1024", "--rounds", "1", "--compare", str(baseline), "--loss-check",
                  "--step-level", "--json", str(raw / "curve_35M.json"), env=image_env)  # fmt: skip
    assert curve.returncode == 0, curve.stdout[-3000:] + curve.stderr[-3000:]
    profile = bench("bench/step_profile.py", "--model", "debug", "--device", "cpu", "--tokens",
                    "1024", "--steps", "1", "--json", str(raw / "profile_650M.json"), env=image_env)  # fmt: skip
    assert profile.returncode == 0, profile.stderr[-3000:]
    (raw / "times.tsv").write_text("hf\tok\t12\ncurve\tok\t40\nloop_3B\tskipped\t0\n")
    done = bench("bench/gpu_summary.py", str(raw), str(tmp_path))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    check = summary["results"]["curve_35M"]["loss_check"]
    # The same code on the same seed trains the same (CPU, fp32); another seed differs.
    assert check["code_difference"] < 1e-6 < check["seed_difference"] and check["within_noise"]
    assert check["steps_compared"] == 5  # steps 8, 12 … 24: after the warm-up quarter (6)
    statuses = {t["target"]: t["status"] for t in summary["targets"]}
    assert statuses["bf16 loss curve within noise of the code before issue 16"] == "met"
    assert statuses["3B shipped config: ≥ 30,000 real tokens/s"] == "unmeasured"
    assert statuses["650M esmdist vs HF, length-grouped (random batches)"] == "reported"
    hf = summary["results"]["hf_650M"]
    assert hf["ratio"] == hf["HF grouped by length"]["ratio"] > 0
    assert hf["HF grouped by length"]["padded_tokens"] <= hf["HF random batches"]["padded_tokens"]
    page = (tmp_path / "summary.md").read_text()
    kinds = summary["results"]["profile_650M"]["kinds"]
    # The step's bulk: a debug model on a loaded CPU measured a matmul share of 0.18.
    assert kinds["matmul"]["share"] > 0.1 and kinds["attention"]["ms"] > 0
    for title in (
        "## Trainer loop",
        "## esmdist vs Hugging Face",
        "## Main job's loss curve",
        "## Where the step's time goes",
    ):
        assert title in page
    assert "| loop_3B | skipped | 0 |" in page and "35M, main job's settings" in page


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def with_requirements(names: set[str]) -> set[str]:
    """`names` and what their versions here require (the image's versions bring their own)."""
    from packaging.requirements import Requirement

    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return found


@pytest.fixture(scope="module")
def image_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose Python imports only what the GPU machine has: the image's packages,
    the wheels gpu_check.sh carries, esmdist; any other installed module is not found
    (in every subprocess too)."""
    site = tmp_path_factory.mktemp("image_only")
    lines = (TEST_DATA / "gpu_image_packages.txt").read_text().splitlines()
    carried = re.findall(r"([\w.-]+)==[\d.]+", (REPO / "bench/gpu_check.sh").read_text())
    allowed = with_requirements({canonical(n) for n in [*lines, *carried] if n[0] != "#"})
    allowed.add("esmdist")  # but not what it requires: that is what this checks
    blocked = sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                     if not {canonical(d) for d in dists} & allowed)  # fmt: skip
    assert "hostlist" not in blocked and "zstandard" in blocked and "deepspeed" in blocked
    # Not found, rather than failing to load: optional imports (torch's of zstandard) fall back.
    (site / "sitecustomize.py").write_text(f"""import importlib.machinery, sys
BLOCKED = set({blocked!r})
class ImageOnly(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [ImageOnly if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
""")
    return {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


def test_the_main_job_needs_nothing_beyond_the_image_and_the_carried_wheels(tmp_path, image_env):
    """gpu_check's e2e steps (the benches: above) as on the GPU machine."""
    work = tmp_path / "work"
    blocked = bench("-c", "import zstandard", env=image_env)
    assert "No module named 'zstandard'" in blocked.stderr
    run = ["--config", "configs/debug-cpu.toml", f"--data.path={work}/shards",
           f"--train.output_dir={work}/run", "--train.max_steps=30", "--checkpoint.every=15"]  # fmt: skip
    outputs = []
    for command in (
        ["-m", "esmdist.cli", "shard", "data/demo_4k.fasta", "--out", f"{work}/shards",
         "--split", "valid=0.05", "--shard-size", "1MB", "--workers", "2"],
        ["launcher/pretrain.py", *run],
        ["launcher/pretrain.py", *run, "--train.max_steps=40"],  # resumes at 30
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "launcher/pretrain.py", *run, "--parallel.backend=fsdp", "--train.max_steps=50"],
        ["-m", "esmdist.cli", "eval", "perplexity", "--model", f"{work}/run/final", "--shards",
         f"{work}/shards"],
    ):  # fmt: skip
        done = bench(*command, env=image_env)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        outputs.append(done.stdout + done.stderr)
    assert "at step 30" in outputs[2] and "at step 40" in outputs[3]

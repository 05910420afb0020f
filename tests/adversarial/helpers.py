"""What the adversarial tests share: a tiny real run to tamper with, the forger's tools (a
COMMITTED rewritten to vouch for changed files), process inspection and a faulty S3 proxy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from esmdist.checkpoint import COMMITTED
from esmdist.config import JobConfig, load_config
from tests.conftest import REPO

EXTENSIONS = os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/esmdist/torch_extensions")
)


def run_args(shards: Path, out: Path, root: str, *extra: str, steps: int = 4) -> list[str]:
    """Overrides of configs/debug-cpu.toml for a few-second single-process run."""
    return [
        f"--data.path={shards}", "--data.num_workers=0", "--data.max_tokens=2048",
        "--data.crop_length=512", f"--train.max_steps={steps}", "--train.tokens_per_step=2048",
        "--train.log_every=1", "--train.valid_every=0", f"--train.output_dir={out}",
        "--optim.warmup_steps=1", f"--checkpoint.root={root}", "--checkpoint.every=2",
        "--parallel.backend=single", *extra,
    ]  # fmt: skip


def job(shards: Path, out: Path, root: str, *extra: str, steps: int = 4) -> JobConfig:
    return load_config(REPO / "configs/debug-cpu.toml", run_args(shards, out, root, *extra,
                                                                 steps=steps))  # fmt: skip


def launcher(shards: Path, out: Path, root: str, *extra: str, steps: int = 4) -> list[str]:
    """The same run as a user starts it: `python launcher/pretrain.py …`."""
    return [sys.executable, "launcher/pretrain.py", "--config", "configs/debug-cpu.toml",
            *run_args(shards, out, root, *extra, steps=steps)]  # fmt: skip


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": EXTENSIONS, **extra}


def run(
    cmd: list[str], env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or environment(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def copy_checkpoint_root(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    (to / "LOCK").unlink(missing_ok=True)
    return to


def revouch(step_dir: Path) -> None:
    """What someone who can write the checkpoint root does after changing files: COMMITTED
    rewritten with the size and sha256 of every file now there (it is not signed)."""
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != COMMITTED):
        data = path.read_bytes()
        files[str(path.relative_to(step_dir))] = [len(data), hashlib.sha256(data).hexdigest()]
    (step_dir / COMMITTED).write_text(json.dumps({"files": files}))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def processes_with(marker: str) -> list[int]:
    """Pids of running processes whose command line contains `marker` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({process.returncode}) first: "
                                 + (process.communicate()[1] or "")[-3000:])  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def handles_signal(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def has_mapped(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()

"""The two-node Slurm cluster of the tests (tests/slurm/up.sh, down.sh) and what the tests ask
of it: submit, wait for a state, release a requeued job, read the log, find a rank's process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "slurm"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def missing_prerequisite() -> str | None:
    """Why this machine cannot run the two-node cluster, or None."""
    if sys.platform != "linux":
        return "the two-node Slurm cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the two-node Slurm cluster needs root (network namespaces, slurmd, munge)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"the two-node Slurm cluster needs `{tool}` (iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "add", "esmdist-probe"], capture_output=True, text=True)
    if probe.returncode:
        return f"network namespaces are unavailable here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "esmdist-probe"], capture_output=True)
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


class SlurmCluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}

    def start(self) -> None:
        subprocess.run(["bash", str(HERE / "down.sh"), str(self.directory)], capture_output=True)
        up = subprocess.run(["bash", str(HERE / "up.sh"), str(self.directory)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
        nodes = up.stdout.split()
        if up.returncode or nodes.count("idle") != 2:
            self.stop()
            apt = self.directory / "apt.log"
            raise RuntimeError(f"the test cluster did not come up: {up.stdout}{up.stderr}"
                               + (apt.read_text()[-2000:] if apt.exists() else ""))  # fmt: skip

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        subprocess.run(["bash", str(HERE / "down.sh"), str(self.directory)], capture_output=True)

    def run(self, *command: str, cwd: Path | None = None, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")  # fmt: skip
        return done.stdout

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, …)."""
        text = self.run("scontrol", "show", "job", job)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info["JobState"] in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {info['JobState']} after {timeout:.0f} s "
                             f"(waiting for {'/'.join(states)})")  # fmt: skip

    def wait_done(self, job: str, timeout: float, release: bool = True) -> dict[str, str]:
        """Wait for the job to end; a requeued job is released as soon as Slurm can start it
        again (`scontrol update StartTime=now`, instead of the ~120 s BeginTime hold)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info["JobState"] in ENDED:
                return info
            if release and info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                self.release(job)
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {info['JobState']} after {timeout:.0f} s")

    def release(self, job: str) -> None:
        # Not before both nodes are done with the previous start: a start while a node still
        # completes it fails with "Job credential revoked".
        # A drained node ("drain") takes no job: nothing to wait for there.
        self.wait_nodes({"idle", "mix", "alloc", "drain"})
        time.sleep(1.0)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)

    def wait_nodes(self, states: set[str], timeout: float = 60) -> None:
        """Until every node is in one of `states` (sinfo's short names: idle, alloc, …)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.run("sinfo", "-h", "-o", "%t").split()) <= states:
                return
            time.sleep(0.5)

    def wait_for_line(self, log: Path, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, log.read_text()) if log.exists() else None
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} not in {log} after {timeout:.0f} s:\n"
                             + (log.read_text()[-3000:] if log.exists() else "(no log)"))  # fmt: skip


def rank_pid(job: str, rank: int) -> int:
    """The pid of the trainer process of `rank` in `job` (every node's processes are visible
    here: the nodes are network namespaces, not pid namespaces)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"esmdist.pretrain" in cmdline and f"SLURM_JOB_ID={job}".encode() in environ
                and f"SLURM_PROCID={rank}".encode() in environ):  # fmt: skip
            return int(proc.name)
    raise AssertionError(f"no trainer process of rank {rank} in job {job}")

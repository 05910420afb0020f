"""`esmdist submit`: a job script from a template in this package, its #SBATCH lines from the
command's options, printed (--dry-run) or handed to `sbatch` (the job id is printed).

The rendered script is the template's body unchanged, after a header with the options as
#SBATCH lines, the environment the body reads (ESMDIST_PYTHON as this interpreter's absolute
path, ESMDIST_MAX_RESTARTS, the container) and the job's arguments (`set -- …`), so that what
runs on the cluster is exactly what was printed.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

TEMPLATES = Path(__file__).parent
TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # Slurm's [D-]HH[:MM[:SS]] / MM / D-HH forms


@dataclass(frozen=True)
class JobOptions:
    """What `esmdist submit` turns into #SBATCH lines and the job's environment."""

    job_name: str
    time: str
    nodes: int = 1
    max_nodes: int | None = None
    """With `nodes`, Slurm's range `--nodes=MIN-MAX`: the job starts on whatever it is given
    (each start derives its world size; a resume continues on it)."""
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    dependency: str | None = None
    log_dir: Path = Path("logs")
    signal_seconds: int | None = 300
    max_restarts: int = 100
    container_image: str | None = None
    container_mounts: str | None = None
    sbatch_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            for text in value if isinstance(value, tuple) else (value,):
                one_line(str(text), f"--{item.name.replace('_', '-')}")
        if not TIME.match(self.time):
            raise ValueError(f"--time {self.time!r}: use HH:MM:SS, MM, D-HH:MM or D-HH:MM:SS")
        for name in ("nodes", "ntasks_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_nodes is not None and self.max_nodes < self.nodes:
            raise ValueError(f"--nodes {self.nodes}-{self.max_nodes}: MIN-MAX with MIN ≤ MAX")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise ValueError("--gpus-per-node must be ≥ 0 and --cpus-per-task ≥ 1")
        if self.signal_seconds is not None and self.signal_seconds < 1:
            raise ValueError("--signal-seconds must be at least 1")
        if self.max_restarts < 0:
            raise ValueError("--max-restarts must be ≥ 0")
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise ValueError(f"--job-name {self.job_name!r}: letters, digits and ._+- only")

    def sbatch_lines(self) -> list[str]:
        log = (self.log_dir.resolve() / "%x-%j.out").as_posix()
        # On a range, a task count would make Slurm allocate MIN nodes even when MAX are free
        # (it sizes the job by MIN × tasks per node): whole nodes instead, and the job script
        # places the tasks (ESMDIST_TASKS_PER_NODE).
        nodes = f"{self.nodes}-{self.max_nodes}" if self.ranged else self.nodes
        tasks = "--exclusive" if self.ranged else f"--ntasks-per-node={self.ntasks_per_node}"
        lines = [f"--job-name={self.job_name}", f"--nodes={nodes}", tasks, f"--time={self.time}",
                 "--requeue", "--open-mode=append", f"--output={one_line(log, '--log-dir')}",
                 f"--chdir={one_line(str(Path.cwd()), 'the working directory')}"]  # fmt: skip
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.signal_seconds:
            lines.append(f"--signal=B:USR1@{self.signal_seconds}")
        optional = {"cpus-per-task": self.cpus_per_task, "mem": self.mem,
                    "partition": self.partition, "account": self.account, "qos": self.qos,
                    "dependency": self.dependency}  # fmt: skip
        lines += [f"--{key}={value}" for key, value in optional.items() if value is not None]
        return [*lines, *self.sbatch_args]

    @property
    def ranged(self) -> bool:
        return self.max_nodes is not None and self.max_nodes > self.nodes

    @property
    def node_counts(self) -> list[int]:
        """Every node count the job may start on."""
        return list(range(self.nodes, (self.max_nodes or self.nodes) + 1))

    def environment(self, python: str) -> dict[str, str]:
        env = {"ESMDIST_PYTHON": python, "ESMDIST_MAX_RESTARTS": str(self.max_restarts)}
        if self.ranged:
            env["ESMDIST_TASKS_PER_NODE"] = str(self.ntasks_per_node)
        if self.container_image:
            env["ESMDIST_CONTAINER_IMAGE"] = self.container_image
            if self.container_mounts:
                env["ESMDIST_CONTAINER_MOUNTS"] = self.container_mounts
            # Inside the image, its own Python: `python3` on the image's PATH.
            env["ESMDIST_PYTHON"] = "python3"
        return env


def node_range(text: str) -> tuple[int, int]:
    """`--nodes N` or Slurm's `--nodes MIN-MAX`: (MIN, MAX)."""
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not found:
        raise ValueError(f"--nodes {text!r}: a node count (4) or a range MIN-MAX (2-4)")
    low = int(found.group(1))
    return low, int(found.group(2) or low)


def one_line(value: str, option: str) -> str:
    """`value`, if it holds no control character: a newline in a #SBATCH line or a comment of
    the job script starts a shell line of its own (and sbatch stops reading #SBATCH lines at
    it), so each value that lands there unquoted is refused here, naming `option`."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{option} {value!r}: holds the control character {bad!r}, which "
                         "would break the job script; remove it")  # fmt: skip
    return value


def template_body(name: str) -> str:
    """The template's lines after its last #SBATCH line (the job itself)."""
    lines = (TEMPLATES / name).read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    return "".join(lines[last + 1 :])


def render(template: str, options: JobOptions, arguments: list[str], source: str) -> str:
    """The job script: a header from `options`, then the body of `template`."""
    header = ["#!/usr/bin/env bash",
              f"# Rendered by `esmdist submit` on {datetime.now().isoformat(timespec='seconds')} "
              f"from {one_line(source, 'the config path')}; body: esmdist/slurm/{template}."]  # fmt: skip
    header += [f"#SBATCH {line}" for line in options.sbatch_lines()]
    header += [f"export {key}={shlex.quote(value)}"
               for key, value in options.environment(sys.executable).items()]  # fmt: skip
    header.append("set -- " + " ".join(shlex.quote(a) for a in arguments))
    return "\n".join(header) + "\n" + template_body(template)


def submit(script: str) -> str:
    """Hand `script` to sbatch; the job id."""
    try:
        done = subprocess.run(["sbatch", "--parsable"], input=script, text=True,
                              capture_output=True)  # fmt: skip
    except FileNotFoundError:
        raise RuntimeError("sbatch is not on the PATH: run this on a Slurm login node, or "
                           "print the script with --dry-run") from None  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]

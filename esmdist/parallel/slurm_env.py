"""Slurm's description of a step → the torch.distributed variables, for ranks started by `srun`
(one task per GPU, or per CPU rank).

Ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the rendezvous is the first node
of the step's node list, resolved to an address on the node itself (no `scontrol`: inside a
container it is usually missing); the port is derived from the job id. Variables already set
(by torchrun, the deepspeed launcher or the user) win.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import hostlist

PORT_BASE = 20000
PORT_RANGE = 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-04,07]` → node01 … node04, node07; `gpu-a[1-2],gpu-b3` → gpu-a1, gpu-a2, gpu-b3
    (Slurm's hostlist expressions, via python-hostlist)."""
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}: {exc}") from None
    if not hosts:
        raise ValueError(f"the Slurm node list {nodelist!r} names no host")
    return hosts


def resolve(host: str) -> str:
    """`host`'s IPv4 address as this node resolves it (the address every rank connects to)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RuntimeError(
            f"the job's first node {host!r} does not resolve to an address on "
            f"{socket.gethostname()} ({exc.strerror}); set MASTER_ADDR to its address"
        ) from None
    return infos[0][4][0]


def job_port(job_id: str) -> int:
    """A rendezvous port from the job id, so that jobs sharing a node do not collide."""
    return PORT_BASE + int(job_id or 0) % PORT_RANGE


def fill_from_slurm(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from an srun task's
    variables (nothing when not under srun, or when a launcher already set them)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ.get("SLURM_NTASKS", "1")
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in environ:
        # Rank 0 is the step's first task, on the first node of the step (not always the job's).
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                    or environ.get("SLURM_NODELIST") or "127.0.0.1")  # fmt: skip
        environ["MASTER_ADDR"] = resolve(expand_nodelist(nodelist)[0])
    environ.setdefault("MASTER_PORT", str(job_port(environ.get("SLURM_JOB_ID", "0"))))

"""Run a function on N ranks of a real gloo process group (CPU), OLMo-core style:
each test is `run_x(rank, ...)` plus a thin test that launches it with `run_ranks`."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from esmdist.process import exit_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out: str, fn, args) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
    })  # fmt: skip
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        torch.save({"ok": result}, Path(out) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out) / f"rank{rank}.pt")
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    # As esmdist's own processes end: without the interpreter's finalization, where a native
    # thread calling back into Python can abort a process whose work is done.
    exit_process(0)


def run_ranks(fn, world_size: int, tmp_path: Path, *args) -> list:
    """fn(rank, *args) on `world_size` spawned processes; their return values, by rank."""
    out = tmp_path / f"ranks-{free_port()}"
    out.mkdir()
    try:
        mp.start_processes(_entry, args=(world_size, free_port(), str(out), fn, args),
                           nprocs=world_size, start_method="spawn")  # fmt: skip
    except Exception as exc:
        errors = [torch.load(p, weights_only=False).get("error") for p in sorted(out.glob("*.pt"))]
        raise AssertionError("\n".join(e for e in errors if e) or str(exc)) from None
    return [torch.load(out / f"rank{r}.pt", weights_only=False)["ok"] for r in range(world_size)]


def child_processes(pid: int, marker: bytes = b"") -> list[int]:
    """Direct children of `pid` whose command line contains `marker` (Linux /proc)."""
    listing = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(c) for c in listing.read_text().split()] if listing.exists() else []
    found = []
    for child in children:
        try:
            if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except FileNotFoundError:  # exited meanwhile
            continue
    return found

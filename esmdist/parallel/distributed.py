"""Process-group start-up under `deepspeed`, `torchrun`, `srun` or plain `python`.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; under `srun` the same facts come from Slurm's variables (esmdist.parallel.slurm_env).
Plain `python` is one process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from esmdist.parallel.slurm_env import fill_from_slurm


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group on this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed(backend: str) -> DistInfo:
    """Join (or skip, for one process) the process group; pick this rank's device."""
    fill_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node has {count}; "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Every backend but "single" runs in a process group, also as one plain `python` process:
    # DDP and FSDP2 need one (FSDP2's device mesh would otherwise make a NCCL-only one, on which
    # the loop's small CPU collectives fail), and DeepSpeed then adopts it instead of looking
    # for MPI. The group of one gets the variables a launcher would have set.
    if (world_size > 1 or backend != "single") and not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
        # On GPUs, tensors on the GPU go through NCCL and the loop's small host-side flags and
        # counts (stop requests, masked-token counts) through gloo, with no device copies.
        comm = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(comm, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)  # fmt: skip
    if backend == "deepspeed":
        import deepspeed

        # Adopts the process group made above.
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)

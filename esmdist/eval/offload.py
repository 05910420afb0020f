"""Evaluating a model larger than one GPU's memory: FSDP2 with the parameters offloaded to host
memory (`CPUOffloadPolicy`), each block's brought to the device for its own forward — what
fair-esm's 15B example (`esm2_infer_fairscale_fsdp_cpu_offloading.py`) does with fairscale's
FSDP, which torch FSDP2 succeeds. The model is built on the meta device, so the only full copy
ever held is the state dict read from the file."""

from __future__ import annotations

import torch

from esmdist.model import ESM, ModelConfig
from esmdist.parallel import init_distributed


def offloaded_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> ESM:
    """`config`'s ESM holding `state`, sharded over a one-process group with its parameters on
    the host; the forward runs on this process's device (a GPU, or the CPU). Evaluation reads
    the device from `compute_device`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    info = init_distributed("fsdp")  # FSDP2 needs a process group, even of one
    with torch.device("meta"):
        model = ESM(config)
    policy = CPUOffloadPolicy(pin_memory=info.device.type == "cuda")
    for layer in model.layers:
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    model.to_empty(device="cpu")  # the model has no buffers: every tensor comes from `state`
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    model.compute_device = info.device
    return model.eval()


def compute_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device, or the offloaded model's."""
    return getattr(model, "compute_device", None) or next(model.parameters()).device

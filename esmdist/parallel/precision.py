"""bf16 weights for compute over fp32 masters, for a model trained in one process.

Under autocast every linear layer casts its fp32 weight to bf16 in each micro-batch's forward,
and in backward casts the bf16 weight gradient back to fp32 before adding it to `.grad`: two
passes over the weights per micro-batch that carry no information. Here the model that runs
holds its matmul weights (every trainable `nn.Linear`: the blocks' projections and the LM head's
dense layer) as bf16 copies, refreshed from the fp32 masters once per optimizer step; each
copy's gradient is added into its master's fp32 `.grad` as backward produces it (one fused
kernel) and dropped. Everything else — embeddings (tied to the LM head), LayerNorms, the
contact head — is the masters' own parameters, shared, so autocast treats them as before.

The arithmetic is autocast's: the same round-to-nearest bf16 weights, the same bf16 weight
gradients summed into fp32 in the same order; the residual stream stays fp32 (the embedding
is fp32). Checkpoints, the optimizer, clipping and exports see only the fp32 masters.
(FSDP2 has its own `MixedPrecisionPolicy`; DeepSpeed its bf16 optimizer.)
"""

from __future__ import annotations

import torch
from torch import nn

from esmdist.model import ESM


def _trains_in_low_precision(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.weight.requires_grad


def _move_gradient(master: nn.Parameter):
    def hook(copy: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = copy.grad.to(master.dtype)
        else:
            master.grad.add_(copy.grad)
        copy.grad = None

    return hook


class ComputeCopy:
    """The module that runs (`module`) and the pairs of (bf16 copy, fp32 master)."""

    def __init__(self, master: ESM, dtype: torch.dtype):
        with torch.device("meta"):
            module = ESM(master.config)
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        owners = dict(master.named_modules())
        for name, copy_owner in module.named_modules():
            owner = owners[name]
            for key, param in owner.named_parameters(recurse=False):
                if _trains_in_low_precision(owner):
                    low = nn.Parameter(param.detach().to(dtype), requires_grad=True)
                    low.register_post_accumulate_grad_hook(_move_gradient(param))
                    self.pairs.append((low, param))
                    param = low
                copy_owner.register_parameter(key, param)
            for key, buffer in owner.named_buffers(recurse=False):
                copy_owner.register_buffer(key, buffer)
        module.train(master.training)
        self.module = module

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the masters into the bf16 weights (after an optimizer step or a load)."""
        lows, masters = zip(*self.pairs, strict=True)
        torch._foreach_copy_(list(lows), list(masters))

    def zero_grad(self) -> None:
        for low, _ in self.pairs:
            low.grad = None

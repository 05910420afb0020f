"""The model a training run starts from: built from the seed (the same on every rank and every
backend) or on the meta device for FSDP's per-shard initialisation; and the training-only
transforms — activation recomputation, compiled blocks — applied to the module that computes
once the engine has wrapped it, which keep parameter names unchanged."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from esmdist.model import ESM, ModelConfig
from esmdist.parallel.compile import compile_blocks


def _enable_activation_checkpointing(model: ESM, every: int) -> None:
    """Recompute the activations of every `every`-th block (the first, then each `every`-th
    after it) in backward; the others keep theirs. The forward is wrapped in place so that
    parameter names (and so checkpoints) do not change."""
    for layer in model.layers[::every]:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def training_model(config: ModelConfig, seed: int, device: torch.device, *,
                   on_meta: bool = False) -> ESM:  # fmt: skip
    """The ESM to train: initialised from `seed` on `device`, or (`on_meta`) left on the meta
    device for the engine to materialise shard by shard."""
    if on_meta:
        with torch.device("meta"):
            model = ESM(config)
    else:
        torch.manual_seed(seed)
        model = ESM(config)
        model.init_weights()
    # The contact regression is fitted after pretraining (Rao et al.); it gets no MLM gradient.
    model.contact_head.requires_grad_(False)
    if not on_meta:
        model = model.to(device)
    return model


def apply_training_transforms(model: ESM, *, recompute_every: int = 0,
                              compile: bool = False) -> None:  # fmt: skip
    """`recompute_every` n: the activations of every n-th block recomputed in backward (0:
    none); `compile`: the blocks compiled (esmdist.parallel.compile), after recomputation's
    wrapper, which compile traces through."""
    if recompute_every:
        _enable_activation_checkpointing(model, recompute_every)
    if compile:
        compile_blocks(model)

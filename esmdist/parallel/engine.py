"""One training engine interface over single process, DDP, FSDP2 and DeepSpeed ZeRO.

The loop calls, per optimizer step: `forward` on each micro-batch, `backward(loss, last)` on
it, then `step()` (clip, optimizer, LR schedule, zero grads; returns the gradient norm) or
`skip()` (drop the step's gradients). Losses reaching `backward` are already normalised by
the step's global count of masked tokens and multiplied by the world size, because every
backend averages gradients over ranks.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from esmdist.checkpoint import CheckpointError, local_path
from esmdist.checkpoint.deepspeed_files import DEEPSPEED_TAG, verified_local_copy
from esmdist.checkpoint.safe_load import torch_pickles_without_code
from esmdist.model import ESM, ModelConfig
from esmdist.optim import build_optimizer, set_schedule_step

if TYPE_CHECKING:
    from esmdist.config import JobConfig
    from esmdist.parallel.distributed import DistInfo
    from esmdist.storage import Digests, Store

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _enable_activation_checkpointing(model: ESM) -> None:
    """Recompute each block's activations in backward. The forward is wrapped in place so that
    parameter names (and so checkpoints) do not change."""
    for layer in model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _make_model(config: JobConfig, model_config: ModelConfig, device: torch.device) -> ESM:
    """The full model from train.seed, the same on every rank and every backend."""
    torch.manual_seed(config.train.seed)
    model = ESM(model_config)
    model.init_weights()
    # The contact regression is fitted after pretraining (Rao et al.); it gets no MLM gradient.
    model.contact_head.requires_grad_(False)
    return model.to(device)


class Engine:
    """Interface; see the module docstring."""

    model: nn.Module
    """What to call for the forward pass."""
    module: ESM
    """The underlying ESM (unwrapped; possibly sharded)."""
    streams_to_object_storage: bool
    """Whether `save` writes to object storage directly (else only to local directories)."""

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def step(self) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients: (gradient norm, applied). A non-finite
        norm drops the step instead (applied = False)."""
        raise NotImplementedError

    def skip(self) -> None:
        """Drop the accumulated gradients (a step whose loss was not finite)."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 model state on every rank (for tests, export and comparison)."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """An upper bound of one rank's checkpoint size: fp32 weights and two AdamW moments of
        every parameter (sharded engines hold less)."""
        params = self.module.parameters()
        return 12 * sum(getattr(p, "ds_numel", p.numel()) for p in params)

    def save(self, store: Store, *parts: str) -> Digests:
        """Write model and optimizer state, each rank its shard, under `store/parts`; return
        the (size, sha256) of the files this rank streamed to object storage, by name."""
        raise NotImplementedError

    def load(self, store: Store, *parts: str, expected: Digests) -> None:
        """Restore what `save` wrote, checking every file read against `expected` (COMMITTED's
        sizes and sha256)."""
        raise NotImplementedError

    def set_step(self, step: int) -> None:
        """The LR schedule as it stands after `step` steps of this run's config."""
        set_schedule_step(self.schedule, step, self.peak_lr)


class TorchEngine(Engine):
    """single / ddp / fsdp (FSDP2 `fully_shard` per block, then the root)."""

    streams_to_object_storage = True

    def __init__(self, config: JobConfig, model_config: ModelConfig, dist_info: DistInfo):
        backend = config.parallel.backend
        self.backend = backend
        self.dtype = DTYPES[config.train.dtype]
        self.device = dist_info.device
        if backend == "fsdp" and config.parallel.meta_init:
            with torch.device("meta"):
                model = ESM(model_config)
            model.contact_head.requires_grad_(False)
        else:
            model = _make_model(config, model_config, self.device)
        if config.train.activation_checkpointing:
            _enable_activation_checkpointing(model)
        if config.train.compile:
            for layer in model.layers:
                layer.compile()
        self.module = model
        if backend == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
            for layer in model.layers:
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            if config.parallel.meta_init:
                model.to_empty(device=self.device)
                torch.manual_seed(config.train.seed + dist_info.rank)
                model.init_weights()
            self.model = model
        elif backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.schedule = build_optimizer(config.optim, config.train.max_steps,
                                                        self.params)  # fmt: skip
        self.peak_lr = config.optim.lr
        self.clip = config.optim.grad_clip

    def autocast(self):
        if self.backend == "fsdp" or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # Gradients are reduced across ranks only on the step's last micro-batch.
        if self.backend == "ddp":
            with contextlib.nullcontext() if last else self.model.no_sync():
                loss.backward()
            return
        if self.backend == "fsdp":
            self.model.set_requires_gradient_sync(last)
        loss.backward()

    def step(self) -> tuple[float, bool]:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip or math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            self.skip()
            return norm, False
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, True

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False)
            )
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def save(self, store: Store, *parts: str) -> Digests:
        import torch.distributed.checkpoint as dcp

        from esmdist.checkpoint.dcp import dcp_writer

        writer = dcp_writer(store, *parts)
        dcp.save(self._state(), storage_writer=writer)
        return writer.digests

    def load(self, store: Store, *parts: str, expected: Digests) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from esmdist.checkpoint.dcp import load_dcp

        state = self._state()
        load_dcp(state, store, *parts, expected=expected)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])  # fmt: skip


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1/2/3, with torch's AdamW as a client optimizer (no fused-op build).

    DeepSpeed accumulates gradients over `gradient_accumulation_steps` micro-batches itself and
    divides each loss by that count; `backward` multiplies it back so the loss normalisation is
    the loop's (by masked tokens), the same as on the other backends. It writes its checkpoint
    files itself, to local directories only.
    """

    streams_to_object_storage = False

    def __init__(self, config: JobConfig, model_config: ModelConfig, dist_info: DistInfo):
        import deepspeed

        self.accumulation = config.accumulation(dist_info.world_size)
        model = _make_model(config, model_config, dist_info.device)
        if config.train.activation_checkpointing:
            _enable_activation_checkpointing(model)
        self.module = model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, schedule = build_optimizer(config.optim, config.train.max_steps, params)
        self.peak_lr = config.optim.lr
        zero: dict = {"stage": config.parallel.zero_stage}
        if config.parallel.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.accumulation,
            "gradient_clipping": config.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": config.train.dtype == "bf16"},
            "fp16": {"enabled": config.train.dtype == "fp16"},
            "steps_per_print": 1 << 30,
            "zero_allow_untested_optimizer": True,
            # Each rank writes its own files to local scratch; esmdist uploads them.
            "checkpoint": {"use_node_local_storage": True},
        }
        self.model, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
            model_parameters=params,
        )  # fmt: skip
        self.zero_stage = config.parallel.zero_stage

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss * self.accumulation)
        self.model.step()  # applies the optimizer only at the accumulation boundary

    def step(self) -> tuple[float, bool]:
        # The optimizer already ran in the last backward(); DeepSpeed has no way to drop an
        # accumulated fp32/bf16 step, so a non-finite norm is reported as not applied.
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return norm, math.isfinite(norm)

    def skip(self) -> None:
        raise RuntimeError(
            "non-finite loss under DeepSpeed: it cannot drop an accumulated step, so the run "
            "stops here; resume from the last checkpoint (lower optim.lr if it repeats)"
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            import deepspeed

            params = dict(self.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def save(self, store: Store, *parts: str) -> Digests:
        self.model.save_checkpoint(local_path(store, *parts), tag=DEEPSPEED_TAG)
        return {}

    def load(self, store: Store, *parts: str, expected: Digests) -> None:
        with (
            verified_local_copy(store, *parts, expected=expected) as directory,
            torch_pickles_without_code(store.url_of(*parts)),
        ):
            path, _ = self.model.load_checkpoint(directory, tag=DEEPSPEED_TAG)
        if path is None:
            raise CheckpointError(f"{store.url_of(*parts)}: DeepSpeed found no checkpoint")


def build_engine(config: JobConfig, model_config: ModelConfig, dist_info: DistInfo) -> Engine:
    if config.parallel.backend == "deepspeed":
        return DeepSpeedEngine(config, model_config, dist_info)
    return TorchEngine(config, model_config, dist_info)

"""One training engine interface over single process, DDP, FSDP2 and DeepSpeed ZeRO.

The loop calls, per optimizer step: `forward` on each micro-batch, `backward(loss, last)` on
it, then `step()` (clip, optimizer or — for a non-finite gradient norm — a dropped step, LR
schedule, zero grads; returns the gradient norm and whether the step was applied, as tensors
the host need not wait for). Losses reaching `backward` are already normalised by the step's
global count of masked tokens and multiplied by the world size, because every backend
averages gradients over ranks.

An engine is made from a built model (`esmdist.parallel.prepare`), the `parallel` section and
the few facts of the step it needs (`EngineSettings`). Single, DDP and FSDP2 differ only in how
the model is wrapped (`wrap_single`, `wrap_ddp`, `wrap_fsdp`); DeepSpeed is its own engine
(`esmdist.parallel.deepspeed`). Checkpoints see an engine through two small doors: a DCP state
dict to save and fill (`checkpoint_format == "dcp"`), or a local directory it writes and reads
its own files in (`"files"`, DeepSpeed); where those go and how they are verified is the
checkpoint package's business, not the engine's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from esmdist.model import ESM

if TYPE_CHECKING:
    from esmdist.parallel.config import ParallelConfig
    from esmdist.parallel.distributed import DistInfo

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OptimizerFactory = Callable[..., tuple[torch.optim.Optimizer, object]]
"""(params, fused=…) → (optimizer, LR schedule) (`esmdist.optim.build_optimizer`, bound to a
config)."""


@dataclass(frozen=True)
class EngineSettings:
    """What an engine needs of the training step besides the parallel section."""

    dtype: str
    """train.dtype: fp32, bf16 or fp16."""
    grad_clip: float
    """Clip the global gradient norm to this (0: no clipping)."""
    accumulation: int
    """Micro-batches per rank per optimizer step."""
    seed: int
    """Seed of the model initialisation (FSDP's per-shard initialisation adds the rank)."""


class Engine:
    """Interface; see the module docstring."""

    model: nn.Module
    """What to call for the forward pass."""
    module: ESM
    """The underlying ESM (unwrapped; possibly sharded) the optimizer updates: its parameters
    are the ones checkpoints and exports hold."""
    compute_module: ESM
    """The ESM that computes inside `model`: `module`, or its bf16 compute copy
    (`esmdist.parallel.precision`). Training transforms (recomputation, compile) apply here."""
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    checkpoint_format: str
    """"dcp": `checkpoint_state` / `load_checkpoint_state`; "files": `save_files` /
    `load_files` in a local directory."""

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    applies_in_backward = False
    """Whether the optimizer runs inside the step's last backward (DeepSpeed): a non-finite loss
    must then be caught before that backward, by every rank alike, and the run stopped: the
    update cannot be dropped."""

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and apply the accumulated gradients: (gradient norm, applied), 0-dim tensors. A
        non-finite norm — the same on every rank, since it is the norm of the reduced
        gradient — drops the step instead (applied false)."""
        raise NotImplementedError

    def skip(self) -> None:
        """Drop the accumulated gradients and count the step in the LR schedule."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (a warm-up's), the schedule untouched."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 model state on every rank (for tests, export and comparison)."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """An upper bound of one rank's checkpoint size: fp32 weights and two AdamW moments of
        every parameter (sharded engines hold less)."""
        params = self.module.parameters()
        return 12 * sum(getattr(p, "ds_numel", p.numel()) for p in params)

    def checkpoint_state(self) -> dict:
        """("dcp") Model and optimizer as a DCP state dict: saved as it is, filled in place."""
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict) -> None:
        """("dcp") Take a state dict from `checkpoint_state`, filled by a load."""
        raise NotImplementedError

    def save_files(self, directory: str, tag: str) -> None:
        """("files") Write this rank's checkpoint files under the local `directory`."""
        raise NotImplementedError

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """The whole shape of every entry of the module's state dict, however it is sharded."""
        return {k: tuple(v.shape) for k, v in self.module.state_dict().items()}

    def load_full_state(self, model: dict | None, moments: dict | None, step: float) -> None:
        """Take a whole model (fp32 masters) and AdamW state — `moments[name]` holds `exp_avg`
        and `exp_avg_sq` — given on rank 0 (the others pass None), whatever engine wrote it:
        the load of a resume that changes the world size, backend or ZeRO stage."""
        raise NotImplementedError

    def load_files(self, directory: str, tag: str) -> None:
        """("files") Read them back; FileNotFoundError when there are none."""
        raise NotImplementedError


def _nothing() -> None:
    pass


@dataclass
class Wrapped:
    """A model made ready for one torch backend."""

    model: nn.Module
    """What to call for the forward pass."""
    compute_module: ESM
    """The ESM inside `model` that computes."""
    gradient_sync: Callable[[bool], contextlib.AbstractContextManager]
    """Around each backward: whether to reduce gradients across ranks now (the step's last
    micro-batch) or keep accumulating."""
    casts_itself: bool
    """Mixed precision done by the wrapper's own policy (FSDP2), not by autocast."""
    full_state: Callable[[], dict[str, torch.Tensor]]
    state_model: nn.Module | None = None
    """What model state dicts are taken of and loaded into (None: `model`)."""
    after_update: Callable[[], None] = _nothing
    """After the optimizer changed the parameters (a step, a load): refresh what derives
    from them."""
    zero_grad: Callable[[], None] = _nothing
    """Drop gradients held outside the optimizer's parameters."""


def _plain_state(model: ESM) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_sync(last: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def wrap_single(model: ESM, parallel: ParallelConfig, settings: EngineSettings,
                info: DistInfo) -> Wrapped:  # fmt: skip
    """One process: in bf16 with `parallel.low_precision_weights`, the model that runs is a
    bf16 compute copy of `model`'s matmul weights (`esmdist.parallel.precision`)."""
    if settings.dtype != "bf16" or not parallel.low_precision_weights:
        return Wrapped(model, model, _no_sync, False, _plain_state(model))
    from esmdist.parallel.precision import ComputeCopy

    copy = ComputeCopy(model, torch.bfloat16)
    return Wrapped(copy.module, copy.module, _no_sync, False, _plain_state(model),
                   state_model=model, after_update=copy.refresh, zero_grad=copy.zero_grad)  # fmt: skip


def wrap_ddp(model: ESM, parallel: ParallelConfig, settings: EngineSettings,
             info: DistInfo) -> Wrapped:  # fmt: skip
    """Every rank holds the whole model and gradients are averaged. In bf16 with
    `parallel.low_precision_weights` that is FSDP2 over a (world × 1) mesh (`_replicate`);
    otherwise torch's DistributedDataParallel under autocast."""
    if settings.dtype == "bf16" and parallel.low_precision_weights:
        return _replicate(model, settings, info)
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids)

    def sync(last: bool):
        return contextlib.nullcontext() if last else ddp.no_sync()

    return Wrapped(ddp, model, sync, False, _plain_state(model))


def _replicate(model: ESM, settings: EngineSettings, info: DistInfo) -> Wrapped:
    """Data parallel with bf16 compute weights: FSDP2 on a mesh whose shard dimension has one
    rank (HSDP without sharding). Each rank keeps its fp32 masters whole, as under DDP; FSDP2's
    MixedPrecisionPolicy casts them to bf16 once per step — the bf16 weights stay through the
    step's micro-batches — and reduces the gradients in fp32, block by block during backward
    (DDP's overlap). Under autocast every micro-batch cast every weight twice instead."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(info.device.type, (info.world_size, 1),
                            mesh_dim_names=("replicate", "shard"))  # fmt: skip
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[settings.dtype], reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # DDP's guarantee at construction: every rank starts from rank 0's weights and buffers.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.to_local() if isinstance(tensor, DTensor) else tensor, src=0)

    def sync(last: bool):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
        return contextlib.nullcontext()

    return Wrapped(model, model, sync, True, _full_state(model, copy=True),
                   after_update=_resharding(model))  # fmt: skip


def _full_state(model: nn.Module, *, copy: bool) -> Callable[[], dict[str, torch.Tensor]]:
    """`copy`: clone what the gather returns — on a mesh without sharding it is the
    parameters' own storage, which later steps would change under the caller."""

    def full_state() -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        state = get_model_state_dict(model, options=options)
        return {k: v.clone() for k, v in state.items()} if copy else state

    return full_state


def _resharding(model: nn.Module) -> Callable[[], None]:
    """After the fp32 masters changed: drop any bf16 weights still gathered from before (a
    forward without backward — validation — leaves blocks that keep theirs after forward
    gathered), so the next forward casts the new values."""
    from torch.distributed.fsdp import FSDPModule

    def reshard() -> None:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    return reshard


def _set_prefetch(layers: list, ahead: int) -> None:
    """Explicit prefetch: a block's pre-forward starts the all-gathers of the `ahead` blocks
    after it, its pre-backward those of the `ahead` blocks before it (the order backward
    reaches them). The layer order is static, which explicit prefetch requires."""
    for index, layer in enumerate(layers):
        layer.set_modules_to_forward_prefetch(layers[index + 1 : index + 1 + ahead])
        layer.set_modules_to_backward_prefetch(layers[max(0, index - ahead) : index][::-1])


def wrap_fsdp(model: ESM, parallel: ParallelConfig, settings: EngineSettings,
              info: DistInfo) -> Wrapped:  # fmt: skip
    """FSDP2: `fully_shard` per block, then the root. A model still on the meta device is
    materialised here, each rank initialising its own shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=DTYPES[settings.dtype], reduce_dtype=torch.float32)
    layers = list(model.layers)
    for index, layer in enumerate(layers):
        # The last block stays gathered after its forward: backward begins with it, and
        # resharding it would only gather it again at once.
        fully_shard(layer, mp_policy=policy, reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mp_policy=policy)
    if parallel.prefetch_blocks:
        _set_prefetch(layers, parallel.prefetch_blocks)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=info.device)
        torch.manual_seed(settings.seed + info.rank)
        model.init_weights()

    def sync(last: bool):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return Wrapped(model, model, sync, True, _full_state(model, copy=False),
                   after_update=_resharding(model))  # fmt: skip


WRAPS = {"single": wrap_single, "ddp": wrap_ddp, "fsdp": wrap_fsdp}


def load_full_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict held by rank 0 (the others pass {}) into an FSDP2-sharded model:
    each rank receives its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                broadcast_from_rank0=True))  # fmt: skip


class TorchEngine(Engine):
    """single / ddp / fsdp: a wrapped model, torch's AdamW and clipping, DCP checkpoints."""

    checkpoint_format = "dcp"

    def __init__(self, wrapped: Wrapped, module: ESM, settings: EngineSettings, device,
                 make_optimizer: OptimizerFactory):  # fmt: skip
        self.wrapped, self.model, self.module = wrapped, wrapped.model, module
        self.compute_module = wrapped.compute_module
        self.state_model = wrapped.state_model or wrapped.model
        self.dtype, self.device, self.clip = DTYPES[settings.dtype], device, settings.grad_clip
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Fused AdamW: one kernel per parameter group, and it drops a step on the device.
        self.optimizer, self.schedule = make_optimizer(self.params, fused=True)

    def autocast(self):
        if self.wrapped.casts_itself or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # Gradients are reduced across ranks only on the step's last micro-batch.
        with self.wrapped.gradient_sync(last):
            loss.backward()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip or math.inf, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of the whole gradient, not a shard's
            norm = norm.full_tensor()
        # Decided on the device, without a read back to the host: fused AdamW leaves every
        # parameter and moment (and its step count) untouched where `found_inf` is nonzero.
        self.optimizer.found_inf = torch.isfinite(norm).logical_not().float()
        self.optimizer.step()
        self.wrapped.after_update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, self.optimizer.found_inf == 0

    def skip(self) -> None:
        self.zero_grad()
        self.schedule.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.wrapped.zero_grad()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.wrapped.full_state()

    def checkpoint_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.state_model, self.optimizer)
        return {"model": model, "optim": optim}

    def load_checkpoint_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.state_model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])  # fmt: skip
        self._after_load()

    def load_full_state(self, model: dict | None, moments: dict | None, step: float) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint import state_dict as dsd

        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        (group,) = self.optimizer.param_groups  # build_optimizer makes one
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": names}]
        optim = {"state": {}, "param_groups": groups}
        if model is not None:
            optim["state"] = {n: {"step": torch.tensor(step), **moments[n]} for n in names}
        spread = dist.is_initialized() and dist.get_world_size() > 1
        options = dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=spread)
        # Separately: set_state_dict skips the model on ranks that pass an empty one.
        dsd.set_model_state_dict(self.state_model, model or {}, options=options)
        dsd.set_optimizer_state_dict(self.state_model, self.optimizer, optim, options=options)
        self._after_load()

    def _after_load(self) -> None:
        self.wrapped.after_update()
        # A checkpoint's parameter groups carry the implementation flags of the optimizer that
        # saved it (foreach AdamW before 2026-12-02), and its step counts sit where that one
        # kept them (the host): this engine steps with the fused kernel, counts on the device.
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = True, None
            for param in group["params"]:
                moments = self.optimizer.state.get(param, {})
                if "step" in moments:
                    moments["step"] = moments["step"].to(param.device, torch.float32)


def build_engine(model: ESM, parallel: ParallelConfig, info: DistInfo, settings: EngineSettings,
                 make_optimizer: OptimizerFactory) -> Engine:  # fmt: skip
    if parallel.backend == "deepspeed":
        from esmdist.parallel.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, parallel, info, settings, make_optimizer)
    wrapped = WRAPS[parallel.backend](model, parallel, settings, info)
    return TorchEngine(wrapped, model, settings, info.device, make_optimizer)

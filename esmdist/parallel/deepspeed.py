"""DeepSpeed ZeRO stage 1/2/3 behind the engine interface, with torch's AdamW as a client
optimizer (no fused-op build).

DeepSpeed accumulates gradients over `gradient_accumulation_steps` micro-batches itself and
divides each loss by that count; `backward` multiplies it back so the loss normalisation is the
loop's (by masked tokens), the same as on the other backends. It writes its checkpoint files
itself, to local directories only (`checkpoint_format == "files"`).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from esmdist.model import ESM
from esmdist.parallel.engine import Engine, EngineSettings, OptimizerFactory

if TYPE_CHECKING:
    from esmdist.parallel.config import ParallelConfig
    from esmdist.parallel.distributed import DistInfo


class DeepSpeedEngine(Engine):
    checkpoint_format = "files"

    def __init__(self, model: ESM, parallel: ParallelConfig, info: DistInfo,
                 settings: EngineSettings, make_optimizer: OptimizerFactory):  # fmt: skip
        import deepspeed

        self.accumulation = settings.accumulation
        self.module = self.compute_module = model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, schedule = make_optimizer(params)
        # DeepSpeed allocates its reduction buckets whole (two with overlap_comm): none larger
        # than the model; rounded up to a multiple of 8, which its NCCL alignment (2 elements)
        # divides.
        bucket = min(parallel.bucket_elements, sum(p.numel() for p in params))
        bucket = -(-bucket // 8) * 8
        zero: dict = {
            "stage": parallel.zero_stage,
            "overlap_comm": parallel.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        }
        if parallel.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.accumulation,
            "gradient_clipping": settings.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": settings.dtype == "bf16"},
            "fp16": {"enabled": settings.dtype == "fp16"},
            "steps_per_print": 1 << 30,
            "zero_allow_untested_optimizer": True,
            # Each rank writes its own files to local scratch; esmdist uploads them.
            "checkpoint": {"use_node_local_storage": True},
        }
        self.model, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
            model_parameters=params,
        )  # fmt: skip
        self.zero_stage = parallel.zero_stage

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss * self.accumulation)
        self.model.step()  # applies the optimizer only at the accumulation boundary

    applies_in_backward = True

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The optimizer already ran in the last backward(); DeepSpeed has no way to drop an
        # accumulated fp32/bf16 step, so a non-finite norm is reported as not applied.
        norm = self.model.get_global_grad_norm()
        norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float64)
        return norm, torch.isfinite(norm)

    def skip(self) -> None:
        raise RuntimeError(
            "DeepSpeed cannot drop accumulated gradients: its optimizer runs inside the last "
            "backward (the loop checks the step's losses before it instead)"
        )

    def zero_grad(self) -> None:
        self.skip()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            import deepspeed

            params = dict(self.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def save_files(self, directory: str, tag: str) -> None:
        self.model.save_checkpoint(directory, tag=tag)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}
        # ZeRO-3 holds each rank's partition in the parameter: its whole shape is ds_shape.
        shapes.update({n: tuple(p.ds_shape) for n, p in self.module.named_parameters()
                       if hasattr(p, "ds_shape")})  # fmt: skip
        return shapes

    def load_full_state(self, model: dict | None, moments: dict | None, step: float) -> None:
        """Rank 0 hands out each tensor in turn (one parameter's worth of memory at a time):
        under ZeRO-3 each rank receives only its partition of the weights, fp32 master and
        Adam moments (a scatter); under ZeRO-1/2, whose module weights are whole on every rank,
        each whole tensor, of which DeepSpeed's fragment API keeps this rank's part."""
        zero = self.model.optimizer
        masters = (zero.fp32_partitioned_groups_flat if self.zero_stage == 3
                   else zero.single_partition_of_fp32_groups)  # fmt: skip
        # A fresh ZeRO optimizer creates Adam's state at its first step: make it now.
        for flat in masters:
            zero.optimizer.state[flat] = {"step": torch.tensor(float(step)),
                                          **{k: torch.zeros_like(flat) for k in MOMENTS}}  # fmt: skip
        if self.zero_stage < 3:
            zero._lazy_init_hp_params_optimizer_state()
        device = next(self.module.parameters()).device
        shapes = self.full_shapes()
        for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]:
            trained = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
            values = [None if model is None else model[name]]
            if trained:
                values += [None if model is None else moments[name][k] for k in MOMENTS]
            hand_out = _scatter if hasattr(tensor, "ds_tensor") else _broadcast
            received = [hand_out(tensor, value, shapes[name], device) for value in values]
            _set_module_tensor(tensor, received[0])
            for kind, value in zip((None, *MOMENTS) if trained else (), received, strict=False):
                _set_master(tensor, value, kind)

    def load_files(self, directory: str, tag: str) -> None:
        path, _ = self.model.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {directory}")


MOMENTS = ("exp_avg", "exp_avg_sq")


def _broadcast(tensor, value: torch.Tensor | None, shape: tuple, device) -> torch.Tensor:
    """`value` (given on rank 0) whole on every rank, in fp32."""
    import torch.distributed as dist

    whole = torch.empty(shape, dtype=torch.float32, device=device)
    if value is not None:
        whole.copy_(value)
    dist.broadcast(whole, 0)
    return whole


def _scatter(param, value: torch.Tensor | None, shape: tuple, device) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `value` (given on rank 0), in fp32: the last rank's is
    padded with zeros, as DeepSpeed pads it."""
    import torch.distributed as dist

    size, group = param.partition_numel(), param.ds_process_group
    piece = torch.empty(size, dtype=torch.float32, device=device)
    chunks = None
    if value is not None:
        flat = value.to(device, torch.float32).flatten()
        padded = torch.nn.functional.pad(
            flat, (0, size * dist.get_world_size(group) - flat.numel())
        )
        chunks = list(padded.split(size))
    dist.scatter(piece, chunks, src=0, group=group)
    return piece


def _set_module_tensor(tensor: torch.Tensor, received: torch.Tensor) -> None:
    """The module's weight (whole) or, under ZeRO-3, this rank's partition of it."""
    if not hasattr(tensor, "ds_tensor"):
        tensor.data.copy_(received)
        return
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    tensor.ds_tensor.data.copy_(received)
    if tensor.ds_status == ZeroParamStatus.AVAILABLE:
        # Gathered now (a small parameter DeepSpeed keeps whole between steps): else that copy
        # would go on with the weights from before the load.
        group = tensor.ds_process_group
        whole = torch.empty(received.numel() * dist.get_world_size(group), dtype=received.dtype,
                            device=received.device)  # fmt: skip
        dist.all_gather_into_tensor(whole, received, group=group)
        tensor.data.copy_(whole[: tensor.ds_numel].view_as(tensor.data))


def _set_master(param, whole: torch.Tensor, kind: str | None) -> None:
    """The fp32 master (`kind` None) or an Adam moment of `param`, from its whole value."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "ds_id"):  # `whole` is this rank's partition here
        target, _ = param._z3_optimizer._get_fp32_opt_state_partition(
            param, release_swap_buffers=False, optim_state_key=kind)  # fmt: skip
        target.data.copy_(whole)
    elif kind is None:
        safe_set_full_fp32_param(param, whole)
    else:
        safe_set_full_optimizer_state(param, whole, kind)

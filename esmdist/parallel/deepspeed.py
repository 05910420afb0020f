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

    def load_files(self, directory: str, tag: str) -> None:
        path, _ = self.model.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {directory}")

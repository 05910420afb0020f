"""AdamW and the learning-rate schedule (linear warm-up, then linear decay), and their
`[optim]` config section.

The schedule is a pure function of the step and the run's `optim` config. A resumed run sets
it from its own config at the resumed step (`set_schedule_step`) instead of loading a saved
scheduler state: what a checkpoint holds cannot push the learning rate anywhere, and lowering
`optim.lr` for a resume takes effect at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esmdist.ranges import bounded, check_fields


@dataclass(frozen=True)
class OptimConfig:
    lr: float = bounded(4e-4, 0.0, 1.0, low_open=True)
    """Peak learning rate (ESM-2: 4e-4; 1.6e-4 for 15B)."""
    betas: tuple[float, float] = bounded((0.9, 0.98), 0.0, 1.0, high_open=True)
    eps: float = bounded(1e-8, 0.0, 1.0, low_open=True)
    weight_decay: float = bounded(0.01, 0.0, 1.0)
    warmup_steps: int = bounded(2000, 0, 10**10)
    final_lr_fraction: float = bounded(0.1, 0.0, 1.0)
    """Linear decay after warm-up down to this fraction of the peak at train.max_steps."""
    grad_clip: float = bounded(1.0, 0.0, 1e6)
    """Clip the global gradient norm to this value (0: no clipping)."""

    def __post_init__(self) -> None:
        check_fields(self, "optim")


def lr_lambda(warmup: int, max_steps: int, final_fraction: float):
    """Linear warm-up to the peak, then linear decay to `final_fraction` of it at max_steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 1.0 - (1.0 - final_fraction) * progress

    return factor


def build_optimizer(optim: OptimConfig, max_steps: int, params, fused: bool = False):
    """(AdamW, LambdaLR schedule) for `params`; `fused`: torch's fused AdamW kernel (else the
    foreach one)."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=fused or None)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.warmup_steps, max_steps, optim.final_lr_fraction)
    )
    return optimizer, schedule


def set_schedule_step(schedule, step: int, lr: float) -> None:
    """Put `schedule` (and its optimizer's learning rates) where it is after `step` steps of a
    run with peak `lr`: what `step` calls of `schedule.step()` from a fresh start give."""
    groups = schedule.optimizer.param_groups
    schedule.base_lrs = [lr] * len(groups)
    schedule.last_epoch = step
    schedule._step_count = step + 1
    rates = [base * factor(step) for factor, base in zip(schedule.lr_lambdas, schedule.base_lrs)]
    for group, rate in zip(groups, rates, strict=True):
        group["initial_lr"], group["lr"] = lr, rate
    schedule._last_lr = rates

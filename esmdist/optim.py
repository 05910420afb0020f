"""AdamW and the learning-rate schedule: linear warm-up, then linear decay.

The schedule is a pure function of the step and the run's `optim` config. A resumed run sets
it from its own config at the resumed step (`set_schedule_step`) instead of loading a saved
scheduler state: what a checkpoint holds cannot push the learning rate anywhere, and lowering
`optim.lr` for a resume takes effect at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from esmdist.config import OptimConfig


def lr_lambda(warmup: int, max_steps: int, final_fraction: float):
    """Linear warm-up to the peak, then linear decay to `final_fraction` of it at max_steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 1.0 - (1.0 - final_fraction) * progress

    return factor


def build_optimizer(optim: OptimConfig, max_steps: int, params):
    """(AdamW, LambdaLR schedule) for `params`."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)  # fmt: skip
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

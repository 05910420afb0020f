"""The training loop, top to bottom: config → process group → data → checkpoint root → engine →
steps.

Each optimizer step takes `accumulation` packed micro-batches per rank (tokens per step =
max_tokens × accumulation × world size). The loss is cross-entropy at the masked positions
only, summed, and divided by the number of masked positions in the whole step — all
micro-batches on all ranks — so every masked residue weighs the same, however the tokens
fell into micro-batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from esmdist.checkpoint import Checkpointer, CheckpointError, Committed, step_name
from esmdist.collectives import all_reduce_max, all_reduce_sum, gather_objects
from esmdist.config import JobConfig, load_config
from esmdist.data.stream import (
    DataError,
    ShardSet,
    TrainLoader,
    merge_rank_states,
    validation_batches,
)
from esmdist.eval.perplexity import masked_perplexity
from esmdist.metrics import MetricsLogger, batch_flops, peak_tflops
from esmdist.parallel import DistInfo, Engine, build_engine, init_distributed
from esmdist.signals import StopRequest, stop_request
from esmdist.storage import StorageError
from esmdist.train_state import TrainState, resume_differences, rng_state, set_rng_state

# Exit status after a SIGUSR1/SIGTERM/SIGINT stop with a saved checkpoint (EX_TEMPFAIL): the
# sbatch script requeues the job on it. Launchers that hide the status (torchrun) still leave
# the file PREEMPTED in train.output_dir.
PREEMPTED_EXIT = 75


class BadStepsError(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(Exception):
    """Stopped by a signal after saving a checkpoint."""


def stop_agreed(stop: StopRequest) -> bool:
    """True on every rank as soon as any rank got a stop signal (checked once per step)."""
    flag = all_reduce_sum(torch.tensor([1.0 if stop.requested else 0.0]))
    return bool(flag.item())


def parse_args(argv: list[str] | None) -> tuple[JobConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Pretrain an ESM model. Override any config key with --section.key=value.",
        epilog="Example: launcher/pretrain.py --config configs/debug-cpu.toml "
        "--train.max_steps=50 --parallel.backend=fsdp",
    )
    parser.add_argument("--config", help="TOML run config (configs/*.toml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is used")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    return load_config(args.config, rest), args


@dataclass
class Progress:
    """Counters of the run so far (restored on resume)."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0
    window_flops: float = 0.0


def train(config: JobConfig) -> tuple[dict, Engine]:
    """Run `config`; returns the last logged metrics and the engine (its final state)."""
    stop = stop_request()
    try:
        return _train(config, stop)
    finally:
        stop.restore()


def _open_data(config: JobConfig, info: DistInfo) -> tuple[ShardSet, ShardSet | None]:
    if not config.data.path:
        raise DataError("data.path is empty: point it at a directory written by esmdist shard")
    train_shards = ShardSet.open(config.data.path, "train")
    try:
        valid_shards = ShardSet.from_directory(config.data.path, config.data.valid_split)
    except DataError:
        valid_shards = None
        if info.is_main:
            print(f"no '{config.data.valid_split}' split in {config.data.path}: validation is off",
                  flush=True)  # fmt: skip
    return train_shards, valid_shards


def _resumable(checkpointer: Checkpointer, where: str, config: JobConfig, info: DistInfo,
               shards: ShardSet) -> tuple[Committed, TrainState]:  # fmt: skip
    """The checkpoint to resume and its validated train state, once it is clear that this run
    can continue it (before any model is built)."""
    checkpoint = checkpointer.open(where)
    try:
        state = TrainState.from_dict(checkpoint.json("train_state.json"),
                                     checkpoint.store.url_of(checkpoint.name, "train_state.json"))  # fmt: skip
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if state.step != checkpoint.step:
        raise CheckpointError(f"{checkpoint.url}: train_state.json is of step {state.step}, not "
                              f"of this directory's step {checkpoint.step}")  # fmt: skip
    differences = resume_differences(config, checkpoint.json("config.json"), state,
                                     info.world_size, shards.fingerprint)  # fmt: skip
    if differences:
        raise CheckpointError(
            f"{checkpoint.url}: this run cannot resume it — "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings, or start a new run in another "
            "checkpoint.root"
        )
    return checkpoint, state


def _train(config: JobConfig, stop: StopRequest) -> tuple[dict, Engine]:
    info = init_distributed(config.parallel.backend)
    config.check(info.world_size)
    model_config = config.model.build()
    out = Path(config.train.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(config.to_dict(), indent=1, default=list)
        (out / "config.json").write_text(resolved + "\n")
        print(f"resolved config:\n{resolved}", flush=True)
        print(f"world size {info.world_size}, {config.accumulation(info.world_size)} "
              "micro-batch(es) per rank per step, model "
              f"{model_config.num_params():,} parameters", flush=True)  # fmt: skip
    train_shards, valid_shards = _open_data(config, info)
    checkpointer = Checkpointer(
        config.checkpoint, config.checkpoint.root or str(out / "checkpoints")
    )
    try:
        where = checkpointer.find()
        checkpointer.begin(where)
        resume = None if where is None else _resumable(checkpointer, where, config, info,
                                                       train_shards)  # fmt: skip
        engine = build_engine(config, model_config, info)
        progress, data_resume, run_id = Progress(), None, None
        if resume is not None:
            checkpoint, state = resume
            checkpointer.load(checkpoint, engine)
            engine.set_step(state.step)
            set_rng_state(state.rng)
            progress = Progress(state.step, state.tokens_seen, state.skipped_steps)
            data_resume, run_id = state.data, state.wandb_run_id
            if info.is_main:
                print(f"resumed from {where} at step {state.step}", flush=True)
        loader = TrainLoader(train_shards, config.data, info.rank, info.world_size, data_resume)
        wandb_settings = None
        if config.log.wandb:
            wandb_settings = {"project": config.log.project, "name": config.log.run_name or None}
        logger = MetricsLogger(out, info.is_main, config.to_dict(), wandb_settings, run_id)
        try:
            last = _loop(config, info, engine, checkpointer, loader, logger, progress,
                         valid_shards, train_shards.fingerprint, stop)  # fmt: skip
        finally:
            logger.close()
    finally:
        checkpointer.close()
    final = engine.full_state_dict()
    if info.is_main:
        from esmdist.model.convert import save_hf

        save_hf({k: v.float().cpu() for k, v in final.items()}, model_config, out / "final")
        print(f"final model: {out / 'final'} (Hugging Face EsmForMaskedLM directory)", flush=True)
    return last, engine


def _loop(config, info, engine, checkpointer, loader, logger, progress, valid_shards,
          dataset, stop) -> dict:  # fmt: skip
    """Steps from `progress.step + 1` to `train.max_steps`; the last logged metrics."""
    model_config = config.model.build()
    peak = peak_tflops(config.parallel.peak_tflops, config.train.dtype, info.device)
    accumulation = config.accumulation(info.world_size)

    def save(step: int, background: bool) -> None:
        data = merge_rank_states(gather_objects(loader.state_dict()))
        state = TrainState(step, progress.tokens_seen, progress.skipped, data, rng_state(),
                           info.world_size, config.parallel.backend, logger.run_id, dataset)  # fmt: skip
        checkpointer.save(step, engine, state.to_dict(), config.to_dict(), background)
        if info.is_main:
            status = "uploading" if checkpointer.pending else "committed"
            print(f"checkpoint {checkpointer.store.url_of(step_name(step))} {status}", flush=True)

    batches = iter(loader)
    last: dict = {}
    for step in range(progress.step + 1, config.train.max_steps + 1):
        micro = [next(batches) for _ in range(accumulation)]
        loss_value, grad_norm, applied = _optimizer_step(engine, micro, info, model_config,
                                                         progress)  # fmt: skip
        _count_bad_steps(config, info, step, applied, progress)
        if applied and (step % config.train.log_every == 0 or step == config.train.max_steps):
            last = _metrics(engine, progress, loss_value, grad_norm, info, peak)
            logger.log(step, last)
        valid_every = config.train.valid_every
        if (
            valid_shards is not None
            and valid_every
            and (step % valid_every == 0 or step == config.train.max_steps)
        ):
            last["valid_perplexity"] = validate(engine, valid_shards, config, info)
            logger.log(step, {"valid_perplexity": last["valid_perplexity"]})
        every = config.checkpoint.every
        stopping = stop_agreed(stop)
        final = stopping or step == config.train.max_steps
        if final or (every and step % every == 0):
            # Periodic saves upload in the background; the last one must be committed now.
            save(step, background=config.checkpoint.async_upload and not final)
            if final:
                checkpointer.wait()
        if stopping:
            if info.is_main:
                (Path(config.train.output_dir) / "PREEMPTED").write_text(
                    f"stopped after step {step}\n"
                )
            raise Preempted(f"stopped by signal after step {step}; checkpoint saved")
    return last


def _optimizer_step(engine: Engine, micro: list, info: DistInfo, model_config,
                    progress: Progress) -> tuple[float, float, bool]:  # fmt: skip
    """Forward and backward over the step's micro-batches, then the optimizer (or a skip on
    every rank when any rank's loss is not finite): (loss, gradient norm, applied)."""
    counts = all_reduce_sum(torch.tensor(
        [sum(b.targets.numel() for b in micro), sum(b.num_tokens for b in micro)],
        dtype=torch.float64,
    ))  # fmt: skip
    masked = counts[0].item()
    progress.tokens_seen += int(counts[1].item())
    loss_sum = torch.zeros((), dtype=torch.float64)
    finite = True
    for index, batch in enumerate(micro):
        batch = batch.to(info.device)
        with engine.autocast():
            logits = engine.model(batch.tokens, batch.cu_seqlens, output_mask=batch.selected).logits
        loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
        # Agree across ranks before any rank runs a backward that would hang the others.
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]))
        if bad.item():
            finite = False
            break
        engine.backward(loss * (info.world_size / masked), last=index == len(micro) - 1)
        loss_sum += loss.detach().double().cpu()
        progress.window_tokens += batch.num_tokens
        progress.window_flops += batch_flops(model_config, batch.cu_seqlens.diff().cpu(),
                                             batch.targets.numel())  # fmt: skip
    if finite:
        grad_norm, applied = engine.step()
    else:
        engine.skip()
        grad_norm, applied = math.nan, False
    loss_value = all_reduce_sum(loss_sum).item() / masked if applied else math.nan
    return loss_value, grad_norm, applied


def _count_bad_steps(config: JobConfig, info: DistInfo, step: int, applied: bool,
                     progress: Progress) -> None:  # fmt: skip
    if applied:
        progress.bad_in_a_row = 0
        return
    progress.skipped += 1
    progress.bad_in_a_row += 1
    if info.is_main:
        print(f"step {step}: non-finite loss or gradient norm, step skipped "
              f"({progress.bad_in_a_row} in a row)", flush=True)  # fmt: skip
    if progress.bad_in_a_row >= config.train.max_bad_steps:
        raise BadStepsError(
            f"step {step}: {progress.bad_in_a_row} steps in a row had a non-finite loss or "
            "gradient; stopping (lower optim.lr or check the data)"
        )


def _metrics(engine: Engine, progress: Progress, loss_value: float, grad_norm: float,
             info: DistInfo, peak: float) -> dict:  # fmt: skip
    """The logged record of the window since the last one (then a new window starts)."""
    elapsed = time.perf_counter() - progress.window_start
    tokens = all_reduce_sum(torch.tensor([float(progress.window_tokens)])).item()
    flops = all_reduce_sum(torch.tensor([progress.window_flops])).item()
    record = {
        "loss": loss_value,
        "perplexity": math.exp(min(loss_value, 50.0)),
        "lr": engine.lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "tflops_per_device": flops / elapsed / info.world_size / 1e12,
        "tokens_seen": progress.tokens_seen,
        "skipped_steps": progress.skipped,
    }
    if peak:
        record["mfu"] = record["tflops_per_device"] / peak
    if info.device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    progress.window_start, progress.window_tokens, progress.window_flops = (
        time.perf_counter(),
        0,
        0.0,
    )
    return record


@torch.no_grad()
def validate(engine: Engine, shards: ShardSet, config: JobConfig, info: DistInfo) -> float:
    """Masked-LM perplexity on the validation split (fixed masks), over all ranks.

    Sharded engines need every rank in every forward, so ranks with fewer batches repeat their
    first one (unscored) until all ranks are done."""
    batches = list(validation_batches(shards, config.data, info.rank, info.world_size))
    rounds = all_reduce_max(torch.tensor([len(batches)]))
    engine.model.eval()
    with engine.autocast():
        ppl, count = masked_perplexity(engine.model, batches)
        for _ in range(int(rounds) - len(batches)):
            masked_perplexity(engine.model, batches[:1])
    engine.model.train()
    nll = math.log(ppl) * count if count else 0.0
    totals = all_reduce_sum(torch.tensor([nll, float(count)], dtype=torch.float64))
    return math.exp(totals[0].item() / max(totals[1].item(), 1.0))


def main(argv: list[str] | None = None) -> int:
    # Object storage: ride out short outages with botocore's own retries (checkpoint writes
    # also retry at the file level, see esmdist.storage).
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "10")
    try:
        config, _ = parse_args(argv)
        train(config)
    except Preempted as exc:
        print(f"pretrain: {exc}; exiting with {PREEMPTED_EXIT} for requeue", flush=True)
        return PREEMPTED_EXIT
    except (ValueError, FileNotFoundError, DataError, BadStepsError, StorageError) as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("pretrain: aborted by a second Ctrl-C (no checkpoint saved)", file=sys.stderr,
              flush=True)  # fmt: skip
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

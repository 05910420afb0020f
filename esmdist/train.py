"""The training loop, top to bottom: config → process group → data → engine → steps.

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
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from esmdist.checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state
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
from esmdist.parallel.distributed import all_reduce_sum

# Exit status after a SIGUSR1/SIGTERM stop with a saved checkpoint (EX_TEMPFAIL): the sbatch
# script requeues the job on it. Launchers that hide the status (torchrun) still leave the
# file PREEMPTED in train.output_dir.
PREEMPTED_EXIT = 75


class BadStepsError(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(Exception):
    """Stopped by SIGUSR1/SIGTERM after saving a checkpoint."""


class StopRequest:
    """Remembers SIGUSR1/SIGTERM (Slurm's warning before the time limit or preemption)."""

    def __init__(self):
        self.requested = False
        self.previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGUSR1, signal.SIGTERM)
        }

    def restore(self) -> None:
        """Give the signals back to whoever handled them before (e.g. when train() returns)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got the signal (checked once per step)."""
        flag = all_reduce_sum(torch.tensor([1.0 if self.requested else 0.0]))
        return bool(flag.item())


def gather_objects(value) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


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


def train(config: JobConfig) -> tuple[dict, Engine]:
    """Run `config`; returns the last logged metrics and the engine (its final state)."""
    stop = StopRequest()
    try:
        return _train(config, stop)
    finally:
        stop.restore()


def _train(config: JobConfig, stop: StopRequest) -> tuple[dict, Engine]:
    info = init_distributed(config.parallel.backend)
    config.check(info.world_size)
    accumulation = config.accumulation(info.world_size)
    model_config = config.model.build()
    out = Path(config.train.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(config.to_dict(), indent=1, default=list)
        (out / "config.json").write_text(resolved + "\n")
        print(f"resolved config:\n{resolved}", flush=True)
        print(f"world size {info.world_size}, {accumulation} micro-batch(es) per rank per step, "
              f"model {model_config.num_params():,} parameters", flush=True)  # fmt: skip

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
    engine = build_engine(config, model_config, info)
    checkpointer = Checkpointer(
        config.checkpoint, config.checkpoint.root or str(out / "checkpoints")
    )
    start, tokens_seen, skipped, data_resume, run_id = 0, 0, 0, None, None
    where = checkpointer.find()
    if where is not None:
        state = checkpointer.load(where, engine)
        start, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped_steps"]
        data_resume, run_id = state["data"], state.get("wandb_run_id")
        set_rng_state(state["rng"])
        if info.is_main:
            print(f"resumed from {where} at step {start}", flush=True)
    loader = TrainLoader(train_shards, config.data, info.rank, info.world_size, data_resume)

    wandb_settings = None
    if config.log.wandb:
        wandb_settings = {"project": config.log.project, "name": config.log.run_name or None}
    logger = MetricsLogger(out, info.is_main, config.to_dict(), wandb_settings, run_id)
    peak = peak_tflops(config.parallel.peak_tflops, config.train.dtype, info.device)

    def save(step: int, background: bool) -> None:
        data = merge_rank_states(gather_objects(loader.state_dict()))
        train_state = {
            "step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped,
            "schedule": engine.schedule.state_dict(), "data": data, "rng": rng_state(),
            "wandb_run_id": logger.run_id, "world_size": info.world_size,
            "backend": config.parallel.backend,
        }  # fmt: skip
        checkpointer.save(step, engine, train_state, config.to_dict(), background)
        if info.is_main:
            state = "uploading" if checkpointer.pending else "committed"
            print(f"checkpoint {checkpointer.store.url_of(f'step_{step:09d}')} {state}", flush=True)

    batches = iter(loader)
    bad_in_a_row = 0
    last: dict = {}
    window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
    for step in range(start + 1, config.train.max_steps + 1):
        micro = [next(batches) for _ in range(accumulation)]
        counts = all_reduce_sum(torch.tensor(
            [sum(b.targets.numel() for b in micro), sum(b.num_tokens for b in micro)],
            dtype=torch.float64,
        ))  # fmt: skip
        masked = counts[0].item()
        tokens_seen += int(counts[1].item())
        loss_sum = torch.zeros((), dtype=torch.float64)
        finite = True
        for index, batch in enumerate(micro):
            batch = batch.to(info.device)
            with engine.autocast():
                logits = engine.model(
                    batch.tokens, batch.cu_seqlens, output_mask=batch.selected
                ).logits
            loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
            # Agree across ranks before any rank runs a backward that would hang the others.
            bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]))
            if bad.item():
                finite = False
                break
            engine.backward(loss * (info.world_size / masked), last=index == len(micro) - 1)
            loss_sum += loss.detach().double().cpu()
            window_tokens += batch.num_tokens
            window_flops += batch_flops(model_config, batch.cu_seqlens.diff().cpu(),
                                        batch.targets.numel())  # fmt: skip
        if finite:
            grad_norm, applied = engine.step()
        else:
            engine.skip()
            grad_norm, applied = math.nan, False
        if not applied:
            skipped += 1
            bad_in_a_row += 1
            if info.is_main:
                print(f"step {step}: non-finite loss or gradient norm, step skipped "
                      f"({bad_in_a_row} in a row)", flush=True)  # fmt: skip
            if bad_in_a_row >= config.train.max_bad_steps:
                raise BadStepsError(
                    f"step {step}: {bad_in_a_row} steps in a row had a non-finite loss or "
                    "gradient; stopping (lower optim.lr or check the data)"
                )
        else:
            bad_in_a_row = 0
        loss_value = all_reduce_sum(loss_sum).item() / masked if applied else math.nan

        if applied and (step % config.train.log_every == 0 or step == config.train.max_steps):
            elapsed = time.perf_counter() - window_start
            tokens = all_reduce_sum(torch.tensor([float(window_tokens)])).item()
            flops = all_reduce_sum(torch.tensor([window_flops])).item()
            last = {
                "loss": loss_value,
                "perplexity": math.exp(min(loss_value, 50.0)),
                "lr": engine.lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed,
                "tflops_per_device": flops / elapsed / info.world_size / 1e12,
                "tokens_seen": tokens_seen,
                "skipped_steps": skipped,
            }
            if peak:
                last["mfu"] = last["tflops_per_device"] / peak
            if info.device.type == "cuda":
                last["peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
            logger.log(step, last)
            window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0

        valid_every = config.train.valid_every
        if (
            valid_shards is not None
            and valid_every
            and (step % valid_every == 0 or step == config.train.max_steps)
        ):
            last["valid_perplexity"] = validate(engine, valid_shards, config, info)
            logger.log(step, {"valid_perplexity": last["valid_perplexity"]})

        every = config.checkpoint.every
        stopping = stop.agreed()
        final = stopping or step == config.train.max_steps
        if final or (every and step % every == 0):
            # Periodic saves upload in the background; the last one must be committed now.
            save(step, background=config.checkpoint.async_upload and not final)
            if final:
                checkpointer.wait()
        if stopping:
            logger.close()
            if info.is_main:
                (out / "PREEMPTED").write_text(f"stopped after step {step}\n")
            raise Preempted(f"stopped by signal after step {step}; checkpoint saved")
    logger.close()
    final = engine.full_state_dict()
    if info.is_main:
        from esmdist.model.convert import save_hf

        save_hf({k: v.float().cpu() for k, v in final.items()}, model_config, out / "final")
        print(f"final model: {out / 'final'} (Hugging Face EsmForMaskedLM directory)", flush=True)
    return last, engine


@torch.no_grad()
def validate(engine: Engine, shards: ShardSet, config: JobConfig, info: DistInfo) -> float:
    """Masked-LM perplexity on the validation split (fixed masks), over all ranks.

    Sharded engines need every rank in every forward, so ranks with fewer batches repeat their
    first one (unscored) until all ranks are done."""
    batches = list(validation_batches(shards, config.data, info.rank, info.world_size))
    rounds = torch.tensor([len(batches)])
    if dist.is_initialized():
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
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
    # also retry at the file level, see esmdist.checkpoint).
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "10")
    try:
        config, _ = parse_args(argv)
        train(config)
    except Preempted as exc:
        print(f"pretrain: {exc}; exiting with {PREEMPTED_EXIT} for requeue", flush=True)
        return PREEMPTED_EXIT
    except (ValueError, FileNotFoundError, DataError, BadStepsError, CheckpointError) as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

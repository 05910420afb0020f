"""The training loop, top to bottom: `setup` (process group, data, checkpoint root, engine,
resume) → `loop` → `train_step` per optimizer step.

Each optimizer step takes `accumulation` packed micro-batches per rank (tokens per step =
max_tokens × accumulation × world size). The loss is cross-entropy at the masked positions
only, summed, and divided by the number of masked positions in the whole step — all
micro-batches on all ranks — so every masked residue weighs the same, however the tokens
fell into micro-batches.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from esmdist.checkpoint import Checkpointer, step_name
from esmdist.collectives import (
    all_reduce_max,
    all_reduce_sum,
    all_reduce_sum_started,
    barrier,
    gather_objects,
)
from esmdist.config import JobConfig
from esmdist.data.batch import PackedBatch
from esmdist.data.stream import (
    DataError,
    ShardSet,
    TrainLoader,
    merge_rank_states,
    validation_batches,
)
from esmdist.eval.contact_fit import ContactValidation
from esmdist.eval.perplexity import masked_perplexity_all_ranks
from esmdist.export import model_weights, write_final_export
from esmdist.metrics import MetricsLogger, StepResult, batch_flops, peak_tflops
from esmdist.model import ModelConfig
from esmdist.optim import build_optimizer, set_schedule_step
from esmdist.parallel import DistInfo, Engine, EngineSettings, build_engine, init_distributed
from esmdist.parallel.compile import (
    WarmUp,
    graphs_compiled,
    is_compiled,
    use_cache_directory,
    warm_up,
)
from esmdist.parallel.engine import load_full_weights
from esmdist.parallel.prepare import apply_training_transforms, training_model
from esmdist.plan import resolve_micro_batch
from esmdist.process import seconds_since_start
from esmdist.signals import StopRequest, stop_request
from esmdist.status import PREEMPTED_MARKER
from esmdist.storage import writing
from esmdist.train_state import (
    Progress,
    TrainState,
    needs_conversion,
    resumable,
    rng_state,
    schedule_change,
    set_rng_state,
    shape_change,
)


class BadStepsError(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(Exception):
    """Stopped by a signal after saving a checkpoint."""


def engine_for(config: JobConfig, info: DistInfo, weights: dict | None = None) -> Engine:
    """This rank's engine for `config`: the model from train.seed (on the meta device for
    FSDP's per-shard initialisation) or from `weights` (a full state dict: model.init_from),
    its training transforms, the parallel wrap, AdamW."""
    parallel, train = config.parallel, config.train
    backend = parallel.engine_backend(info.world_size)
    on_meta = backend == "fsdp" and parallel.meta_init
    model = training_model(config.model.build(), train.seed, info.device, on_meta=on_meta)
    if weights is not None and not on_meta:
        model.load_state_dict(weights)  # before any wrap: every backend sees the same model
    settings = EngineSettings(train.dtype, config.optim.grad_clip,
                              config.accumulation(info.world_size), train.seed)  # fmt: skip
    make_optimizer = functools.partial(build_optimizer, config.optim, train.max_steps)
    engine = build_engine(model, replace(parallel, backend=backend), info, settings,
                          make_optimizer)  # fmt: skip
    if weights is not None and on_meta:
        # Sharded as it loads: rank 0's full copy is scattered to the others' shards.
        load_full_weights(engine.model, weights if info.is_main else {})
    apply_training_transforms(
        engine.compute_module,
        recompute_every=train.recompute_every if train.activation_checkpointing else 0,
        compile=train.compiles(info.device.type, backend),
    )  # fmt: skip
    return engine


def initial_weights(config: JobConfig, info: DistInfo) -> dict | None:
    """The state dict of model.init_from, its architecture checked against the config (None
    without init_from). Under sharded FSDP only rank 0 keeps it."""
    if not config.model.init_from:
        return None
    source, weights = model_weights(config.model.init_from)
    config.model.check_init(source)
    if info.is_main:
        print(f"initialised from {config.model.init_from} ({source.arch}, "
              f"{source.num_params():,} parameters)", flush=True)  # fmt: skip
    backend = config.parallel.engine_backend(info.world_size)
    sharded = backend == "fsdp" and config.parallel.meta_init
    return {} if sharded and not info.is_main else weights


@dataclass
class Run:
    """Everything one training run holds between its steps."""

    config: JobConfig
    info: DistInfo
    model_config: ModelConfig
    engine: Engine
    checkpointer: Checkpointer
    loader: TrainLoader
    logger: MetricsLogger
    valid_shards: ShardSet | None
    contacts: ContactValidation | None
    """`train.valid_contacts`: the long-range contact precision logged at each validation."""
    dataset: str
    """The train split's fingerprint, saved with every checkpoint."""
    progress: Progress
    compiled: WarmUp | None = None
    """The compile warm-up's outcome (None: the blocks run eagerly)."""

    @property
    def accumulation(self) -> int:
        return self.config.accumulation(self.info.world_size)

    def close(self) -> None:
        """On every exit: the metric sinks, an unfinished upload, the checkpoint root's lock."""
        try:
            self.logger.close()
        finally:
            self.checkpointer.close()


def train(config: JobConfig) -> tuple[dict, Engine]:
    """Run `config`; returns the last logged metrics and the engine (its final state)."""
    stop = stop_request()
    try:
        run = setup(config)
        try:
            last = loop(run, stop)
        finally:
            run.close()
        export_final(run, last)
        # Rank 0 writes the export alone: the others wait, so that no rank tears the process
        # group down under one still using it (gloo's worker threads then abort at exit).
        barrier()
        return last, run.engine
    finally:
        stop.restore()


def _announce(config: JobConfig, info: DistInfo, model_config: ModelConfig, chosen: str) -> None:
    if info.world_size > 1:  # every rank: where the job's ranks really run
        print(f"rank {info.rank} of {info.world_size} on {socket.gethostname()} "
              f"(local rank {info.local_rank}, {info.device})", flush=True)  # fmt: skip
    if not info.is_main:
        return
    if "SLURM_JOB_ID" in os.environ:
        print(f"slurm job {os.environ['SLURM_JOB_ID']} restart "
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')} on {os.environ.get('SLURM_JOB_NODELIST', '?')}",
              flush=True)  # fmt: skip
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The stop marker speaks of this attempt only (the Slurm job script reads it afterwards).
    (out / PREEMPTED_MARKER).unlink(missing_ok=True)
    resolved = json.dumps(config.to_dict(), indent=1, default=list)
    with writing(out / "config.json"):
        (out / "config.json").write_text(resolved + "\n")
    print(f"resolved config:\n{resolved}", flush=True)
    print(f"world size {info.world_size}, {config.accumulation(info.world_size)} micro-batch(es) "
          f"per rank per step, model {model_config.num_params():,} parameters", flush=True)  # fmt: skip
    if chosen:
        print(chosen, flush=True)
    backend = config.parallel.engine_backend(info.world_size)
    if backend != config.parallel.backend:
        print(f"parallel.backend {config.parallel.backend} on one process: trains as single "
              "(nothing to reduce or shard; the same checkpoint files)", flush=True)  # fmt: skip


def _open_data(config: JobConfig, info: DistInfo) -> tuple[ShardSet, ShardSet | None]:
    train_shards = ShardSet.open(config.data.path, "train")
    try:
        valid_shards = ShardSet.from_directory(config.data.path, config.data.valid_split)
    except DataError:
        valid_shards = None
        if info.is_main:
            print(f"no '{config.data.valid_split}' split in {config.data.path}: validation is off",
                  flush=True)  # fmt: skip
    return train_shards, valid_shards


def setup(config: JobConfig) -> Run:
    """Join the process group, check the config, open the data, take the checkpoint root (and
    check that its newest checkpoint, if any, is this run's to resume), build the engine and
    restore the checkpoint: a run ready for its next step."""
    info = init_distributed(config.parallel.backend)
    config.check(info.world_size)
    free = None
    if info.device.type == "cuda":  # the same choice on every rank: the least free memory of any
        free = torch.cuda.mem_get_info(info.device)[0]
        free = -all_reduce_max(torch.tensor([-float(free)], dtype=torch.float64)).item()
    config, chosen = resolve_micro_batch(config, info.world_size, free)
    model_config = config.model.build()
    _announce(config, info, model_config, chosen)
    train_shards, valid_shards = _open_data(config, info)
    contacts = (ContactValidation(config.train.valid_contacts, config.train.valid_contacts_fit)
                if config.train.valid_contacts else None)  # fmt: skip
    checkpointer = Checkpointer(config.checkpoint, config.checkpoint_root)
    try:
        where = checkpointer.find()
        checkpointer.begin(where)
        resume = None if where is None else resumable(checkpointer, where, config,
                                                      train_shards.fingerprint)  # fmt: skip
        # A resume continues the run (its own weights), not the initialisation.
        engine = engine_for(config, info, initial_weights(config, info) if resume is None else None)
        progress, data_resume, run_id, reshaped = Progress(), None, None, ""
        if resume is not None:
            checkpoint, state = resume
            saved = checkpoint.json("config.json")
            checkpointer.load(
                checkpoint, engine, convert=needs_conversion(state, saved, config, info.world_size)
            )
            set_schedule_step(engine.schedule, state.step, config.optim.lr)
            set_rng_state(state.rng)
            reshaped = shape_change(state, saved, config, info.world_size)
            progress = Progress.resumed(state, reshaped)
            data_resume, run_id = state.data, state.wandb_run_id
            if info.is_main:
                print(f"resumed from {where} at step {state.step}", flush=True)
                for change in (reshaped, schedule_change(config, saved, state.step)):
                    if change:
                        print(change, flush=True)
        compiled = _warm_up_compiled(engine, config, info)
        loader = TrainLoader(train_shards, config.data, info.rank, info.world_size, data_resume,
                             pin_memory=info.device.type == "cuda")  # fmt: skip
        wandb = {"project": config.log.project, "name": config.log.run_name or None}
        logger = MetricsLogger(Path(config.train.output_dir), info.is_main, config.to_dict(),
                               wandb if config.log.wandb else None, run_id)  # fmt: skip
        if reshaped:  # a marker in metrics.jsonl (and on `esmdist plot`'s curves)
            logger.log(progress.step, {"resume_change": reshaped})
    except BaseException:
        checkpointer.close()
        raise
    return Run(config, info, model_config, engine, checkpointer, loader, logger, valid_shards,
               contacts, train_shards.fingerprint, progress, compiled)  # fmt: skip


def _warm_up_compiled(engine: Engine, config: JobConfig, info: DistInfo) -> WarmUp | None:
    """Compile the blocks before the first step (esmdist.parallel.compile), with the compiled
    code cached in train.compile_cache unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    if not is_compiled(engine.compute_module):
        return None
    cache = use_cache_directory(config.train.compile_cache_dir)
    found = warm_up(engine, info.device, inference=config.train.valid_every > 0)
    if info.is_main and not found.failure:
        print(f"compiled the blocks in {found.seconds:.1f} s ({found.graphs} graphs; cache "
              f"{cache})", flush=True)  # fmt: skip
    return found


def loop(run: Run, stop: StopRequest) -> dict:
    """Steps from the next one to `train.max_steps`; the last logged metrics."""
    train, every = run.config.train, run.config.checkpoint.every
    batches = iter(run.loader)
    last: dict = {}
    unread: list[StepResult] = []
    first = run.progress.step + 1
    for step in range(first, train.max_steps + 1):
        result = train_step(run, step, [next(batches) for _ in range(run.accumulation)], stop)
        if step == first:  # this attempt's first step: the start-up time
            result.read()
            run.progress.startup_s = seconds_since_start()
            if run.info.is_main:
                print(f"step {step} done {run.progress.startup_s:.1f} s after the process started",
                      flush=True)  # fmt: skip
        run.progress.window_steps += 1
        # The steps before this one are read now that this one is queued behind them: the host
        # waits for a step it has just queued only where it needs the step's own outcome.
        for earlier in unread:
            _count_bad_steps(run, earlier.step, earlier.read()[2])
        unread = [result]
        final_step, stopping = step == train.max_steps, result.stop
        logging = step % train.log_every == 0 or final_step
        validating = bool(train.valid_every) and (step % train.valid_every == 0 or final_step)
        saving = stopping or final_step or bool(every and step % every == 0)
        if logging or validating or saving:
            loss, grad_norm, applied = result.read()
            _count_bad_steps(run, step, applied)
            unread = []
            if applied and logging:
                last = _metrics(run, step, loss, grad_norm)
                run.logger.log(step, last)
        if validating:
            found = validate(run)
            last.update(found)
            run.logger.log(step, found)
        if saving:
            # Periodic saves upload in the background; the last one must be committed now.
            save(run, step, background=run.config.checkpoint.async_upload and not stopping
                 and not final_step)  # fmt: skip
            if stopping or final_step:
                run.checkpointer.wait()
        if stopping and not final_step:  # a stop at the last step finishes (and exports)
            if run.info.is_main:
                marker = Path(train.output_dir) / PREEMPTED_MARKER
                marker.write_text(f"stopped after step {step}\n")
            # All ranks leave together, after the marker: srun ends the step at the first exit.
            barrier()
            raise Preempted(f"stopped by signal after step {step}; checkpoint saved")
    return last


def train_step(run: Run, step: int, micro: list, stop: StopRequest) -> StepResult:
    """Forward and backward over the step's micro-batches, then the optimizer — or a step
    dropped on every rank when the gradient norm is not finite (under an engine that applies
    in its backward, a non-finite loss ends the run). Nothing here waits for the device."""
    engine, info, progress = run.engine, run.info, run.progress
    # The one host-side collective of the step (gloo, also on GPUs): masked and real tokens
    # on all ranks, and whether any rank got a stop signal; needed before the first backward.
    totals = torch.tensor([sum(b.targets.numel() for b in micro),
                           sum(b.num_tokens for b in micro), float(stop.requested is not None)],
                          dtype=torch.float64)  # fmt: skip
    summed = all_reduce_sum_started(totals)
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    for index, batch in enumerate(micro):
        flops = batch_flops(run.model_config, batch.cu_seqlens.diff(), batch.targets.numel())
        loss = masked_lm_loss(engine, batch, info.device)
        if index == 0:
            masked, tokens, stops = summed().tolist()
            progress.tokens_seen += int(tokens)
        loss_sum += loss.detach().double()
        last = index == len(micro) - 1
        if engine.applies_in_backward and last and not _finite_on_every_rank(loss_sum):
            raise BadStepsError(f"step {step}: non-finite loss under {run.config.parallel.backend}, "
                                "which cannot drop a step; resume from the last checkpoint")  # fmt: skip
        engine.backward(loss * (info.world_size / masked), last=last)
        progress.window_tokens += batch.num_tokens
        progress.window_flops += flops
    grad_norm, applied = engine.step()
    return StepResult(step, [all_reduce_sum(loss_sum) / masked, grad_norm, applied], stops > 0)


def masked_lm_loss(engine: Engine, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """The cross-entropy summed over the masked positions of `batch` (on the host). The model
    gets host copies of the lengths and of the masked positions too: they spare the device the
    reads that slicing the pack and boolean indexing would make."""
    on_device, positions = batch.to(device), batch.masked_positions(device)
    with engine.autocast():
        logits = engine.model(on_device.tokens, on_device.cu_seqlens, output_mask=positions,
                              lengths=batch.cu_seqlens.diff().tolist()).logits  # fmt: skip
    return F.cross_entropy(logits.float(), on_device.targets, reduction="sum")


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Agreed across ranks before the last backward, where an engine that updates inside it
    would apply a non-finite step (checked once per step: on the sum of its losses)."""
    return not all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0])).item()


def save(run: Run, step: int, background: bool) -> None:
    """Checkpoint `step`: engine state, every rank's data position, RNG, counters, config."""
    progress, info = run.progress, run.info
    data = merge_rank_states(gather_objects(run.loader.state_dict()))
    state = TrainState(step, progress.tokens_seen, progress.skipped, data, rng_state(),
                       info.world_size, run.config.parallel.backend, run.logger.run_id,
                       run.dataset, progress.changes)  # fmt: skip
    run.checkpointer.save(step, run.engine, state.to_dict(), run.config.to_dict(), background)
    if info.is_main:
        status = "uploading" if run.checkpointer.pending else "committed"
        print(f"checkpoint {run.checkpointer.store.url_of(step_name(step))} {status}", flush=True)


def _count_bad_steps(run: Run, step: int, applied: bool) -> None:
    progress = run.progress
    if applied:
        progress.bad_in_a_row = 0
        return
    progress.skipped += 1
    progress.bad_in_a_row += 1
    if run.info.is_main:
        print(f"step {step}: non-finite loss or gradient norm, step skipped "
              f"({progress.bad_in_a_row} in a row)", flush=True)  # fmt: skip
    if progress.bad_in_a_row >= run.config.train.max_bad_steps:
        raise BadStepsError(
            f"step {step}: {progress.bad_in_a_row} steps in a row had a non-finite loss or "
            "gradient; stopping (lower optim.lr or check the data)"
        )


def _metrics(run: Run, step: int, loss: float, grad_norm: float) -> dict:
    """The logged record of the window since the last one (then a new window starts); the
    ETA is the remaining steps at this window's time per step."""
    progress, info, max_steps = run.progress, run.info, run.config.train.max_steps
    now = time.perf_counter()
    elapsed = now - progress.window_start
    step_time = elapsed / max(progress.window_steps, 1)
    window = torch.tensor([progress.window_tokens, progress.window_flops], dtype=torch.float64)
    tokens, flops = all_reduce_sum(window).tolist()
    record = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "lr": run.engine.lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "tflops_per_device": flops / elapsed / info.world_size / 1e12,
        "tokens_seen": progress.tokens_seen,
        "skipped_steps": progress.skipped,
        "step_time_s": step_time,
        "done_pct": 100.0 * step / max_steps,
        "eta_s": step_time * (max_steps - step),
        "wall_s": now - progress.started,
    }
    peak = peak_tflops(run.config.parallel.peak_tflops, run.config.train.dtype, info.device)
    if peak:
        record["mfu"] = record["tflops_per_device"] / peak
    if info.device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    if progress.startup_s is not None:
        record["startup_s"], progress.startup_s = progress.startup_s, None
    if run.compiled is not None and not run.compiled.failure:
        record["recompiles"] = graphs_compiled() - run.compiled.graphs
    progress.window_start, progress.window_steps = time.perf_counter(), 0
    progress.window_tokens, progress.window_flops = 0, 0.0
    return record


def validate(run: Run) -> dict[str, float | None]:
    """`valid_perplexity` (with a validation split) and `valid_contact_p_at_l_long` with its
    random-ranking baseline (with `train.valid_contacts`), computed on every rank."""
    found = {}
    if run.valid_shards:
        found["valid_perplexity"] = valid_perplexity(run.engine, run.valid_shards, run.config,
                                                     run.info)  # fmt: skip
    if run.contacts:
        run.engine.model.eval()
        with run.engine.autocast():
            found.update(run.contacts(run.engine.model, run.engine.module.contact_head))
        run.engine.model.train()
    return found


def valid_perplexity(engine: Engine, shards: ShardSet, config: JobConfig, info: DistInfo) -> float:
    """Masked-LM perplexity on the validation split (fixed masks), over all ranks."""
    batches = list(validation_batches(shards, config.data, info.rank, info.world_size))
    engine.model.eval()
    with engine.autocast():
        ppl = masked_perplexity_all_ranks(engine.model, batches)
    engine.model.train()
    return ppl


def export_final(run: Run, last: dict) -> None:
    """The trained model as a Hugging Face EsmForMaskedLM directory, `{output_dir}/final`, and
    the run's summary."""
    final = run.engine.full_state_dict()
    if not run.info.is_main:
        return
    out = write_final_export(final, run.model_config, Path(run.config.train.output_dir))
    progress = run.progress
    held_out = (f", held-out perplexity {last['valid_perplexity']:.3f}"
                if "valid_perplexity" in last else "")  # fmt: skip
    loss = f", final loss {last['loss']:.4f}" if "loss" in last else ""
    print(f"run finished: step {run.config.train.max_steps}, {progress.tokens_seen:,} tokens seen, "
          f"{progress.skipped} step(s) skipped, {time.perf_counter() - progress.started:,.0f} s "
          f"this attempt{loss}{held_out}; checkpoints in {run.config.checkpoint_root}; final "
          f"model: {out} (Hugging Face EsmForMaskedLM directory)", flush=True)  # fmt: skip

"""`esmdist convert`: a committed checkpoint rewritten ahead of time for another engine layout —
DCP (resumable by single, DDP and FSDP2 on any world size) or DeepSpeed ZeRO files of a given
stage, dtype and world size. A resume converts by itself (`esmdist.checkpoint.full_state`);
this is for users who want the conversion done once, e.g. before a job that must start fast.

The conversion is a load and a save by the target engine itself, in N local CPU processes
(gloo): the files are the ones that engine writes, and its own reader takes them back. The
new checkpoint keeps the run's step, data position, RNG and run id; its config and train
state name the new layout, and its `changes` record the conversion.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from esmdist.checkpoint import CheckpointConfig, Checkpointer, CheckpointError, open_checkpoint
from esmdist.config import JobConfig, build_section
from esmdist.train_state import TrainState, engine_layout, saved_layout


@dataclasses.dataclass(frozen=True)
class Target:
    to: str
    """"dcp" or "deepspeed"."""
    world_size: int
    zero_stage: int
    dtype: str

    def layout(self) -> str:
        backend = "single" if self.to == "dcp" else "deepspeed"
        return engine_layout(backend, self.zero_stage, self.dtype)


def target_config(config: JobConfig, target: Target) -> JobConfig:
    """The checkpoint's run config with the target's engine layout."""
    parallel = dataclasses.replace(
        config.parallel, backend="single" if target.to == "dcp" else "deepspeed",
        zero_stage=target.zero_stage,
    )  # fmt: skip
    train = dataclasses.replace(config.train, dtype=target.dtype)
    return dataclasses.replace(config, parallel=parallel, train=train)


def convert(source: str, out: str, to: str, world_size: int = 1, zero_stage: int | None = None,
            dtype: str | None = None) -> str:  # fmt: skip
    """Write `source` converted as a committed checkpoint under the root `out` (`to`: "dcp" or
    "deepspeed"; the stage and dtype default to the run's); its URL."""
    checkpoint = open_checkpoint(source)
    saved = checkpoint.json("config.json")
    url = checkpoint.store.url_of(checkpoint.name, "train_state.json")
    try:
        state = TrainState.from_dict(checkpoint.json("train_state.json"), url)
        run = build_section(JobConfig, saved, "")
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.url}: {exc}") from None
    target = Target(to, world_size, zero_stage or run.parallel.zero_stage, dtype or run.train.dtype)
    before = f"{saved_layout(state, saved)} on {state.world_size} rank(s)"
    print(f"converting {checkpoint.url} ({before}) to {target.layout()} on "
          f"{target.world_size} rank(s) under {out}", flush=True)  # fmt: skip
    config = target_config(run, target)  # its errors before any process starts
    change = f"esmdist convert: {before} → {target.layout()} on {target.world_size} rank(s)"
    converted = dataclasses.replace(
        state, world_size=target.world_size, backend=config.parallel.backend,
        changes=[*state.changes, {"step": state.step, "change": change}],
    )  # fmt: skip
    job = (source, out, config, converted)
    if target.world_size == 1:
        _convert_rank(0, *job, None)
    else:
        import torch.multiprocessing as mp

        from esmdist.parallel import free_port

        try:
            mp.start_processes(_convert_rank, args=(*job, free_port()),
                               nprocs=target.world_size, start_method="spawn")  # fmt: skip
        except mp.ProcessException as exc:  # a rank's error: its last line names the cause
            last = str(exc).strip().splitlines()[-1]
            raise RuntimeError(f"the conversion failed on rank {exc.error_index}: {last}") from None
    return f"{out.rstrip('/')}/{checkpoint.name}"


def _convert_rank(rank: int, source: str, out: str, config: JobConfig, state: TrainState,
                  port: int | None) -> None:  # fmt: skip
    """One process of the conversion: the target engine loads the whole state of `source`,
    then saves it with `state` (the converted train state) and `config`."""
    from esmdist.parallel import init_distributed
    from esmdist.train import engine_for

    if port is not None:  # CPU processes: a GPU node's devices are not needed here
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(state.world_size),
                          LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          CUDA_VISIBLE_DEVICES="")  # fmt: skip
    # The engine only holds state here: one micro-batch per step, nothing compiled.
    micro = config.data.crop_length
    train = dataclasses.replace(config.train, compile="false",
                                tokens_per_step=micro * state.world_size)  # fmt: skip
    data = dataclasses.replace(config.data, max_tokens=micro)
    info = init_distributed(config.parallel.backend)
    engine = engine_for(dataclasses.replace(config, train=train, data=data), info)
    checkpoint = open_checkpoint(source)
    checkpointer = Checkpointer(CheckpointConfig(root=out), out)
    checkpointer.begin(None)
    try:
        checkpointer.load(checkpoint, engine, convert=True)
        checkpointer.save(state.step, engine, state.to_dict(), config.to_dict())
    finally:
        checkpointer.close()
    if info.is_main:
        print(f"wrote {checkpointer.store.url_of(checkpoint.name)} (committed)", flush=True)
    sys.stdout.flush()


def add_convert(sub) -> None:
    convert_parser = sub.add_parser(
        "convert",
        help="rewrite a checkpoint for another backend, ZeRO stage or world size",
        description="Rewrite the committed checkpoint CKPT (…/step_NNNNNNNNN, local or s3://; "
        "DCP or DeepSpeed ZeRO) under the new checkpoint root --out: as DCP (--to dcp: resumes "
        "under single, ddp and fsdp on any world size) or as DeepSpeed ZeRO files (--to "
        "deepspeed) for --world-size ranks. A resume converts by itself; this does it ahead "
        "of time. Runs --world-size CPU processes.",
    )
    convert_parser.add_argument("source", help="committed checkpoint directory")
    convert_parser.add_argument("--to", choices=["dcp", "deepspeed"], required=True)
    convert_parser.add_argument("--out", required=True, help="new checkpoint root (empty)")
    convert_parser.add_argument("--world-size", type=int, default=1,
                                help="deepspeed: the ranks the checkpoint is for (default 1)")  # fmt: skip
    convert_parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3],
                                help="deepspeed: the ZeRO stage (default: the run's)")  # fmt: skip
    convert_parser.add_argument("--dtype", choices=["fp32", "bf16"],
                                help="deepspeed: the weights' dtype (default: the run's)")  # fmt: skip
    convert_parser.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    if args.to == "dcp" and args.world_size != 1:
        raise ValueError("--world-size: a DCP checkpoint resumes on any world size; leave it out")
    if not 1 <= args.world_size <= 4096:
        raise ValueError("--world-size: give 1 to 4096 ranks")
    url = convert(args.source, args.out, args.to, args.world_size, args.zero_stage, args.dtype)
    print(f"converted: {url}")
    return 0

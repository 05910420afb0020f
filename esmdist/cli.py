"""`esmdist` command line: shard, export, convert, eval, check, submit (Slurm), status, plan.

Each subcommand is a thin layer over a library function so that everything it does can also be
called (and tested) from Python.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from esmdist.process import run_entry_point


def _cmd_export(args: argparse.Namespace) -> int:
    from esmdist.export import model_weights
    from esmdist.model import convert

    config, state = model_weights(args.source)
    if args.to == "hf":
        out = convert.save_hf(state, config, args.out)
    else:
        out = Path(args.out)
        convert.save_fair_esm_checkpoint(state, config, out)
    print(f"exported {config.arch} ({config.num_params():,} parameters) to {out}")
    return 0


def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
    """`valid=0.005,test=0.0` → (("valid", 0.005), ("test", 0.0)); train takes the rest."""
    splits = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "train":
            raise ValueError(
                f"--split: {part!r} is not NAME=FRACTION with a lowercase name other than train"
            )
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"--split: {part!r}: {value!r} is not a number") from None
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"--split: {part!r}: the fraction must be in [0, 1)")
        splits.append((name, fraction))
    if sum(f for _, f in splits) >= 1.0:
        raise ValueError(
            "--split: held-out fractions must sum to less than 1 (train gets the rest)"
        )
    if len({n for n, _ in splits}) != len(splits):
        raise ValueError("--split: a split name is repeated")
    return tuple(splits)


def parse_size(text: str) -> int:
    """`256MB`, `1GiB`, `512k`, `1000` → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"--shard-size: cannot read {text!r}; write e.g. 256MB")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit or "_"))


def _cmd_shard(args: argparse.Namespace) -> int:
    from esmdist.shard import ShardOptions, format_report, run_sharding

    options = ShardOptions(
        inputs=tuple(args.inputs),
        out=args.out,
        clusters=args.clusters,
        splits=parse_splits(args.split),
        seed=args.seed,
        min_length=args.min_length,
        max_length=args.max_length,
        on_invalid=args.on_invalid,
        on_missing_member=args.on_missing_member,
        dedupe=args.dedupe,
        shard_bytes=None if args.shard_samples is not None else parse_size(args.shard_size),
        shard_samples=args.shard_samples,
    )
    work_dir = Path(args.work_dir) if args.work_dir else None
    manifest = run_sharding(options, args.workers, work_dir, args.keep_work, args.restart)
    print(format_report(manifest))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from esmdist.config import load_config
    from esmdist.preflight import problems

    config = load_config(args.config, args.overrides)
    found = problems(config, args.world_size)
    for problem in found:
        print(f"esmdist check: {problem}", file=sys.stderr)
    if found:
        return 2
    micro = ("micro-batch chosen at launch: data.max_tokens = auto" if config.data.max_tokens == "auto"
             else f"{config.accumulation(args.world_size)} micro-batch(es) per rank per step")  # fmt: skip
    print(f"ok: {args.config} for world size {args.world_size} ({micro}); data "
          f"{config.data.path} readable; checkpoint root {config.checkpoint_root} writable; "
          "packages and credentials present")  # fmt: skip
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from esmdist.config import load_config
    from esmdist.status import run_status

    status = run_status(load_config(args.config, args.overrides))
    print(status.describe())
    return 0 if status.finished else 3 if status.stopped else 1


def _job_options(args: argparse.Namespace, job_name: str, ntasks_per_node: int, **fixed):
    from esmdist.slurm.submit import JobOptions, node_range

    low, high = node_range(args.nodes)
    options = dict(
        job_name=args.job_name or job_name, time=args.time, nodes=low, max_nodes=high,
        ntasks_per_node=ntasks_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, partition=args.partition,
        account=args.account, qos=args.qos, dependency=args.dependency,
        log_dir=Path(args.log_dir), signal_seconds=args.signal_seconds or None,
        max_restarts=args.max_restarts, container_image=args.container_image,
        container_mounts=args.container_mounts, sbatch_args=tuple(args.sbatch_arg),
    )  # fmt: skip
    return JobOptions(**{**options, **fixed})


def _checked_for_submit(args: argparse.Namespace, config_path: str, world_sizes: list[int]):
    """The run's config after `esmdist check`'s checks for every world size the job may start
    on, before anything is queued (printed or not): the storage ones too, unless the job waits
    on another (--dependency: its data may be what that job writes)."""
    from esmdist.config import load_config
    from esmdist.preflight import storage_problems

    config = load_config(config_path, args.overrides)
    found = _world_size_problems(config, world_sizes)
    if not found and not args.dependency:
        found = storage_problems(config)
    elif not found:
        print(f"esmdist submit: --dependency {args.dependency}: the data and checkpoint root "
              "are checked when the job starts", file=sys.stderr)  # fmt: skip
    if found:
        raise ValueError("; ".join(found))
    return config


def _world_size_problems(config, world_sizes: list[int]) -> list[str]:
    """`quick_problems` for one world size; for several (`--nodes MIN-MAX`), each that cannot
    keep the step's tokens is named with the ones that can (a checkpoint of any engine resumes
    on any world size: `esmdist.checkpoint.full_state`)."""
    from esmdist.preflight import quick_problems

    if len(world_sizes) == 1:
        return quick_problems(config, world_sizes[0])
    found = {size: quick_problems(config, size) for size in world_sizes}
    good = [size for size, problems in found.items() if not problems]
    bad = {size: problems for size, problems in found.items() if problems}
    if not bad:
        return []
    first = next(iter(bad.values()))[0]
    return [f"--nodes: on {', '.join(map(str, bad))} rank(s) the run cannot start ({first}); "
            + (f"world sizes that work: {', '.join(map(str, good))}" if good
               else "no world size in the range works")]  # fmt: skip


def _cmd_submit(args: argparse.Namespace) -> int:
    from esmdist.slurm.submit import render, submit

    if args.job == "shard":
        build_parser().parse_args(["shard", *args.overrides])  # its errors before the queue
        options = _job_options(args, "esmdist-shard", 1, signal_seconds=None)
        if options.node_counts != [1]:
            raise ValueError("the sharding job runs on one node (--nodes 1)")
        script = render("shard.sbatch", options, args.overrides, "esmdist submit shard")
    else:
        config_path = str(Path(args.config).resolve())
        tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
        counts = _job_options(args, "esmdist", tasks).node_counts  # its errors first
        config = _checked_for_submit(args, config_path, [n * tasks for n in counts])
        # One core per loader worker besides the rank's own, unless asked otherwise.
        cores = {} if args.cpus_per_task else {"cpus_per_task": config.data.num_workers + 1}
        options = _job_options(args, f"esmdist-{Path(args.config).stem}", tasks, **cores)
        script = render("pretrain.sbatch", options, [config_path, *args.overrides], config_path)
    # Slurm opens the log before the script runs, and fails the job if its folder is missing:
    # made now, also for a printed script that is submitted later.
    options.log_dir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        print(script, end="")
        return 0
    job = submit(script)
    log = (options.log_dir.resolve() / f"{options.job_name}-{job}.out").as_posix()
    print(f"submitted job {job}; log: {log}")
    return 0


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export",
        help="convert a model to Hugging Face or fair-esm format",
        description="Convert SOURCE — an esmdist checkpoint directory (…/step_000001000, local "
        "or s3://; DCP or DeepSpeed ZeRO shards are consolidated), a fair-esm checkpoint file "
        "(e.g. esm2_t6_8M_UR50D.pt, with its -contact-regression.pt companion beside it if "
        "present) or a Hugging Face EsmForMaskedLM directory — to OUT.",
    )
    export.add_argument("source", help="esmdist checkpoint, fair-esm .pt file or HF directory")
    export.add_argument("--to", choices=["hf", "fair-esm"], required=True,
                        help="hf: a directory loadable by EsmForMaskedLM.from_pretrained; "
                        "fair-esm: a .pt file loadable by esm.pretrained.load_model_and_alphabet_local "
                        "(name it esm2_*.pt for ESM-2: fair-esm picks the format from the name)")  # fmt: skip
    export.add_argument("out", help="output directory (hf) or .pt file (fair-esm)")
    export.set_defaults(func=_cmd_export)


def _add_shard(sub) -> None:
    shard = sub.add_parser(
        "shard",
        help="FASTA (+ cluster table) → webdataset shards + parquet index + manifest",
        description="Validate and shard UniParc/UniProtKB/UniRef FASTA into webdataset tar shards "
        "split by a stable hash, with shards.parquet, index/*.parquet and manifest.json (written "
        "last). Output bytes depend only on inputs and options. A rerun with the same options "
        "resumes an interrupted run. Format: shards/README.md.",
    )
    shard.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="FASTA files (.gz/.zst ok), local paths or s3:// URLs")  # fmt: skip
    shard.add_argument("--out", required=True, help="output directory or s3:// prefix")
    shard.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                       help="worker processes (default: CPU count − 1)")  # fmt: skip
    shard.add_argument("--clusters", metavar="MEMBERS.tsv",
                       help="cluster<TAB>member table (MMseqs2 createtsv, UniRef membership): one "
                       "sample per cluster holding its member sequences")  # fmt: skip
    shard.add_argument("--split", default="valid=0.005,test=0.0",
                       help="held-out fractions by cluster (or sequence); train gets the rest "
                       "(default: %(default)s)")  # fmt: skip
    shard.add_argument("--seed", type=int, default=0, help="seed of the split and order hashes")
    shard.add_argument("--min-length", type=int, default=1, help="skip (and count) shorter")
    shard.add_argument("--max-length", type=int, default=None, help="skip (and count) longer")
    shard.add_argument("--on-invalid", choices=["error", "skip", "map-x"], default="error",
                       help="characters outside the ESM alphabet, internal '*', empty records, "
                       "duplicate ids: stop with an error naming the record, skip and count, or "
                       "map bad characters to X (default: error)")  # fmt: skip
    shard.add_argument("--on-missing-member", choices=["error", "skip"], default="error",
                       help="a sequence absent from --clusters: error, or skip and count")  # fmt: skip
    shard.add_argument("--dedupe", action="store_true",
                       help="drop exact duplicate sequences (within a cluster with --clusters, "
                       "else across all inputs), keeping the smallest id; counted")  # fmt: skip
    size = shard.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="256MB", help="target tar size (default 256MB)")
    size.add_argument("--shard-samples", type=int, help="samples per shard instead of a size")
    shard.add_argument("--work-dir", help="spill/resume directory (default: OUT/_work, or a "
                       "temporary directory for s3:// outputs)")  # fmt: skip
    shard.add_argument("--keep-work", action="store_true", help="keep the work directory")
    shard.add_argument("--restart", action="store_true",
                       help="discard an unfinished run in the work directory (e.g. one that "
                       "failed, to rerun it with other options) instead of resuming it")  # fmt: skip
    shard.set_defaults(func=_cmd_shard)


def _add_check(sub) -> None:
    check = sub.add_parser(
        "check",
        help="check a run's config, data, checkpoint root, packages and credentials",
        description="What would stop the run, found before any process starts: the config's "
        "consistency for the world size, the optional packages it needs (deepspeed, wandb, "
        "s3fs), AWS credentials for its s3:// paths, the dataset's manifest and shard table, a "
        "test write in the checkpoint root (removed again), model.init_from's existence. One "
        "line per problem, naming the key; exit 2 if any. Run it before sbatch.",
    )
    check.add_argument("--config", required=True, help="the run's TOML config")
    check.add_argument("--world-size", type=int, default=1,
                       help="ranks the run will have (nodes × GPUs per node; default 1)")  # fmt: skip
    check.set_defaults(func=_cmd_check, overrides=[])


def _add_status(sub) -> None:
    status = sub.add_parser(
        "status",
        help="where a training run stands (exit 0 finished, 3 stopped with a checkpoint, 1 not)",
        description="Print the run's newest committed checkpoint step, its max_steps and whether "
        "it finished (final export written). Exit status: 0 finished; 3 unfinished, the last "
        "attempt stopped on request after committing its checkpoint; 1 unfinished; 2 error. "
        "The Slurm job script decides on requeueing with it.",
    )
    status.add_argument("--config", required=True, help="the run's TOML config")
    status.set_defaults(func=_cmd_status, overrides=[])


def _submit_options() -> argparse.ArgumentParser:
    """The #SBATCH side of `esmdist submit pretrain|shard`."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--time", required=True, help="time limit per start, e.g. 24:00:00")
    options.add_argument("--nodes", default="1",
                         help="nodes (default 1), or Slurm's range MIN-MAX: the job starts on "
                         "what it is given, and a requeued start on another count resumes on "
                         "it (the step's tokens kept; every count checked now)")  # fmt: skip
    options.add_argument("--gpus-per-node", type=int, default=0,
                         help="GPUs per node, one rank each; 0 for CPU ranks (default 0)")  # fmt: skip
    options.add_argument("--cpus-per-task", type=int, help="CPU cores per rank")
    options.add_argument("--mem", help="memory per node, e.g. 256G")
    for name in ("partition", "account", "qos"):
        options.add_argument(f"--{name}", help=f"Slurm {name}")
    options.add_argument("--dependency", help="e.g. afterok:JOBID (start after that job)")
    options.add_argument("--job-name", help="default: esmdist-CONFIG_STEM / esmdist-shard")
    options.add_argument("--log-dir", default="logs",
                         help="the job's one log file goes here as NAME-JOBID.out (default logs)")  # fmt: skip
    options.add_argument("--signal-seconds", type=int, default=300,
                         help="SIGUSR1 this long before the time limit, to checkpoint and "
                         "requeue (default 300; 0 for none)")  # fmt: skip
    options.add_argument("--max-restarts", type=int, default=100,
                         help="requeue at most this many times (default 100)")  # fmt: skip
    options.add_argument("--container-image",
                         help="Pyxis/Enroot image for the ranks (srun --container-image)")  # fmt: skip
    options.add_argument("--container-mounts", help="default: the submit directory")
    options.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                         help="an extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")  # fmt: skip
    options.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    return options


def _add_submit(sub) -> None:
    submit = sub.add_parser(
        "submit",
        help="submit a Slurm job: pretraining (the default) or sharding",
        description="Render a Slurm job script from esmdist/slurm/{pretrain,shard}.sbatch with "
        "#SBATCH lines from the options and submit it with sbatch (prints the job id), or print "
        "it with --dry-run. `esmdist submit [pretrain] --config C --nodes N --gpus-per-node G "
        "--time T [-- --section.key=value ...]`; `esmdist submit shard --time T --cpus-per-task "
        "32 -- INPUT... --out OUT [esmdist shard options]`. Walk-through: docs/operations.md.",
    )
    jobs = submit.add_subparsers(dest="job", required=True)
    options = _submit_options()
    pretrain = jobs.add_parser("pretrain", parents=[options], help="multi-node pretraining")
    pretrain.add_argument("--config", required=True, help="the run's TOML config")
    pretrain.add_argument("--tasks-per-node", type=int,
                          help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")  # fmt: skip
    pretrain.add_argument("overrides", nargs="*", metavar="-- --section.key=value",
                          help="config overrides, after --")  # fmt: skip
    shard = jobs.add_parser("shard", parents=[options], help="sharding on one node")
    shard.add_argument("overrides", nargs="*", metavar="-- INPUT... --out OUT",
                       help="the `esmdist shard` arguments, after --")  # fmt: skip
    for job in (pretrain, shard):
        job.set_defaults(func=_cmd_submit)


def _cmd_plan(args: argparse.Namespace) -> int:
    from esmdist.model import model_config
    from esmdist.plan import Setup, describe, parse_bytes, plan

    def setup(gpus: int) -> Setup:
        return Setup(model_config(args.model), gpus, parse_bytes(args.gpu_memory), args.backend,
                     args.zero, args.activation_checkpointing, args.recompute_every,
                     args.tokens_per_gpu, args.tokens_per_step, args.dtype, args.mfu,
                     args.peak_tflops, prefetch_blocks=args.prefetch_blocks,
                     overlap_comm=not args.no_overlap_comm,
                     bucket_elements=args.bucket_elements)  # fmt: skip

    print(describe(plan(setup(args.gpus)), args.budget_tokens))
    if args.scaling:
        print(f"\nscaling on paper ({args.backend}, {args.tokens_per_step:,} tokens per step):")
        print(f"{'GPUs':>6} {'tokens/s':>14} {'per GPU':>10} {'efficiency':>11} {'memory':>10}")
        for gpus in (1, 8, 64, 256):
            if args.backend == "single" and gpus > 1:
                break
            found = plan(setup(gpus))
            fits = "" if found.fits else "  DOES NOT FIT"
            print(f"{gpus:>6} {found.tokens_per_s:>14,.0f} {found.tokens_per_s / gpus:>10,.0f} "
                  f"{found.scaling_efficiency:>11.1%} {found.total_bytes / 1e9:>7.1f} GB{fits}")  # fmt: skip
    return 0


def _add_plan(sub) -> None:
    from esmdist.model.config import MODEL_SIZES
    from esmdist.plan import BACKENDS, MEASURED_MFU

    plan = sub.add_parser(
        "plan", help="memory per GPU, throughput and wall time of a run, on paper",
        description="Memory per GPU (parameters, gradients, optimizer state, activations, "
        "buffers), expected tokens/s and the wall time of a token budget for a model size on N "
        "GPUs; formulas and their check against measured peaks: docs/PERFORMANCE.md.",
    )  # fmt: skip
    plan.add_argument("--model", required=True, choices=list(MODEL_SIZES))
    plan.add_argument("--gpus", type=int, default=1)
    plan.add_argument("--gpu-memory", default="80GB", help="per GPU (default: %(default)s)")
    plan.add_argument("--backend", default="fsdp", choices=BACKENDS)
    plan.add_argument("--zero", type=int, default=3, choices=[1, 2, 3], help="DeepSpeed stage")
    plan.add_argument("--activation-checkpointing", action="store_true")
    plan.add_argument("--recompute-every", type=int, default=1, metavar="N",
                      help="with checkpointing: every N-th block recomputed (default: all)")  # fmt: skip
    plan.add_argument("--prefetch-blocks", type=int, default=1, metavar="N",
                      help="FSDP: blocks all-gathered ahead (default: %(default)s)")  # fmt: skip
    plan.add_argument("--no-overlap-comm", action="store_true",
                      help="DeepSpeed: without ZeRO's overlap_comm (one reduction buffer)")  # fmt: skip
    plan.add_argument("--bucket-elements", type=int, default=200_000_000,
                      help="DeepSpeed: elements per reduction bucket (default: %(default)s)")  # fmt: skip
    plan.add_argument("--tokens-per-gpu", type=int, default=16384, help="micro-batch tokens")
    plan.add_argument("--tokens-per-step", type=int, default=2_097_152,
                      help="global tokens per optimizer step (default: ESM-2's 2M)")  # fmt: skip
    plan.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    plan.add_argument("--mfu", type=float, default=MEASURED_MFU,
                      help="model FLOPs utilisation to assume (default: %(default)s, measured "
                      "step-level for 650M on an H200)")  # fmt: skip
    plan.add_argument("--peak-tflops", type=float, default=989.0,
                      help="dense peak per GPU in --dtype (default: H100/H200 bf16)")  # fmt: skip
    plan.add_argument("--budget-tokens", type=float, default=500_000 * 2_097_152,
                      help="tokens to train on (default: ESM-2's 500k steps × 2M)")  # fmt: skip
    plan.add_argument("--scaling", action="store_true", help="also 1, 8, 64 and 256 GPUs")
    plan.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esmdist",
        description="Distributed pretraining of ESM-2 / ESM-1b protein language models.",
    )
    from esmdist.version import version_info

    about = version_info()
    parser.add_argument("--version", action="version",
                        version=f"esmdist {about['esmdist']} (git {about['git_commit']})")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    from esmdist.cli_eval import add_eval, add_plot
    from esmdist.convert import add_convert

    for add in (_add_export, add_convert, _add_shard, add_eval, add_plot, _add_check, _add_submit,
                _add_status, _add_plan):  # fmt: skip
        add(sub)
    return parser


OUTPUT_OPTIONS = ("out", "plot")
"""What any command writes (`--out`, `--plot`; export's OUT): checked against everything else
the command was given before anything runs."""


def _check_outputs(args: argparse.Namespace) -> None:
    """No output may be one of the command's inputs — every other path it was given, whatever
    the option — or lie inside a committed checkpoint or a checkpoint root
    (esmdist.checkpoint.check_output)."""
    from esmdist.checkpoint import check_output

    given = [v for k, value in vars(args).items() if k not in OUTPUT_OPTIONS
             for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]  # fmt: skip
    for name in OUTPUT_OPTIONS:
        out = getattr(args, name, None)
        if isinstance(out, str) and out:
            check_output(out, given, "OUT" if args.command == "export" else f"--{name}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"] and argv[1:2] not in (["pretrain"], ["shard"], ["-h"], ["--help"]):
        argv.insert(1, "pretrain")  # `esmdist submit --config …` is the pretraining job
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # status and submit take config overrides (--section.key=value) as the trainer does.
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        _check_outputs(args)
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"esmdist {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """The `esmdist` command (and `python -m esmdist.cli`)."""
    run_entry_point("esmdist", main)


if __name__ == "__main__":
    run()

"""The trainer's process, whatever started it: arguments → config, `esmdist check`'s start-up
checks, `esmdist.train.train`, and the exit status each way of ending maps to (0 done, 75 stopped
by a signal with a checkpoint saved, 2 a user error with its message, 130 a second Ctrl-C).
`esmdist.pretrain` is its entry point."""

from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from esmdist.config import JobConfig, config_keys, load_config
from esmdist.data.stream import DataError
from esmdist.preflight import quick_problems, storage_problems, world_size_from_environment
from esmdist.storage import StorageError
from esmdist.train import BadStepsError, Preempted, train

# Exit status after a SIGUSR1/SIGTERM/SIGINT stop with a saved checkpoint (EX_TEMPFAIL): the
# Slurm job script reads the file PREEMPTED_MARKER in train.output_dir as well (esmdist.status),
# since srun reports whichever rank's status it sees first.
PREEMPTED_EXIT = 75


def parse_args(argv: list[str] | None) -> tuple[JobConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Pretrain an ESM model. Override any config key with --section.key=value.",
        epilog="Example: launcher/pretrain.py --config configs/debug-cpu.toml "
        "--train.max_steps=50 --parallel.backend=fsdp\n\nConfig keys and their defaults:\n  "
        + "\n  ".join(config_keys()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML run config (configs/*.toml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is used")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    return load_config(args.config, rest), args


def main(argv: list[str] | None = None) -> int:
    # Object storage: ride out short outages with botocore's own retries (checkpoint writes
    # also retry at the file level, see esmdist.storage).
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "10")
    try:
        config, _ = parse_args(argv)
        # Before any process group or DeepSpeed op build (minutes): `esmdist check`'s checks,
        # those that touch storage on the first rank only (its failure ends the others: every
        # launcher stops a job's ranks when one exits with an error).
        found = quick_problems(config, world_size_from_environment())
        if not found and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            found = storage_problems(config)
        if found:
            raise ValueError("; ".join(found))
        train(config)
    except Preempted as exc:
        print(f"pretrain: {exc}; exiting with {PREEMPTED_EXIT} for requeue", flush=True)
        return PREEMPTED_EXIT
    except (ValueError, OSError, DataError, BadStepsError, StorageError) as exc:
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

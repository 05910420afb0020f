"""Checks before a run starts (`esmdist check`, and the launcher before any process group or
DeepSpeed op build): each problem is one line naming the key and the fix.

Quick checks (every rank): the config for this world size, the optional packages the config
needs, credentials for its s3:// paths. Storage checks (`esmdist check`, and the launcher's
first rank): the dataset's manifest and shard table, a test write in the checkpoint root, the
init_from weights' existence.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from esmdist.config import JobConfig


def world_size_from_environment() -> int:
    """The world size a launcher (torchrun, deepspeed, srun) announced; 1 for plain python."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _s3_paths(config: JobConfig) -> dict[str, str]:
    paths = {"data.path": config.data.path, "checkpoint.root": config.checkpoint_root,
             "model.init_from": config.model.init_from}  # fmt: skip
    return {key: path for key, path in paths.items() if path.startswith("s3://")}


def _missing_packages(config: JobConfig) -> list[str]:
    wanted = []  # (module, what in the config needs it, the extra that installs it)
    if config.parallel.backend == "deepspeed":
        wanted.append(("deepspeed", "parallel.backend = 'deepspeed'", "deepspeed"))
    if config.log.wandb:
        wanted.append(("wandb", "log.wandb = true", "wandb"))
    if _s3_paths(config):
        wanted.append(("s3fs", f"{', '.join(_s3_paths(config))} on s3://", "s3"))
    if config.train.valid_contacts:
        wanted += [(module, "train.valid_contacts", "eval") for module in ("biotite", "sklearn")]
    return [f"{why} needs the {module} package: pip install -e '.[{extra}]' (or change it)"
            for module, why, extra in wanted if importlib.util.find_spec(module) is None]  # fmt: skip


def _missing_credentials(config: JobConfig) -> list[str]:
    paths = _s3_paths(config)
    if not paths or importlib.util.find_spec("botocore") is None:
        return []
    import botocore.session

    if botocore.session.get_session().get_credentials() is not None:
        return []
    keys = ", ".join(paths)
    return [f"{keys} on s3:// but no AWS credentials are set: export AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (AWS_ENDPOINT_URL for a non-AWS server), or AWS_PROFILE"]  # fmt: skip


def quick_problems(config: JobConfig, world_size: int) -> list[str]:
    problems = []
    try:
        config.check(world_size)
    except ValueError as exc:
        problems.append(str(exc))
    for key in ("valid_contacts", "valid_contacts_fit"):
        path = getattr(config.train, key)
        if path and not Path(path).exists():
            problems.append(f"train.{key} ({path}): no such structure file or directory")
    return problems + _missing_packages(config) + _missing_credentials(config)


def storage_problems(config: JobConfig) -> list[str]:
    """What needs the storage itself: run after the quick checks passed."""
    from esmdist.data.stream import DataError, ShardSet
    from esmdist.export import model_source_exists
    from esmdist.storage import StorageError, Store

    problems = []
    try:
        ShardSet.open(config.data.path, "train")
    except (DataError, FileNotFoundError, StorageError, OSError) as exc:
        problems.append(f"data.path: {exc}")
    try:
        Store(config.checkpoint_root, config.checkpoint.retries).check_writable()
    except (StorageError, OSError) as exc:
        problems.append(f"checkpoint.root ({config.checkpoint_root}): {exc}")
    if config.model.init_from and not model_source_exists(config.model.init_from):
        problems.append(f"model.init_from: {config.model.init_from} does not exist")
    return problems


def problems(config: JobConfig, world_size: int) -> list[str]:
    """Everything `esmdist check` looks at."""
    found = quick_problems(config, world_size)
    return found or storage_problems(config)

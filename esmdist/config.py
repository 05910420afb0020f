"""Typed run configuration: one small dataclass per component, composed into `JobConfig`.

A run is a TOML file (`configs/*.toml`) with one table per component, overridden from the
command line with dotted keys (`--train.max_steps=50 --parallel.backend=fsdp`). Unknown keys,
values of the wrong type and inconsistent combinations are errors that name the key. The
resolved config is printed at start and saved with every checkpoint (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esmdist.checkpoint import CheckpointConfig
from esmdist.data.stream import DataConfig
from esmdist.model.config import MODEL_SIZES, ModelConfig
from esmdist.optim import OptimConfig
from esmdist.parallel.config import ParallelConfig
from esmdist.ranges import bounded, check_fields

MAX_ACCUMULATION = 4096
"""Micro-batches per rank and optimizer step at most: the loop gathers a step's micro-batches
before its first backward (the masked-token count normalises every loss), so the count bounds
its memory. 2M tokens per step of 512-token micro-batches on one GPU is 4,096."""


@dataclass(frozen=True)
class ModelSpec:
    size: str = "debug"
    """A named size from esmdist.model.MODEL_SIZES."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields that differ from the named size (e.g. {num_layers = 4})."""
    init_from: str = ""
    """Start a new run from these weights (continued pretraining): a fair-esm .pt file, a
    Hugging Face EsmForMaskedLM directory or an esmdist checkpoint, local or s3://. Weights
    only: optimizer, schedule and data position start fresh; a resume continues the run."""

    def build(self) -> ModelConfig:
        if self.size not in MODEL_SIZES:
            raise ValueError(
                f"model.size: unknown size {self.size!r}; known: {', '.join(MODEL_SIZES)}"
            )
        base = MODEL_SIZES[self.size].to_dict()
        unknown = sorted(set(self.overrides) - set(base))
        if unknown:
            raise ValueError(f"model.overrides: unknown key(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(ModelConfig)
        changed = {
            k: _coerce(v, hints[k], f"model.overrides.{k}") for k, v in self.overrides.items()
        }
        return ModelConfig.from_dict({**base, **changed})

    def check_init(self, source: ModelConfig) -> None:
        """The weights of `init_from` (architecture `source`) must be this model's."""
        wanted, found = self.build().to_dict(), source.to_dict()
        differ = [k for k in wanted if wanted[k] != found.get(k)]
        if not differ:
            return
        sizes = [name for name, size in MODEL_SIZES.items() if size == source]
        fix = (f'set model.size = "{sizes[0]}"' if sizes and not self.overrides
               else "set model.size and model.overrides to the file's architecture")  # fmt: skip
        raise ValueError(
            f"model.init_from: {self.init_from} is "
            + ", ".join(f"{k}={found.get(k)!r}" for k in differ)
            + f"; model.size {self.size!r} gives "
            + ", ".join(f"{k}={wanted[k]!r}" for k in differ)
            + f": {fix}"
        )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = bounded(500_000, 1, 10**10)
    tokens_per_step: int = bounded(2_097_152, 1, 2**34)
    """Tokens per optimizer step = micro-batch tokens × accumulation × world size (ESM-2: ~2M)."""
    seed: int = bounded(0, 0, 2**63 - 1)
    """Seed of the model initialisation."""
    log_every: int = bounded(10, 1, 10**9)
    valid_every: int = bounded(1000, 0, 10**9)
    """Steps between validation perplexity evaluations (0: never)."""
    valid_contacts: str = ""
    """Structures (a file or a directory, e.g. data/eval/structures/test) whose long-range
    contact precision is logged at each validation as valid_contact_p_at_l_long, with the
    contact regression fitted afresh on `valid_contacts_fit` (eval extra; "": off)."""
    valid_contacts_fit: str = ""
    """Structures to fit that regression on (e.g. data/eval/structures/fit)."""
    max_bad_steps: int = bounded(5, 1, 10**6)
    """NaN/Inf loss or gradient: the step is skipped and counted; this many in a row abort."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    recompute_every: int = bounded(1, 1, 1024)
    """With activation_checkpointing: recompute every n-th block's activations in backward (1:
    all; 2: every other — about half the memory of no recomputation, half the extra compute
    of recomputing all)."""
    compile: Literal["auto", "true", "false"] = "auto"
    """Compile the transformer blocks (esmdist.parallel.compile; 1.45× at 650M on an H200).
    "auto": on CUDA devices, off on CPUs (where compiling costs more than a short run gains);
    never under DeepSpeed. A failed compilation falls back to eager with one warning."""
    compile_cache: str = ""
    """Directory of compiled code (TORCHINDUCTOR_CACHE_DIR, unless the environment sets it):
    "" → {output_dir}/compile_cache, where a requeued job finds it and starts without
    compiling again."""
    output_dir: str = "out/run"
    """Local directory for metrics.jsonl, the resolved config and wandb's offline files."""

    def compiles(self, device: str, backend: str) -> bool:
        """Whether the blocks are compiled on a `device` ("cuda", "cpu") under `backend`."""
        wanted = self.compile == "true" or (self.compile == "auto" and device == "cuda")
        return wanted and backend != "deepspeed"

    @property
    def compile_cache_dir(self) -> str:
        return self.compile_cache or str(Path(self.output_dir) / "compile_cache")

    def __post_init__(self) -> None:
        check_fields(self, "train")
        if not self.output_dir:
            raise ValueError("train.output_dir must not be empty")
        if bool(self.valid_contacts) != bool(self.valid_contacts_fit):
            raise ValueError("valid_contacts and valid_contacts_fit go together: the structures "
                             "to score and those to fit the contact regression on")  # fmt: skip


@dataclass(frozen=True)
class LogConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline unless an API key is configured; WANDB_MODE wins)."""
    project: str = "esmdist"
    run_name: str = ""


@dataclass(frozen=True)
class JobConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        # Across sections, known at load time: before any process starts.
        if self.optim.warmup_steps >= self.train.max_steps and self.train.max_steps > 1:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be below train.max_steps "
                f"({self.train.max_steps})"
            )
        if self.train.compile == "true" and self.parallel.backend == "deepspeed":
            raise ValueError("train.compile = true: esmdist compiles the blocks under single, ddp "
                             "and fsdp; under deepspeed set it to auto or false")  # fmt: skip
        model = self.model.build()
        if model.arch == "esm1b" and self.data.crop_length > model.max_positions:
            raise ValueError(
                f"data.crop_length ({self.data.crop_length}) exceeds ESM-1b's "
                f"{model.max_positions} learned positions (<cls> + {model.max_positions - 2} "
                f"residues + <eos>): set data.crop_length to at most {model.max_positions}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def checkpoint_root(self) -> str:
        """checkpoint.root, or by default `{train.output_dir}/checkpoints`."""
        return self.checkpoint.root or str(Path(self.train.output_dir) / "checkpoints")

    def check(self, world_size: int) -> None:
        """What a run needs beyond each section's own checks, some of it depending on the
        launch: raises naming the keys to change."""
        if not self.data.path:
            raise ValueError("data.path is empty: point it at a directory written by esmdist shard")
        if self.data.max_tokens == "auto":
            per_rank = self.train.tokens_per_step // world_size
            if (
                per_rank * world_size != self.train.tokens_per_step
                or per_rank < self.data.crop_length
            ):
                raise ValueError(
                    f"train.tokens_per_step ({self.train.tokens_per_step}) must be a multiple of "
                    f"the world size ({world_size}), at least data.crop_length "
                    f"({self.data.crop_length}) per rank, for data.max_tokens = auto"
                )
            return self._check_backend(world_size)
        per_step = self.data.max_tokens * world_size
        if self.train.tokens_per_step % per_step:
            raise ValueError(
                f"train.tokens_per_step ({self.train.tokens_per_step}) must be a multiple of "
                f"data.max_tokens × world size ({self.data.max_tokens} × {world_size} = {per_step})"
            )
        if self.train.tokens_per_step // per_step > MAX_ACCUMULATION:
            raise ValueError(
                f"train.tokens_per_step ({self.train.tokens_per_step}) is "
                f"{self.train.tokens_per_step // per_step:,} micro-batches per rank and step of "
                f"data.max_tokens ({self.data.max_tokens}) on {world_size} rank(s), past the "
                f"{MAX_ACCUMULATION:,} a step may hold (each is kept in memory until the step's "
                "first backward): raise data.max_tokens or lower train.tokens_per_step"
            )
        self._check_backend(world_size)

    def _check_backend(self, world_size: int) -> None:
        if self.parallel.backend == "single" and world_size > 1:
            raise ValueError(
                "parallel.backend 'single' runs one process; use ddp, fsdp or deepspeed"
            )

    def accumulation(self, world_size: int) -> int:
        if self.data.max_tokens == "auto":
            raise ValueError("data.max_tokens = auto is chosen at launch (esmdist.plan)")
        return self.train.tokens_per_step // (self.data.max_tokens * world_size)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """`value` as type `kind` (from TOML or a command-line string); errors name `key`."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        spelled = str(value).lower()
        if spelled in ("true", "false") and spelled in typing.get_args(kind):
            value = spelled  # a switch with more states than a bool: TOML's true, CLI's True
        if value not in typing.get_args(kind):
            choices = ", ".join(map(str, typing.get_args(kind)))
            raise ValueError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        for option in options:  # the first that takes it (int | Literal["auto"]: 16384, auto)
            try:
                return _coerce(value, option, key)
            except ValueError:
                pass
        wanted = " or ".join(
            ", ".join(map(str, typing.get_args(o))) if typing.get_origin(o) is Literal
            else getattr(o, "__name__", str(o)) for o in options
        )  # fmt: skip
        raise ValueError(f"{key}: expected {wanted}, got {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(kind)
        if len(items) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float, str):
        if kind is not str and isinstance(value, bool):
            raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            coerced = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}") from None
        if kind is float and not math.isfinite(coerced):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return coerced
    raise TypeError(f"{key}: unsupported config type {kind}")


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        named = []
        for key in unknown:
            near = difflib.get_close_matches(str(key), sorted(fields), n=1, cutoff=0.6)
            named.append(f"{prefix}{key}" + (f" (did you mean {prefix}{near[0]}?)" if near else ""))
        raise ValueError(f"unknown config key(s): {', '.join(named)}; the keys of "
                         f"[{prefix.rstrip('.') or 'the top level'}] are {', '.join(sorted(fields))}")  # fmt: skip
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a table")
            values[name] = build_section(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, kind, f"{prefix}{name}")
    try:
        return cls(**values)
    except ValueError as exc:
        section, message = prefix.rstrip("."), str(exc)
        if section and not message.startswith((f"{section}.", f"{section}:")):
            message = f"{section}: {message}"
        raise ValueError(message) from None


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--{key}: {part} is not a table")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """The JobConfig of a TOML file (or the defaults) with `--section.key=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r}: write --section.key=value")
        key, value = item[2:].split("=", 1)
        if "." not in key:
            raise ValueError(f"override {item!r}: keys are dotted, e.g. --train.max_steps=50")
        _set_dotted(tree, key, value)
    try:
        return build_section(JobConfig, tree, "")
    except ValueError as exc:
        if path is None:
            raise
        raise ValueError(f"{path}{' with its overrides' if overrides else ''}: {exc}") from None


def config_keys() -> list[str]:
    """`section.key = default` for every key of a run config (for --help)."""
    lines = []
    for section in dataclasses.fields(JobConfig):
        defaults = section.default_factory()
        for item in dataclasses.fields(defaults):
            value = getattr(defaults, item.name)
            lines.append(f"{section.name}.{item.name} = {value!r}")
    return lines

"""What a checkpoint holds besides model and optimizer: `train_state.json`, the run's counters
it restores (`Progress`), what a resume must not change, and what one that changes the run's
shape (world size, backend) records.

The file is validated as strictly as a run config: a damaged or forged one (a step of 1e30,
negative counters, wrong types, missing keys) is an error naming the file and the key, never a
TypeError later or a run that trains on from nonsense. The LR schedule is not part of it: it is
a function of the step and the run's config (`esmdist.optim`).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from esmdist.checkpoint import Checkpointer, CheckpointError, Committed
from esmdist.config import ModelSpec, build_section
from esmdist.data.order import OrderState
from esmdist.optim import OptimConfig, lr_lambda

if TYPE_CHECKING:
    from esmdist.config import JobConfig

BACKENDS = ("single", "ddp", "fsdp", "deepspeed")
MAX_STEP = 10**12
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Keys older esmdist versions wrote that are no longer read.
_RETIRED = {"schedule"}


def rng_state() -> dict[str, Any]:
    """The torch RNG states as JSON-able lists (the loop's randomness is all seeded by the data
    order; these restore anything else, e.g. dropout in a user's model variant)."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _integer(value: Any, key: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _byte_list(value: Any, key: str, length: int | None) -> list[int]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(f"{key}: expected a list of {length or 'some'} bytes")
    if not all(type(v) is int and 0 <= v < 256 for v in value):
        raise ValueError(f"{key}: expected byte values (0-255)")
    return value


def _order_state(value: Any, key: str) -> dict:
    """A merged data-loader state: {"order": OrderState dict, "rotations": [int]}."""
    if not isinstance(value, dict) or set(value) != {"order", "rotations"}:
        raise ValueError(f"{key}: expected a table with 'order' and 'rotations'")
    order = value["order"]
    if not isinstance(order, dict) or set(order) != {"seed", "slots", "consumed"}:
        raise ValueError(f"{key}.order: expected seed, slots and consumed")
    _integer(order["seed"], f"{key}.order.seed")
    slots = order["slots"]
    if not isinstance(slots, list) or not slots or len(slots) > 2**20:
        raise ValueError(f"{key}.order.slots: expected a non-empty list")
    for index, slot in enumerate(slots):
        if not isinstance(slot, list) or len(slot) != 2:
            raise ValueError(f"{key}.order.slots[{index}]: expected [epoch, read]")
        _integer(slot[0], f"{key}.order.slots[{index}] epoch", 0, 10**9)
        _integer(slot[1], f"{key}.order.slots[{index}] read")
    consumed = order["consumed"]
    if not isinstance(consumed, dict):
        raise ValueError(f"{key}.order.consumed: expected a table")
    for epoch, intervals in consumed.items():
        if not epoch.isdigit() or not isinstance(intervals, list):
            raise ValueError(f"{key}.order.consumed[{epoch!r}]: expected epoch: intervals")
        previous = 0
        for interval in intervals:
            if not isinstance(interval, list) or len(interval) != 2:
                raise ValueError(f"{key}.order.consumed[{epoch}]: expected [start, end) pairs")
            start = _integer(interval[0], f"{key}.order.consumed[{epoch}]")
            end = _integer(interval[1], f"{key}.order.consumed[{epoch}]")
            if start < previous or end <= start:
                raise ValueError(f"{key}.order.consumed[{epoch}]: expected sorted, disjoint "
                                 "[start, end) intervals")  # fmt: skip
            previous = end
    rotations = value["rotations"]
    if not isinstance(rotations, list) or not rotations:
        raise ValueError(f"{key}.rotations: expected a non-empty list")
    for rotation in rotations:
        _integer(rotation, f"{key}.rotations", 0, len(slots))
    OrderState.from_dict(order)
    return value


@dataclass
class Progress:
    """Counters of the run so far (restored on resume) and the current metrics window."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    started: float = field(default_factory=time.perf_counter)
    """When this attempt started (wall time is per attempt; the step counts over the run)."""
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0
    window_tokens: int = 0
    window_flops: float = 0.0
    startup_s: float | None = None
    """Process start to the end of this attempt's first step; logged once."""
    changes: list[dict] = field(default_factory=list)
    """Every resume of the run that changed its shape (`TrainState.changes`)."""

    @classmethod
    def resumed(cls, state: TrainState, change: str) -> Progress:
        """The counters a checkpoint holds, and `change` (if any) added to its history."""
        changes = [*state.changes, *([{"step": state.step, "change": change}] if change else [])]
        return cls(state.step, state.tokens_seen, state.skipped_steps, changes=changes)


def _changes(value: Any, step: int) -> list[dict]:
    if not isinstance(value, list) or len(value) > 10_000:
        raise ValueError("changes: expected a list of {step, change} tables")
    for item in value:
        if not (isinstance(item, dict) and set(item) == {"step", "change"}
                and isinstance(item["change"], str) and len(item["change"]) <= 500):  # fmt: skip
            raise ValueError("changes: expected a list of {step, change} tables")
        _integer(item["step"], "changes.step", 0, step)
    return value


@dataclass
class TrainState:
    step: int
    tokens_seen: int
    skipped_steps: int
    data: dict
    """The data loader's resume state (`esmdist.data.stream.merge_rank_states`)."""
    rng: dict
    world_size: int
    backend: str
    wandb_run_id: str | None = None
    dataset: str | None = None
    """The training split's fingerprint (`ShardSet.fingerprint`); None in older checkpoints."""
    changes: list[dict] = field(default_factory=list)
    """Every resume that changed the run's shape: {"step", "change"} (world size, backend),
    oldest first; [] in older checkpoints."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, url: str) -> TrainState:
        """Validated; ValueError names `url` and the key."""
        try:
            if not isinstance(data, dict):
                raise ValueError("expected a JSON table")
            required = {"step", "tokens_seen", "skipped_steps", "data", "rng", "world_size",
                        "backend"}  # fmt: skip
            missing = sorted(required - set(data))
            unknown = sorted(set(data) - required - {"wandb_run_id", "dataset", "changes"}
                             - _RETIRED)  # fmt: skip
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)}")
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(unknown)}")
            step = _integer(data["step"], "step", 0, MAX_STEP)
            rng = data["rng"]
            if not isinstance(rng, dict) or "cpu" not in rng or set(rng) - {"cpu", "cuda"}:
                raise ValueError("rng: expected a table with cpu (and cuda) states")
            _byte_list(rng["cpu"], "rng.cpu", len(torch.get_rng_state()))
            if "cuda" in rng:
                _byte_list(rng["cuda"], "rng.cuda", None)
            if data["backend"] not in BACKENDS:
                raise ValueError(
                    f"backend: {data['backend']!r} is not one of {', '.join(BACKENDS)}"
                )
            for key in ("wandb_run_id", "dataset"):
                value = data.get(key)
                if value is not None and not (isinstance(value, str) and _RUN_ID.match(value)):
                    raise ValueError(f"{key}: expected an id of letters, digits, '-' and '_'")
            return cls(
                step=step,
                tokens_seen=_integer(data["tokens_seen"], "tokens_seen"),
                skipped_steps=_integer(data["skipped_steps"], "skipped_steps", 0, step),
                data=_order_state(data["data"], "data"),
                rng=rng,
                world_size=_integer(data["world_size"], "world_size", 1, 2**20),
                backend=data["backend"],
                wandb_run_id=data.get("wandb_run_id"),
                dataset=data.get("dataset"),
                changes=_changes(data.get("changes", []), step),
            )
        except ValueError as exc:
            raise ValueError(f"{url}: {exc}") from None


def resume_differences(run: JobConfig, saved: Any, state: TrainState,
                       dataset: str | None) -> list[str]:  # fmt: skip
    """What differs between this run and the checkpoint it would resume, among what must not
    change across a resume: the model architecture, the data order's seed and dataset. (The
    world size, backend, ZeRO stage and dtype may change: `needs_conversion`.) Each item names
    the key and both values."""
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        return ["config.json: no [model] table"]
    try:
        theirs = build_section(ModelSpec, saved["model"], "model.").build().to_dict()
    except (ValueError, TypeError) as exc:
        return [f"config.json: {exc}"]
    differences = [f"model.{k}: checkpoint {theirs[k]!r}, this run {v!r}"
                   for k, v in run.model.build().to_dict().items() if theirs.get(k) != v]  # fmt: skip
    order_seed = state.data["order"]["seed"]
    if order_seed != run.data.seed:
        differences.append(f"data.seed: checkpoint {order_seed}, this run {run.data.seed}")
    if state.dataset is not None and dataset is not None and state.dataset != dataset:
        differences.append(f"data.path: the checkpoint was trained on another dataset "
                           f"(fingerprint {state.dataset[:12]}…, this one {dataset[:12]}…)")  # fmt: skip
    return differences


def engine_layout(backend: str, zero_stage: Any, dtype: Any) -> str:
    """How an engine lays out its checkpoint: DCP (single/DDP/FSDP2: fp32 masters, any world
    size) by backend; DeepSpeed's files by ZeRO stage and dtype too."""
    return f"deepspeed ZeRO-{zero_stage} {dtype}" if backend == "deepspeed" else backend


def saved_layout(state: TrainState, saved: dict) -> str:
    """The layout of a checkpoint, from its train_state.json and config.json."""
    parallel, train = saved.get("parallel", {}), saved.get("train", {})
    return engine_layout(state.backend, parallel.get("zero_stage"), train.get("dtype"))


def run_layout(run: JobConfig) -> str:
    return engine_layout(run.parallel.backend, run.parallel.zero_stage, run.train.dtype)


def needs_conversion(state: TrainState, saved: dict, run: JobConfig, world_size: int) -> bool:
    """Whether this run loads the checkpoint through its whole state (`esmdist.checkpoint.
    full_state`) instead of its engine's own reader: DCP reshards itself onto any DCP engine;
    DeepSpeed reads back only its own files of the same stage, dtype and world size."""
    if run.parallel.backend != "deepspeed":
        return state.backend == "deepspeed"
    return saved_layout(state, saved) != run_layout(run) or state.world_size != world_size


def shape_change(state: TrainState, saved: dict, run: JobConfig, world_size: int) -> str:
    """ "" when this attempt runs on the checkpoint's world size and engine layout; else the
    line that says what changed (the data order regroups the epoch's remaining samples among
    the new readers: none read twice, none skipped)."""
    changed = [f"{name} {before} → {after}" for name, before, after in (
        ("world size", state.world_size, world_size),
        ("backend", saved_layout(state, saved), run_layout(run))) if before != after]  # fmt: skip
    if not changed:
        return ""
    return (
        f"this resume changes the run's shape: {', '.join(changed)} (recorded in "
        "train_state.json and metrics.jsonl; the epoch's remaining samples are regrouped "
        "among the new readers)"
    )


def schedule_change(run: JobConfig, saved: Any, step: int) -> str:
    """ "" when the learning-rate schedule of `run` is the one the checkpoint's run (config
    `saved`) followed; else the line that says how it changes from `step` on — a longer
    max_steps re-stretches the decay, so the rate jumps: allowed, never silent."""
    try:
        theirs = build_section(OptimConfig, saved["optim"], "optim.")
        their_steps = int(saved["train"]["max_steps"])
    except (KeyError, TypeError, ValueError):
        return ""
    ours, our_steps = run.optim, run.train.max_steps
    keys = ("lr", "warmup_steps", "final_lr_fraction")
    if our_steps == their_steps and all(getattr(ours, k) == getattr(theirs, k) for k in keys):
        return ""
    before = theirs.lr * lr_lambda(theirs.warmup_steps, their_steps, theirs.final_lr_fraction)(step)
    after = ours.lr * lr_lambda(ours.warmup_steps, our_steps, ours.final_lr_fraction)(step)
    changed = [f"train.max_steps {their_steps} → {our_steps}"] if our_steps != their_steps else []
    changed += [f"optim.{k} {getattr(theirs, k)} → {getattr(ours, k)}" for k in keys
                if getattr(ours, k) != getattr(theirs, k)]  # fmt: skip
    return (
        f"the learning-rate schedule changes at this resume ({', '.join(changed)}): at step "
        f"{step} the rate is {after:.3g} where the checkpoint's run had {before:.3g}"
    )


def resumable(checkpointer: Checkpointer, where: str, run: JobConfig,
              dataset: str) -> tuple[Committed, TrainState]:  # fmt: skip
    """The checkpoint `where` and its validated train state, once it is clear that this run can
    continue it — before any model is built; else CheckpointError naming what differs."""
    checkpoint = checkpointer.open(where)
    try:
        state = TrainState.from_dict(checkpoint.json("train_state.json"),
                                     checkpoint.store.url_of(checkpoint.name, "train_state.json"))  # fmt: skip
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if state.step != checkpoint.step:
        raise CheckpointError(f"{checkpoint.url}: train_state.json is of step {state.step}, not "
                              f"of this directory's step {checkpoint.step}")  # fmt: skip
    differences = resume_differences(run, checkpoint.json("config.json"), state, dataset)
    if differences:
        raise CheckpointError(
            f"{checkpoint.url}: this run cannot resume it — "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings, or start a new run in another "
            "checkpoint.root"
        )
    return checkpoint, state

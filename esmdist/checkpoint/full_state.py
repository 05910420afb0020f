"""A checkpoint's model and optimizer as whole tensors by parameter name, whichever engine
wrote it: the bridge of a resume that changes the world size, the backend or the ZeRO stage.

- the model: every entry of the module's state dict (trainable parameters as the fp32 master
  weights, frozen ones and buffers as stored);
- the optimizer: AdamW's `exp_avg` and `exp_avg_sq` of every trainable parameter, and the step
  count (one for the whole run: every parameter steps together).

DeepSpeed's ZeRO files hold each rank's flat partitions; DeepSpeed's own consolidation
(`zero_to_fp32`) maps them back to parameters, and the same mapping, applied to the Adam
moments' partitions (laid out like the fp32 masters'), gives the moments. DCP checkpoints are
read whole on one process with the verified, code-free reader of `esmdist.checkpoint.dcp`.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field

import torch

from esmdist.checkpoint.dcp import load_dcp, read_dcp_entries
from esmdist.checkpoint.deepspeed_files import DEEPSPEED_TAG, verified_local_copy
from esmdist.checkpoint.manifest import CheckpointError
from esmdist.checkpoint.safe_load import torch_pickles_without_code
from esmdist.collectives import broadcast_object, rank_world
from esmdist.storage import Digests

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    model: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]
    """Parameter name → {"exp_avg": …, "exp_avg_sq": …}, trainable parameters only."""
    step: float
    """AdamW's step count (its bias correction)."""
    seconds: dict[str, float] = field(default_factory=dict)

    def bytes(self) -> int:
        tensors = [*self.model.values(), *(t for m in self.moments.values() for t in m.values())]
        return sum(t.numel() * t.element_size() for t in tensors)


def load_full(engine, store, *parts: str, expected: Digests) -> None:
    """Load the checkpoint files under `store/parts` into `engine` (every rank calls this):
    rank 0 reads the whole state and checks it against the engine's model, every rank learns
    a failure, then the engine takes its part of each tensor. Rank 0 prints what it did."""
    rank, _ = rank_world()
    url = store.url_of(*parts)
    state, problem = None, None
    if rank == 0:
        print(f"converting {url} for this run's engine: reading its whole state", flush=True)
        try:
            state = read_full_state(store, *parts, expected=expected)
            problem = _mismatch(state, engine, url)
        except CheckpointError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(problem)
    started = time.perf_counter()
    step = broadcast_object(None if state is None else state.step)
    engine.load_full_state(state and state.model, state and state.moments, step)
    if state is not None:
        print(
            f"converted {state.bytes() / 2**30:.2f} GiB: read in {state.seconds['read']:.1f} s, "
            f"every rank's part taken in {time.perf_counter() - started:.1f} s",
            flush=True,
        )


def _mismatch(state: FullState, engine, url: str) -> str | None:
    """What keeps `state` from loading into `engine`'s model (names and whole shapes), if any."""
    shapes = engine.full_shapes()
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    problems = []
    if set(state.model) != set(shapes):
        extra, missing = (
            sorted(set(state.model) - set(shapes)),
            sorted(set(shapes) - set(state.model)),
        )
        problems.append(f"entries not in this model: {extra[:3]}, missing: {missing[:3]}")
    problems += [f"{k}: {tuple(v.shape)} stored, {shapes[k]} in this model"
                 for k, v in state.model.items() if k in shapes and tuple(v.shape) != shapes[k]]  # fmt: skip
    if set(state.moments) != trainable:
        problems.append(f"Adam moments for {len(state.moments)} parameters, this model trains "
                        f"{len(trainable)}")  # fmt: skip
    problems += [f"{k}.{kind}: {tuple(v.shape)} stored, {shapes.get(k)} in this model"
                 for k, moments in state.moments.items() for kind, v in moments.items()
                 if tuple(v.shape) != shapes.get(k)]  # fmt: skip
    if not problems:
        return None
    return f"{url}: the checkpoint's state does not fit this model: " + "; ".join(problems[:5])


def read_full_state(store, *parts: str, expected: Digests) -> FullState:
    """The whole state of the checkpoint files under `store/parts` (a CheckpointStore), on this
    process: DCP when COMMITTED lists a `.metadata`, else DeepSpeed ZeRO files."""
    started = time.perf_counter()
    if ".metadata" in expected:
        state = _from_dcp(store, *parts, expected=expected)
    else:
        state = _from_zero_files(store, *parts, expected=expected)
    state.seconds["read"] = time.perf_counter() - started
    return state


def _from_dcp(store, *parts: str, expected: Digests) -> FullState:
    entries = read_dcp_entries(store, *parts, expected=expected)
    wanted = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in entries.items()
              if key.startswith(("model.", "optim.state."))}  # fmt: skip
    load_dcp(wanted, store, *parts, expected=expected, ignored=("optim.param_groups",),
             no_dist=True)  # fmt: skip
    model = {k[len("model.") :]: v for k, v in wanted.items() if k.startswith("model.")}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    steps = set()
    for key, value in wanted.items():
        if not key.startswith("optim.state."):
            continue
        name, _, kind = key[len("optim.state.") :].rpartition(".")
        if kind == "step":
            steps.add(float(value))
        elif kind in MOMENTS:
            moments.setdefault(name, {})[kind] = value
        else:
            raise CheckpointError(f"{store.url_of(*parts)}: unexpected optimizer entry {key}")
    return FullState(model, moments, _one_step(steps, store.url_of(*parts)))


def _one_step(steps: set[float], url: str) -> float:
    if len(steps) > 1:
        raise CheckpointError(f"{url}: the parameters' AdamW step counts differ ({sorted(steps)})")
    return steps.pop() if steps else 0.0


def _from_zero_files(store, *parts: str, expected: Digests) -> FullState:
    url = store.url_of(*parts)
    with (
        verified_local_copy(store, *parts, expected=expected, collective=False) as directory,
        torch_pickles_without_code(url),
    ):
        try:
            return _zero_state(f"{directory}/{DEEPSPEED_TAG}", url)
        except CheckpointError:
            raise
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError,
                FileNotFoundError) as exc:  # fmt: skip
            # Files that hash as committed but do not hold what DeepSpeed writes.
            raise CheckpointError(f"{url}: not a readable DeepSpeed ZeRO checkpoint "
                                  f"({type(exc).__name__}: {exc})") from None  # fmt: skip


def _zero_state(folder: str, url: str) -> FullState:
    from deepspeed.utils import zero_to_fp32 as zero

    model_files = zero.get_model_state_files(folder)
    model_states = zero.parse_model_states(model_files)
    module = torch.load(model_files[0], map_location="cpu", weights_only=True)["module"]
    ranks = [torch.load(f, map_location="cpu", mmap=True, weights_only=True)
             ["optimizer_state_dict"] for f in zero.get_optim_files(folder)]  # fmt: skip
    stage, world = int(ranks[0]["zero_stage"]), ranks[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(ranks):
        raise CheckpointError(f"{url}: {len(ranks)} optimizer files for {world} ranks")
    masters = [r["fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"]
               for r in ranks]  # fmt: skip
    # Adam's state per flat group, keyed by the group's index; ZeRO-1/2 keep it padded to the
    # partition, their fp32 masters are saved without that padding.
    inner = [r["optimizer_state_dict" if stage == 3 else "base_optimizer_state"]["state"]
             for r in ranks]  # fmt: skip
    merge = _zero_merge(zero, stage, world, model_states, ranks[0].get("param_alignment_paddings"))
    model = merge(masters, trainable_only=False)
    # ZeRO-1/2 keep frozen parameters only in the module's own state dict (as computed).
    model.update({k: v.float() if v.is_floating_point() else v.clone()
                  for k, v in module.items() if k not in model})  # fmt: skip
    moments_by_kind = {}
    for kind in MOMENTS:
        flats = [[state[g][kind][: len(flat)] for g, flat in enumerate(groups)]
                 for state, groups in zip(inner, masters, strict=True)]  # fmt: skip
        moments_by_kind[kind] = merge(flats, trainable_only=True)
    steps = {float(state[g]["step"]) for state in inner for g in state}
    moments = {name: {kind: moments_by_kind[kind][name] for kind in MOMENTS}
               for name in moments_by_kind["exp_avg"]}  # fmt: skip
    return FullState(model, moments, _one_step(steps, url))


def _zero_merge(zero, stage: int, world: int, model_states, paddings):
    """DeepSpeed's own mapping of flat per-rank partitions to whole parameters."""

    def merge(flat_groups, trainable_only: bool) -> dict[str, torch.Tensor]:
        # Its counts go to stdout (not wanted in a training log); its progress bar to stderr.
        with contextlib.redirect_stdout(io.StringIO()):
            return _merged(flat_groups, trainable_only)

    def _merged(flat_groups, trainable_only: bool) -> dict[str, torch.Tensor]:
        merged: dict = {}
        if trainable_only:
            if stage == 3:
                zero._zero3_merge_trainable_params(merged, world, flat_groups, model_states)
            else:
                zero._zero2_merge_trainable_params(merged, world, flat_groups, model_states,
                                                   paddings)  # fmt: skip
        elif stage == 3:
            merged = zero._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups,
                                                                      model_states, False)  # fmt: skip
        else:
            merged = zero._get_fp32_state_dict_from_zero2_checkpoint(
                world, flat_groups, model_states, False, paddings)  # fmt: skip
        # Fresh tensors already (concatenated from the files), never views of the mmap.
        return zero.to_torch_tensor(merged)

    return merge

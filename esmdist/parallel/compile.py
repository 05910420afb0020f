"""Compiled transformer blocks (train.compile): each block's forward through `torch.compile`,
with the dimensions a packed micro-batch changes every step marked dynamic, so that one graph
serves every batch; a warm-up that compiles before the first step — and falls back to eager,
with one warning, where compilation fails; and the count of graphs compiled since, which the
metrics log (a growing count is a recompilation per step, the thing to look for).

Only the blocks are compiled (where the non-matmul work is: LayerNorm, residual adds, rotary,
bias + GELU, casts, which compile fuses around the matmuls and the attention kernel); the
embedding, the LM head at the masked positions and the loss stay eager. The 33–48 blocks of a
model share one code object and, their parameters being graph inputs, one compiled graph.

Compiled code and autotuning results are cached on disk (TORCHINDUCTOR_CACHE_DIR, which the
launcher points into the run's output directory, `train.compile_cache`): a requeued Slurm job
that finds them there starts without compiling again.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esmdist import alphabet
from esmdist.model import ESM
from esmdist.model.attention import PackedSpans
from esmdist.parallel.engine import Engine

# Two packed micro-batches of a few sequences each, with different totals, counts and
# longest lengths: the second compiles the graph in which the longest length (an int the
# varlen kernel takes) is symbolic too, so no real step pays a recompilation.
WARM_UP_LENGTHS = ((37, 21), (50, 13, 29))
BACKEND = "inductor"
"""torch.compile's backend (a test swaps in one that fails)."""


class CompiledForward:
    """A block's forward compiled; the eager one kept to fall back to."""

    def __init__(self, eager):
        self.eager = eager
        self.compiled = torch.compile(eager, backend=BACKEND)

    def __call__(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)


def _mark_dynamic(module: nn.Module, args: tuple) -> None:
    """Before a compiled block runs (eagerly, as a forward pre-hook): the token dimension of
    its input, of the rotary tables and of the spans — and, padded, the batch dimension and
    the key-padding mask's — are dynamic, not specialised to the first batch's sizes."""
    x, attend, rotary = args[:3]
    dims = (1,) if isinstance(attend, PackedSpans) else (0, 1)
    for tensor in (x, *(rotary or ())):
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
    if isinstance(attend, PackedSpans):
        torch._dynamo.maybe_mark_dynamic(attend.cu_seqlens, 0)
    elif attend is not None:
        torch._dynamo.maybe_mark_dynamic(attend, 0)
        torch._dynamo.maybe_mark_dynamic(attend, 3)


def compile_blocks(model: ESM) -> None:
    """Compile every block's forward in place (parameter names, hence checkpoints, unchanged;
    after activation recomputation's wrapper, which compile traces through)."""
    for layer in model.layers:
        layer.forward = CompiledForward(layer.forward)
        layer.register_forward_pre_hook(_mark_dynamic)


def uncompile_blocks(model: ESM) -> None:
    for layer in model.layers:
        if isinstance(layer.forward, CompiledForward):
            layer.forward = layer.forward.eager


def is_compiled(model: ESM) -> bool:
    return any(isinstance(layer.forward, CompiledForward) for layer in model.layers)


def use_cache_directory(path: str) -> str:
    """Cache compiled code in `path`, unless the environment names a directory of its own
    (TORCHINDUCTOR_CACHE_DIR; importing torch._dynamo sets it to torch's per-user default in
    /tmp, which does not count: that one is not where a requeued job on another node looks).
    Returns the directory in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def graphs_compiled() -> int:
    """Graphs compiled in this process so far (torch.compile's own count)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up found."""

    seconds: float
    graphs: int
    """Graphs compiled by it (this process's count after it: later growth is recompilation)."""
    failure: str = ""
    """Why compilation failed ("" if it did not): the blocks then run eagerly."""


def _warm_up_batch(lengths: tuple[int, ...], device: torch.device) -> tuple[Tensor, ...]:
    """Packed tokens (<cls> residues <eos>, a few <mask>), cu_seqlens and masked positions."""
    generator = torch.Generator().manual_seed(sum(lengths))
    residues = torch.from_numpy(alphabet.STANDARD_RESIDUE_IDS)
    rows = []
    for length in lengths:
        row = residues[torch.randint(len(residues), (length,), generator=generator)]
        row[0], row[-1], row[1:-1:7] = alphabet.CLS, alphabet.EOS, alphabet.MASK
        rows.append(row)
    tokens = torch.cat(rows)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    masked = torch.arange(1, len(tokens), 7)
    return tokens.to(device), cu_seqlens.to(device), masked.to(device)


def _first_cause(exc: BaseException) -> str:
    """The error at the bottom of the chain (a compiler's wrapper says only that it failed),
    in one line."""
    while (inner := exc.__cause__ or getattr(exc, "inner_exception", None)) is not None:
        exc = inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def warm_up(engine: Engine, device: torch.device, inference: bool) -> WarmUp:
    """Run the warm-up micro-batches forward and backward through the engine's model as a
    step's last micro-batch (gradients reduced across ranks: every rank runs the same
    collectives), then drop the gradients; with `inference`, once more without gradients (the
    graph validation runs). Compilation happens here, not in the first step; if it fails, the
    blocks go back to eager and the run goes on, slower, with one warning."""
    started = time.perf_counter()
    try:
        for lengths in WARM_UP_LENGTHS:
            tokens, cu_seqlens, masked = _warm_up_batch(lengths, device)
            with engine.autocast():
                out = engine.model(tokens, cu_seqlens, output_mask=masked, lengths=list(lengths))
            engine.backward(out.logits.float().logsumexp(-1).sum(), last=True)
        if inference:
            with torch.no_grad(), engine.autocast():
                engine.model(tokens, cu_seqlens, output_mask=masked, lengths=list(lengths))
    except Exception as exc:  # any failure of the compiler stack: dynamo, AOT, inductor, triton
        uncompile_blocks(engine.compute_module)
        engine.zero_grad()
        failure = _first_cause(exc)
        warnings.warn(f"train.compile: compiling the blocks failed ({failure}); training "
                      "eagerly instead (train.compile=false skips the attempt)", stacklevel=2)  # fmt: skip
        return WarmUp(time.perf_counter() - started, graphs_compiled(), failure)
    engine.zero_grad()
    return WarmUp(time.perf_counter() - started, graphs_compiled())

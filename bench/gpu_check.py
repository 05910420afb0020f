"""GPU correctness and throughput of the model paths, in one run (called by bench/gpu_check.sh).

    python bench/gpu_check.py correctness      # exits 1 if a check fails
    python bench/gpu_check.py throughput [--sizes esm2_150M esm2_650M] [--tokens 16384]

correctness — on real sequences (data/demo_4k.fasta), ESM-2 and ESM-1b with random weights
(and `fast_paths`: bf16 compute weights vs autocast, compiled vs eager, no recompilation):
- fp32 on the GPU against fp32 on the CPU (padded), and the packed layout against the padded
  one on the GPU (fp32: SDPA per sequence of the pack);
- bf16: the packed varlen flash path and the padded SDPA path, each against the fp32 result
  (the varlen error must be of the padded path's size), and their gradients against each other;
- that the varlen kernel really ran (calls counted);
- that the trainer's step makes the host wait for the GPU nowhere (torch's sync debug mode).

throughput — one training step (forward, backward, AdamW through esmdist's engine, bf16
autocast) on the same real sequences (cropped to 1,022 residues, UniRef-like lengths), as
(a) padded [B, L_max] with a key-padding mask: what fair-esm / HF Trainer scripts do (baseline),
(b) packed with SDPA per sequence (the CPU path), (c) packed with varlen flash attention.
Tokens/s count real tokens (no padding); TFLOP/s and MFU come from esmdist.metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from esmdist import alphabet  # noqa: E402
from esmdist.data.batch import MaskingConfig, crop, pack, with_specials  # noqa: E402
from esmdist.model import attention  # noqa: E402
from esmdist.model.config import MODEL_SIZES  # noqa: E402


def real_sequences(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` sequences of the bundled UniProt set, <cls> + ≤1,022 residues + <eos>."""
    records = (REPO / "data/demo_4k.fasta").read_text().split(">")[1:]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), size=min(count, len(records)), replace=False)
    out = []
    for index in chosen:
        residues = alphabet.encode("".join(records[index].splitlines()[1:]))
        out.append(with_specials(crop(residues, 1024, rng.random())))
    return out


def batch_of(sequences: list[np.ndarray], seed: int = 0):
    total = sum(map(len, sequences))
    return pack(sequences, MaskingConfig(), np.random.default_rng(seed).random((3, total)))


def batch_up_to(tokens: int, seed: int):
    """One packed batch of the bundled sequences (drawn by `seed`) up to `tokens` tokens."""
    sequences, total = [], 0
    for sequence in real_sequences(4000, seed=seed):
        if total + len(sequence) > tokens:
            break
        sequences.append(sequence)
        total += len(sequence)
    return batch_of(sequences)


class VarlenCalls:
    """Counts calls of the varlen kernel, to prove the packed bf16 path used it."""

    def __init__(self):
        self.count = 0
        self.inner = attention.varlen_attn

    def __call__(self, *args):
        self.count += 1
        return self.inner(*args)


def correctness() -> bool:
    from esmdist.model import ESM, ModelConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device("cuda")
    calls = VarlenCalls()
    attention.varlen_attn = calls
    results, ok = {}, True
    batch = batch_of(real_sequences(48))
    padded, padded_selected = batch.to_padded()
    for arch in ("esm2", "esm1b"):
        config = ModelConfig(arch=arch, num_layers=6, embed_dim=320, attention_heads=20)
        torch.manual_seed(0)
        model = ESM(config)
        model.init_weights()
        model.eval()
        with torch.no_grad():
            cpu = model(padded).logits
            model.to(cuda)
            gpu_padded = model(padded.to(cuda)).logits
            gpu_packed = model(batch.tokens.to(cuda), batch.cu_seqlens.to(cuda)).logits
            not_pad = padded.ne(alphabet.PAD)
            reference = gpu_padded[not_pad.to(cuda)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                before = calls.count
                bf16_packed = model(batch.tokens.to(cuda), batch.cu_seqlens.to(cuda)).logits
                varlen_used = calls.count > before
                bf16_padded = model(padded.to(cuda)).logits[not_pad.to(cuda)]
        row = {
            "fp32 gpu vs cpu (padded)": (gpu_padded.cpu() - cpu).abs().max().item(),
            "fp32 packed vs padded (gpu)": (gpu_packed - reference).abs().max().item(),
            "bf16 padded SDPA vs fp32": (bf16_padded.float() - reference).abs().max().item(),
            "bf16 packed varlen vs fp32": (bf16_packed.float() - reference).abs().max().item(),
            "varlen kernel used": varlen_used,
        }
        # Gradients of the masked-LM loss, bf16 varlen against bf16 padded.
        grads = {}
        for layout in ("packed", "padded"):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if layout == "packed":
                    logits = model(batch.tokens.to(cuda), batch.cu_seqlens.to(cuda),
                                   output_mask=batch.selected.to(cuda)).logits  # fmt: skip
                else:
                    logits = model(padded.to(cuda), output_mask=padded_selected.to(cuda)).logits
            F.cross_entropy(logits.float(), batch.targets.to(cuda)).backward()
            grads[layout] = torch.cat(
                [p.grad.flatten() for p in model.parameters() if p.grad is not None]
            )
        row["grad relative difference (bf16 packed vs padded)"] = (
            (grads["packed"] - grads["padded"]).norm() / grads["padded"].norm()
        ).item()
        passed = (
            row["fp32 gpu vs cpu (padded)"] < 1e-3
            and row["fp32 packed vs padded (gpu)"] < 1e-4
            and row["bf16 packed varlen vs fp32"] <= max(2 * row["bf16 padded SDPA vs fp32"], 0.05)
            and row["grad relative difference (bf16 packed vs padded)"] < 0.05
            and varlen_used
        )
        row["passed"] = passed
        ok &= passed
        results[arch] = row
    attention.varlen_attn = calls.inner
    print(json.dumps(results, indent=1))
    return ok


def step_without_syncs() -> bool:
    """The trainer's step (esmdist.train.train_step, esm2_8M, bf16, a pinned real batch) asks
    the host to wait for the GPU nowhere: three steps under torch's sync debug mode "error",
    after two warm-up steps (the optimizer's state is made in the first). The mode is shown to
    catch a read first."""
    from types import SimpleNamespace

    from esmdist.config import load_config
    from esmdist.parallel.distributed import DistInfo
    from esmdist.train import Progress, engine_for, train_step

    cuda = torch.device("cuda")
    info = DistInfo(0, 1, 0, cuda)
    config = load_config(None, ["--model.size=esm2_8M", "--parallel.backend=single",
                                "--train.dtype=bf16", "--data.max_tokens=8192",
                                "--train.tokens_per_step=8192"])  # fmt: skip
    run = SimpleNamespace(engine=engine_for(config, info), info=info, progress=Progress(),
                          model_config=config.model.build())  # fmt: skip
    stop = SimpleNamespace(requested=None)
    batch = batch_up_to(8192, seed=2).pin_memory()
    warm = [train_step(run, step, [batch], stop).read() for step in (1, 2)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        try:
            torch.ones(1, device=cuda).item()
            caught = False
        except RuntimeError:
            caught = True
        results = [train_step(run, step, [batch], stop) for step in (3, 4, 5)]
        error = None
    except RuntimeError as exc:
        error = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = [r.read() for r in results] if error is None else []
    ok = caught and error is None and all(applied for _, _, applied in warm + values)
    print(json.dumps({"step without syncs": ok, "debug mode catches .item()": caught,
                      "error": error, "losses": [v[0] for v in warm + values]}))  # fmt: skip
    return ok


def _engine(*overrides: str, tokens: int = 8192):
    from esmdist.config import load_config
    from esmdist.parallel.distributed import DistInfo
    from esmdist.train import engine_for

    config = load_config(None, ["--model.size=esm2_8M", "--parallel.backend=single",
                                "--train.dtype=bf16", f"--data.max_tokens={tokens}",
                                f"--train.tokens_per_step={2 * tokens}", *overrides])  # fmt: skip
    return engine_for(config, DistInfo(0, 1, 0, torch.device("cuda")))


def _train(engine, batches: list) -> tuple[list[float], torch.Tensor]:
    """Steps of two micro-batches: the losses, then the parameters flattened."""
    from esmdist.train import masked_lm_loss

    losses = []
    for start in range(0, len(batches), 2):
        for index, batch in enumerate(batches[start : start + 2]):
            loss = masked_lm_loss(engine, batch, torch.device("cuda"))
            losses.append(loss.item())
            engine.backward(loss / batch.targets.numel(), last=index == 1)
        engine.step()
    return losses, torch.cat([v.flatten().float() for v in engine.full_state_dict().values()])


def fast_paths() -> bool:
    """The GPU-speed paths against the plain ones, on real batches of four different lengths
    (esm2_8M, bf16, two steps of two micro-batches): bf16 compute weights against autocast
    (the same arithmetic: equal up to the GPU's own run-to-run differences); compiled blocks
    (varlen attention inside the graph) against eager, and no graph compiled after the
    warm-up, whatever the batch's length."""
    from esmdist.parallel.compile import graphs_compiled, warm_up

    batches = [batch_up_to(tokens, seed=3).pin_memory() for tokens in (8192, 6000, 7100, 4096)]
    row = {}
    torch.manual_seed(0)
    autocast = _train(_engine("--train.compile=false", "--parallel.low_precision_weights=false"),
                      batches)  # fmt: skip
    copy = _train(_engine("--train.compile=false"), batches)
    row["bf16 weights vs autocast: max |Δ loss|"] = max(
        abs(a - b) for a, b in zip(copy[0], autocast[0], strict=True)
    )
    row["bf16 weights vs autocast: parameters, relative"] = (
        (copy[1] - autocast[1]).norm() / autocast[1].norm()
    ).item()
    compiled_engine = _engine("--train.compile=true")
    found = warm_up(compiled_engine, torch.device("cuda"), inference=True)
    compiled = _train(compiled_engine, batches)
    row["compile warm-up"] = {"seconds": found.seconds, "graphs": found.graphs,
                              "failure": found.failure}  # fmt: skip
    row["graphs compiled after the warm-up"] = graphs_compiled() - found.graphs
    row["compiled vs eager: max |Δ loss| / loss"] = max(
        abs(a - b) / b for a, b in zip(compiled[0], copy[0], strict=True)
    )
    row["compiled vs eager: parameters, relative"] = (
        (compiled[1] - copy[1]).norm() / copy[1].norm()
    ).item()
    ok = (row["bf16 weights vs autocast: max |Δ loss|"] <= 1e-3 * abs(autocast[0][0])
          and row["bf16 weights vs autocast: parameters, relative"] < 1e-4
          and not found.failure and row["graphs compiled after the warm-up"] == 0
          and row["compiled vs eager: max |Δ loss| / loss"] < 0.01
          and row["compiled vs eager: parameters, relative"] < 0.01)  # fmt: skip
    row["passed"] = ok
    print(json.dumps({"fast paths": row}, indent=1))
    return ok


def time_steps(engine, tokens, cu_seqlens, selected, targets, steps: int) -> float:
    """Seconds per training step (3 warm-up steps first)."""

    def step() -> None:
        with engine.autocast():
            logits = engine.model(tokens, cu_seqlens, output_mask=selected).logits
        engine.backward(F.cross_entropy(logits.float(), targets), last=True)
        engine.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def throughput(sizes: list[str], tokens: int, steps: int) -> list[dict]:
    from esmdist.config import load_config
    from esmdist.metrics import batch_flops, peak_tflops
    from esmdist.parallel.distributed import DistInfo
    from esmdist.train import engine_for

    cuda = torch.device("cuda")
    batch = batch_up_to(tokens, seed=1)
    padded, padded_selected = batch.to_padded()
    rows = []
    for size in sizes:
        config = load_config(None, [f"--model.size={size}", "--parallel.backend=single",
                                    "--train.dtype=bf16", f"--data.max_tokens={tokens}",
                                    f"--train.tokens_per_step={tokens}",
                                    "--train.compile=false"])  # fmt: skip
        model_config = MODEL_SIZES[size]
        engine = engine_for(config, DistInfo(0, 1, 0, cuda))
        flops = batch_flops(model_config, batch.cu_seqlens.diff(), int(batch.selected.sum()))
        peak = peak_tflops(0.0, "bf16", cuda)
        on_gpu = batch.to(cuda)
        inputs = {
            "padded (SDPA, key-padding mask)": (padded.to(cuda), None, padded_selected.to(cuda)),
            "packed (SDPA per sequence)": (on_gpu.tokens, on_gpu.cu_seqlens, "mask"),
            "packed (varlen flash)": (on_gpu.tokens, on_gpu.cu_seqlens, on_gpu.selected),
        }
        baseline = None
        for mode, (tok, cu, selected) in inputs.items():
            usable = attention.PackedSpans.__dict__["usable"]
            if isinstance(selected, str):  # force the per-sequence path the CPU takes
                attention.PackedSpans.usable = staticmethod(lambda device: False)
                selected = on_gpu.selected
            try:
                seconds = time_steps(engine, tok, cu, selected, on_gpu.targets, steps)
            finally:
                attention.PackedSpans.usable = usable
            row = {
                "size": size,
                "mode": mode,
                "tokens": batch.num_tokens,
                "padded_tokens": padded.numel(),
                "step_ms": 1000 * seconds,
                "tokens_per_s": batch.num_tokens / seconds,
                "tflops": flops / seconds / 1e12,
                "mfu": flops / seconds / 1e12 / peak,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
            baseline = baseline or row["tokens_per_s"]
            row["x_padded"] = row["tokens_per_s"] / baseline
            rows.append(row)
            print(json.dumps(row), flush=True)
        del engine
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["correctness", "throughput"])
    parser.add_argument("--sizes", nargs="+", default=["esm2_150M", "esm2_650M"])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"varlen kernel available: {attention.varlen_attn is not None}")  # fmt: skip
    if args.what == "correctness":
        passed = correctness()
        passed &= fast_paths()
        sys.exit(0 if step_without_syncs() and passed else 1)
    rows = throughput(args.sizes, args.tokens, args.steps)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print("| model | layout | tokens (padded) | step ms | tokens/s | TFLOP/s | MFU | "
          "peak GiB | × padded |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['tokens']} ({r['padded_tokens']}) | "
              f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
              f"{r['mfu']:.1%} | {r['peak_memory_gib']:.1f} | {r['x_padded']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()

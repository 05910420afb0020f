"""A resume that converts a DeepSpeed ZeRO checkpoint (issue 28) against the plain load of the
same checkpoint by the engine that wrote it — in one run, on CPU (gloo ranks).

    python bench/convert_bench.py [--size esm2_650M] [--stage 3] [--world 2] [--rounds 1]

Phase 1: `--world` ranks build a ZeRO-`--stage` engine, take one step (so Adam's state exists)
and save a checkpoint through the checkpointer (local directory). Then, each in fresh
processes so that no two models share the memory, alternating for `--rounds`:
- plain: the same engine layout loads it with DeepSpeed's own reader (what a resume on the same
  world size does);
- converted: the same layout loads it through the whole state (`esmdist.checkpoint.full_state`:
  rank 0 reads and merges the ZeRO files, every rank takes its part) — what a resume on another
  world size, stage or backend does.
Each time is the load alone (engine construction excluded). Target: converted ≤ 2× plain.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def _config(size: str, stage: int, world: int):
    from esmdist.config import load_config

    return load_config(None, [f"--model.size={size}", "--parallel.backend=deepspeed",
                              f"--parallel.zero_stage={stage}", "--data.max_tokens=256",
                              "--data.crop_length=256", f"--train.tokens_per_step={256 * world}",
                              "--parallel.bucket_elements=50000000"])  # fmt: skip


def _rank(rank: int, world: int, port: int, job: str, args, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import numpy as np

    from esmdist import alphabet
    from esmdist.checkpoint import CheckpointConfig, Checkpointer
    from esmdist.data.batch import MaskingConfig, pack, with_specials
    from esmdist.parallel import init_distributed
    from esmdist.train import engine_for, masked_lm_loss

    config = _config(args.size, args.stage, world)
    info = init_distributed("deepspeed")
    engine = engine_for(config, info)
    checkpointer = Checkpointer(CheckpointConfig(root=root), root)
    if job == "save":
        tokens = with_specials(alphabet.encode_residues("MKTAYIAKQRQISFVKSHFSRQ" * 10))
        batch = pack(
            [tokens], MaskingConfig(), np.random.default_rng(rank).random((3, len(tokens)))
        )
        engine.backward(masked_lm_loss(engine, batch, info.device), last=True)
        engine.step()
        checkpointer.begin(None)
        checkpointer.save(1, engine, {"step": 1}, config.to_dict())
        checkpointer.close()
        return
    checkpoint = checkpointer.open("step_000000001")
    started = time.perf_counter()
    checkpointer.load(checkpoint, engine, convert=job == "converted")
    if info.is_main:
        Path(out).write_text(f"{time.perf_counter() - started:.3f}")


def _spawn(job: str, args, root: str, out: str) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_rank, args=(args.world, port, job, args, root, out), nprocs=args.world,
                       start_method="spawn")  # fmt: skip
    return float(Path(out).read_text()) if job != "save" else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="esm2_650M")
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path.home() / ".cache/esmdist/torch_extensions"))  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        root, out = str(scratch / "root"), str(scratch / "seconds")
        started = time.perf_counter()
        _spawn("save", args, root, out)
        size = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
        print(f"saved {size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s "
              f"({args.size}, ZeRO-{args.stage}, {args.world} ranks)", flush=True)  # fmt: skip
        times: dict[str, list[float]] = {"plain": [], "converted": []}
        for _ in range(args.rounds):
            for job in times:
                times[job].append(_spawn(job, args, root, out))
                print(f"{job}: {times[job][-1]:.1f} s", flush=True)
        plain, converted = (min(times[j]) for j in ("plain", "converted"))
        print(f"| {platform.node()} | {args.size} ZeRO-{args.stage}, {args.world} ranks | "
              f"{size / 2**30:.2f} GiB | {plain:.1f} | {converted:.1f} | "
              f"**{converted / plain:.2f}×** |")  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Checkpoint save/load to a local S3 server against the server's raw put/get, and the training
step stall while a background upload runs — all in one run.

    python bench/ckpt_bench.py [--size esm2_150M] [--steps 6]

Starts SeaweedFS on 127.0.0.1 (as the tests do), builds the model with AdamW state (fp32:
parameters + two moments ≈ 12 bytes per parameter; esm2_150M ≈ 1.8 GB), then times:
raw `put_file`/`get_file` of a file of the same size (s3fs multipart), a synchronous
checkpoint save (DCP through node-local staging and upload, plus commit checksums), a load
(checksum verification + DCP read), and training steps with and without an upload in flight.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="esm2_150M")
    parser.add_argument("--steps", type=int, default=6, help="steps timed with / without upload")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from esmdist import alphabet
    from esmdist.checkpoint import CheckpointConfig, Checkpointer
    from esmdist.config import load_config
    from esmdist.data.batch import MaskingConfig, pack
    from esmdist.parallel import build_engine
    from esmdist.parallel.distributed import DistInfo
    from tests.s3server import SeaweedS3

    scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    server = SeaweedS3(scratch / "s3")
    server.start()
    os.environ.update(server.env())
    try:
        fs = server.filesystem()
        fs.mkdir("bench")
        config = load_config(None, [f"--model.size={args.size}", "--parallel.backend=single",
                                    "--data.max_tokens=2048", "--train.tokens_per_step=2048",
                                    "--train.max_steps=1000", "--optim.warmup_steps=10"])  # fmt: skip
        info = DistInfo(0, 1, 0, torch.device("cpu"))
        engine = build_engine(config, config.model.build(), info)
        records = [
            line.strip() for line in (REPO / "data/demo_4k.fasta").read_text().split(">")[1:40]
        ]
        sequences = [alphabet.encode("".join(r.splitlines()[1:]))[:400] for r in records][:8]
        batch = pack(
            sequences,
            MaskingConfig(),
            np.random.default_rng(0).random((3, sum(map(len, sequences)))),
        )

        def step() -> float:
            start = time.perf_counter()
            logits = engine.model(batch.tokens, batch.cu_seqlens, output_mask=batch.selected).logits
            engine.backward(F.cross_entropy(logits, batch.targets), last=True)
            engine.step()
            return time.perf_counter() - start

        step()  # creates the Adam moments
        state_bytes = sum(t.numel() * t.element_size() for t in engine._state()["model"].values())
        state_bytes *= 3  # parameters + exp_avg + exp_avg_sq

        blob = scratch / "raw.bin"
        with open(blob, "wb") as out:
            for _ in range(state_bytes // (64 << 20) + 1):
                out.write(os.urandom(64 << 20))
        start = time.perf_counter()
        fs.put_file(str(blob), "bench/raw.bin")
        raw_put = time.perf_counter() - start
        start = time.perf_counter()
        fs.get_file("bench/raw.bin", str(scratch / "raw.back"))
        raw_get = time.perf_counter() - start
        raw_bytes = blob.stat().st_size

        checkpointer = Checkpointer(CheckpointConfig(), "s3://bench/run")
        train_state = {"step": 1, "schedule": engine.schedule.state_dict(), "world_size": 1}
        start = time.perf_counter()
        checkpointer.save(1, engine, train_state, {})
        save = time.perf_counter() - start
        start = time.perf_counter()
        checkpointer.load("step_000000001", engine)
        load = time.perf_counter() - start

        quiet = [step() for _ in range(args.steps)]
        checkpointer.save(2, engine, train_state, {}, background=True)
        busy = []
        while checkpointer.pending is not None and checkpointer.pending[1].is_alive():
            busy.append(step())
        checkpointer.wait()
        stall_start = time.perf_counter()
        checkpointer.save(3, engine, train_state, {}, background=True)
        staging = time.perf_counter() - stall_start
        checkpointer.wait()

        gb = state_bytes / 1e9
        print(f"# {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
              f"{args.size}: model + AdamW state {gb:.2f} GB, SeaweedFS on 127.0.0.1")  # fmt: skip
        print("| operation | seconds | GB/s | × raw |")
        print("|---|---:|---:|---:|")
        print(
            f"| raw multipart put ({raw_bytes / 1e9:.2f} GB) | {raw_put:.1f} | {raw_bytes / 1e9 / raw_put:.3f} | 1.00 |"
        )
        print(f"| checkpoint save (stage + upload + commit) | {save:.1f} | {gb / save:.3f} | "
              f"{(gb / save) / (raw_bytes / 1e9 / raw_put):.2f} |")  # fmt: skip
        print(f"| raw get | {raw_get:.1f} | {raw_bytes / 1e9 / raw_get:.3f} | 1.00 |")
        print(f"| checkpoint load (verify + read) | {load:.1f} | {gb / load:.3f} | "
              f"{(gb / load) / (raw_bytes / 1e9 / raw_get):.2f} |")  # fmt: skip
        quiet_mean = statistics.mean(quiet)
        busy_mean = statistics.mean(busy) if busy else float("nan")
        print(f"\nstep time without upload {quiet_mean:.2f} s ({len(quiet)} steps), during a "
              f"background upload {busy_mean:.2f} s ({len(busy)} steps): "
              f"stall {100 * (busy_mean / quiet_mean - 1):.1f}% per step; "
              f"staging pause once per save {staging:.1f} s")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()

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
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="esm2_150M")
    parser.add_argument("--steps", type=int, default=6, help="steps timed with / without upload")
    parser.add_argument("--server-nice", type=int, default=19,
                        help="niceness of the S3 server, which stands in for storage on other "
                        "machines (0: let it compete with training as an equal)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then bf16 autocast)")
    parser.add_argument("--tokens", type=int, default=3200, help="tokens per training step")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from esmdist import alphabet
    from esmdist.checkpoint import CheckpointConfig, Checkpointer
    from esmdist.config import load_config
    from esmdist.data.batch import MaskingConfig, pack
    from esmdist.parallel.distributed import DistInfo
    from esmdist.testing.s3server import SeaweedS3
    from esmdist.train import engine_for

    scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    server = SeaweedS3(scratch / "s3", nice=args.server_nice)
    server.start()
    os.environ.update(server.env())
    try:
        fs = server.filesystem()
        fs.mkdir("bench")
        device = torch.device(args.device)
        dtype = "bf16" if device.type == "cuda" else "fp32"
        config = load_config(None, [f"--model.size={args.size}", "--parallel.backend=single",
                                    "--data.max_tokens=2048", "--train.tokens_per_step=2048",
                                    "--train.max_steps=1000", "--optim.warmup_steps=10",
                                    f"--train.dtype={dtype}"])  # fmt: skip
        info = DistInfo(0, 1, 0, device)
        engine = engine_for(config, info)
        records = (REPO / "data/demo_4k.fasta").read_text().split(">")[1:]
        sequences, total = [], 0
        for record in records:
            if total >= args.tokens:
                break
            sequences.append(alphabet.encode("".join(record.strip().splitlines()[1:]))[:400])
            total += len(sequences[-1])
        batch = pack(sequences, MaskingConfig(), np.random.default_rng(0).random((3, total))).to(
            device
        )

        def step() -> float:
            start = time.perf_counter()
            with engine.autocast():
                logits = engine.model(batch.tokens, batch.cu_seqlens,
                                      output_mask=batch.selected).logits  # fmt: skip
            engine.backward(F.cross_entropy(logits.float(), batch.targets), last=True)
            engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        step()  # creates the Adam moments
        state_bytes = sum(
            t.numel() * t.element_size() for t in engine.checkpoint_state()["model"].values()
        )
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
        train_state = {"step": 1, "world_size": 1}
        start = time.perf_counter()
        checkpointer.save(1, engine, train_state, {})
        save = time.perf_counter() - start
        start = time.perf_counter()
        checkpointer.load(checkpointer.open("step_000000001"), engine)
        load = time.perf_counter() - start

        quiet = [step() for _ in range(args.steps)]
        checkpointer.save(2, engine, train_state, {}, background=True)
        upload_start = time.perf_counter()
        busy = []
        # The uploader runs at the lowest CPU priority: on a node whose cores training keeps
        # busy it advances slowly and never finishes during a short benchmark; time a fixed
        # number of steps, then let it finish.
        while len(busy) < args.steps and checkpointer.pending[1].is_alive():
            busy.append(step())
        checkpointer.wait()
        upload_total = time.perf_counter() - upload_start
        stall_start = time.perf_counter()
        checkpointer.save(3, engine, train_state, {}, background=True)
        staging = time.perf_counter() - stall_start
        checkpointer.wait()

        gb = state_bytes / 1e9
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(f"# {platform.node()} {platform.machine()} ({os.cpu_count()} cores, {where}), "
              f"{time.strftime('%Y-%m-%d')}, {args.size}: model + AdamW state {gb:.2f} GB, "
              f"SeaweedFS on 127.0.0.1 at nice {args.server_nice}, {batch.num_tokens} tokens "
              f"per step")  # fmt: skip
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
        print(f"\nstep time without upload {quiet_mean:.3f} s ({len(quiet)} steps), during a "
              f"background upload {busy_mean:.3f} s ({len(busy)} steps): "
              f"stall {100 * (busy_mean / quiet_mean - 1):.1f}% per step; "
              f"staging pause once per save {staging:.1f} s; the upload finished "
              f"{upload_total:.1f} s after it started")  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

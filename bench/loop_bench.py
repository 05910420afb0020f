"""The trainer loop as a user runs it (`launcher/pretrain.py`, its `metrics.jsonl`), against the
same loop of another checkout (before/after a change) and against the bare training step of the
same model and tokens — what the loop loses to the host (data, collectives, reads back from the
device, logging).

    python bench/loop_bench.py --model debug --world 2 --compare /tmp/before   # before/after
    python bench/loop_bench.py --model esm2_8M --tokens 4096 --step-level      # loop vs step
    python bench/loop_bench.py --model esm2_35M --device cuda --tokens 16384 --step-level

The bundled proteins (data/demo_4k.fasta) are sharded once; each run trains `--steps` steps from
scratch with configs/debug-cpu.toml's data settings, the named model, `--tokens` tokens per
micro-batch and rank (one micro-batch per step), ESM-2's peak learning rate (warm-up over the
first quarter of the steps), no validation and no checkpoint (the run is stopped once its last
step is logged). Its tokens/s is the median of the logged windows after the first (warm-up,
compilation). Checkouts alternate, `--rounds` runs each; the ratio is of the medians.
`--step-level` adds bench/train_bench.py's timing of the engine's step alone (same model, dtype,
tokens per step, compile and activation checkpointing) on the first batches the trainer's
loader makes of the same shards, already in host memory, in this process after the runs (one
process only: `--world 1`).
`--loss-check` (with `--compare`, one round) compares the loss curves: this checkout and the
baseline train with train.seed 0, and this checkout once more with seed 1; the curves are
"within noise" when this checkout's steps differ from the baseline's, on average, by no more
than they differ from the other seed's (logged steps after the warm-up quarter). Exit status 1
if not — the check that a speed change left training as it was (gpu_check's `curve`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shard(out: Path) -> Path:
    shards = out / "shards"
    subprocess.run([sys.executable, "-m", "esmdist.cli", "shard", str(REPO / "data/demo_4k.fasta"),
                    "--out", str(shards), "--shard-size", "1MB", "--workers", "2"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return shards


def run_loop(tree: Path, args: argparse.Namespace, shards: Path, out: Path) -> list[dict]:
    """The logged training records (loss, tokens/s, MFU where the device's peak is known) of
    one training run from checkout `tree`."""
    run = [f"--data.path={shards}", f"--data.num_workers={args.workers}",
           f"--train.max_steps={args.steps}", f"--train.log_every={args.log_every}",
           "--train.valid_every=0", "--checkpoint.every=0", f"--train.output_dir={out}",
           "--log.wandb=false", f"--optim.warmup_steps={max(1, args.steps // 4)}"]  # fmt: skip
    if args.shipped:  # the size's own config, as a user runs it; the bench's step size
        overrides = ["--config", str(tree / f"configs/{args.model}.toml"), *run,
                     f"--train.tokens_per_step={args.step_tokens}"]  # fmt: skip
    else:
        backend = "single" if args.world == 1 else args.backend
        dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
        overrides = [
            "--config", str(tree / "configs/debug-cpu.toml"), f"--model.size={args.model}", *run,
            f"--data.max_tokens={args.tokens}", f"--data.crop_length={args.crop}",
            f"--train.tokens_per_step={args.tokens * args.world}", f"--parallel.backend={backend}",
            f"--train.dtype={dtype}", "--optim.lr=4e-4",
            f"--train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        ]  # fmt: skip
        if args.compile != "auto":  # a checkout from before "auto" takes only true/false
            overrides.append(f"--train.compile={args.compile}")
    overrides += args.set
    launcher = [sys.executable, str(tree / "launcher/pretrain.py")]
    if args.world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(args.world), str(tree / "launcher/pretrain.py")]  # fmt: skip
    path = os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])
    out.mkdir(parents=True)
    with (out / "log.txt").open("w") as log:
        process = subprocess.Popen([*launcher, *overrides], cwd=tree, stdout=log,
                                   env={**os.environ, "PYTHONPATH": path},
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            records = _records_until(process, out / "metrics.jsonl", args.steps)
        finally:  # also when this bench is stopped (gpu_check's budget): no orphaned trainer
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if records is None:
        tail = (out / "log.txt").read_text()[-3000:]
        sys.exit(f"{tree}: training failed ({process.returncode}):\n{tail}")
    return [r for r in records if "tokens_per_s" in r]


def run_facts(records: list[dict], out: Path) -> dict:
    """What one run resolved and measured besides tokens/s: its micro-batch and recomputation
    (config.json), the time from its start to the end of its first step, its peak memory, the
    graphs it compiled after its warm-up."""
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    train = config.get("train", {})
    facts = {"config": config, "micro_batch": config.get("data", {}).get("max_tokens"),
             "recompute_every": train.get("recompute_every", 1)
             if train.get("activation_checkpointing") else 0}  # fmt: skip
    for key, pick in (("startup_s", min), ("peak_memory_gib", max), ("recompiles", max)):
        values = [r[key] for r in records if key in r]
        if values:
            facts[key] = pick(values)
    return facts


def _records_until(process: subprocess.Popen, metrics: Path, last_step: int) -> list | None:
    """The metrics records once step `last_step` is logged — then the run is killed: its final
    checkpoint and export (minutes at 3B) are not what is measured. None if it fails first."""
    while True:
        text = metrics.read_text() if metrics.exists() else ""
        records = [json.loads(line) for line in text.splitlines(keepends=True)
                   if line.endswith("\n")]  # fmt: skip
        if any(r.get("step") == last_step for r in records):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return records
        if process.poll() is not None:
            return records if process.returncode == 0 else None
        time.sleep(0.5)


def step_level(args: argparse.Namespace, shards: Path, resolved: dict) -> float:
    """Real tokens/s of the engine's step alone (bench/train_bench.py's), median of rounds, on
    the first batches the trainer's own loader makes of the same shards, with the run's
    resolved config (`resolved`, its config.json: micro-batch, recomputation, dtype, compile)."""
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    from train_bench import Esmdist, timed

    from esmdist.data.stream import DataConfig, ShardSet, TrainLoader

    device = torch.device(args.device)
    data, train = resolved["data"], resolved["train"]
    tokens = data["max_tokens"]
    ours = Esmdist(resolved["model"]["size"], device, train["dtype"], tokens, train["compile"],
                   train["activation_checkpointing"],
                   overrides=(f"--train.recompute_every={train['recompute_every']}",
                              *(f"--parallel.{k}={v}" for k, v in resolved["parallel"].items()
                                if k in ("low_precision_weights",))))  # fmt: skip
    data = DataConfig(path=str(shards), max_tokens=tokens, crop_length=data["crop_length"],
                      num_workers=0)  # fmt: skip
    loader = iter(TrainLoader(ShardSet.open(str(shards), "train"), data,
                              pin_memory=device.type == "cuda"))  # fmt: skip
    batches = [next(loader) for _ in range(max(args.log_every, 4))]
    real = sum(b.num_tokens for b in batches) / len(batches)
    timed(ours, batches, device)  # warm-up (and compilation)
    return statistics.median(real / timed(ours, batches, device) for _ in range(args.rounds))


def loss_check(args: argparse.Namespace, shards: Path, scratch: Path,
               curves: dict[str, list[dict]]) -> dict:  # fmt: skip
    """The loss curves of this checkout and the baseline (seed 0) against the seed-to-seed
    spread of this checkout (seed 1): mean |Δ loss| over the logged steps after the warm-up."""
    seeded = argparse.Namespace(**{**vars(args), "set": [*args.set, "--train.seed=1"]})
    curves["this, seed 1"] = run_loop(REPO, seeded, shards, scratch / "this-seed1")
    start = args.steps // 4
    losses = {name: {r["step"]: r["loss"] for r in records if r["step"] > start}
              for name, records in curves.items()}  # fmt: skip
    steps = sorted(set.intersection(*(set(found) for found in losses.values())))
    this, baseline, other = (losses[name] for name in ("this", "baseline", "this, seed 1"))
    code = statistics.fmean(abs(this[s] - baseline[s]) for s in steps)
    noise = statistics.fmean(abs(this[s] - other[s]) for s in steps)
    result = {"steps_compared": len(steps), "code_difference": code, "seed_difference": noise,
              "within_noise": code <= noise,
              "final_loss": {name: statistics.fmean(found[s] for s in steps[-len(steps) // 4:])
                             for name, found in losses.items()},
              "curves": {name: [[s, found[s]] for s in steps] for name, found in losses.items()}}  # fmt: skip
    print(f"loss curves after step {start} ({len(steps)} logged steps): mean |this − baseline| "
          f"{code:.4f}, mean |seed 0 − seed 1| {noise:.4f}: "
          f"{'within noise' if code <= noise else 'OUTSIDE NOISE'}; last quarter's mean loss "
          + ", ".join(f"{name} {value:.4f}" for name, value in result["final_loss"].items()))  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="debug")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch and rank")
    parser.add_argument("--crop", type=int, default=1024, help="data.crop_length")
    parser.add_argument("--world", type=int, default=1, help="ranks (torchrun when > 1)")
    parser.add_argument("--backend", default="ddp", help="parallel.backend when --world > 1")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each checkout")
    parser.add_argument("--compile", nargs="?", const="true", default="auto",
                        choices=["auto", "true", "false"], help="train.compile (default auto)")  # fmt: skip
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--shipped", action="store_true",
                        help="run configs/MODEL.toml as it is (micro-batch, recomputation, "
                        "backend, dtype), but for the data, the steps and --step-tokens")  # fmt: skip
    parser.add_argument("--step-tokens", type=int, default=262144,
                        help="with --shipped: train.tokens_per_step (the configs' 2M are "
                        "minutes per step on one GPU)")  # fmt: skip
    parser.add_argument("--compare", type=Path, help="another checkout of esmdist (the baseline)")
    parser.add_argument("--step-level", action="store_true")
    parser.add_argument("--loss-check", action="store_true", help="with --compare: loss curves")
    parser.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE",
                        help="more config overrides, for both checkouts")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup of `finally`s
    if args.loss_check and not (args.compare and args.rounds == 1):
        parser.error("--loss-check compares one run of each checkout: --compare and --rounds 1")
    trees = {"this": REPO, **({"baseline": args.compare.resolve()} if args.compare else {})}
    windows: dict[str, list[dict]] = {name: [] for name in trees}
    curves: dict[str, list[dict]] = {}  # the last run's records of each checkout
    runs: dict[str, list[dict]] = {name: [] for name in trees}  # start-up, memory, recompiles
    # Not a TemporaryDirectory: a killed run's last processes may still be going at its end.
    scratch = Path(tempfile.mkdtemp(prefix="loop_bench-"))
    try:
        shards = shard(scratch)
        for round_number in range(args.rounds):
            for name, tree in trees.items():
                out = scratch / f"{name}-{round_number}"
                found = run_loop(tree, args, shards, out)
                windows[name] += found[1:]  # the first window warms up (and compiles)
                curves[name] = found
                runs[name].append(run_facts(found, out))
                facts = runs[name][-1]
                print(f"  run {round_number + 1}, {name}: "
                      f"{statistics.median(w['tokens_per_s'] for w in found[1:]):,.0f} tokens/s; "
                      + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "config"),
                      flush=True)  # fmt: skip
        if args.step_level and args.world == 1:
            step_alone = step_level(args, shards, runs["this"][-1]["config"])
        if args.loss_check:
            losses = loss_check(args, shards, scratch, curves)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"model": args.model, "device": args.device, "world": args.world,
              "tokens_per_rank": args.tokens, "steps": args.steps, "rounds": args.rounds}  # fmt: skip
    print(f"{args.model} on {args.world} {args.device} rank(s), {args.tokens} tokens per rank "
          f"and step, {args.rounds} run(s) of {args.steps} steps each (medians of the logged "
          "windows after the first):")  # fmt: skip
    for name, tree in trees.items():
        result[f"{name}_runs"] = [{k: v for k, v in r.items() if k != "config"} for r in runs[name]]
        result[name] = statistics.median(w["tokens_per_s"] for w in windows[name])
        mfu = [w["mfu"] for w in windows[name] if "mfu" in w]
        if mfu:
            result[f"{name}_mfu"] = statistics.median(mfu)
        shown = f", MFU {result[f'{name}_mfu']:.1%}" if mfu else ""
        print(f"  trainer loop, {name} ({tree}): {result[name]:12,.0f} tokens/s{shown}")
    if args.compare:
        result["ratio"] = result["this"] / result["baseline"]
        print(f"this vs baseline: {result['ratio']:.2f}x")
    if args.step_level and args.world == 1:
        result["step_level"] = step_alone
        result["loop_vs_step"] = result["this"] / result["step_level"]
        print(f"  step alone (bench/train_bench.py): {result['step_level']:12,.0f} tokens/s\n"
              f"trainer loop vs step alone: {result['loop_vs_step']:.2f}x")  # fmt: skip
    if args.loss_check:
        result["loss_check"] = losses
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.loss_check and not losses["within_noise"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""What every `esmdist eval` command shares: the model argument (a size name, an esmdist
checkpoint, a fair-esm file, a Hugging Face directory — or `--checkpoints RUN_DIR` for the
emergence curve), loading it onto the GPU when there is one, and the JSON + CSV results."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from pathlib import Path

from esmdist.model.config import MODEL_SIZES
from esmdist.storage import writing

EVAL_DATA = Path(__file__).resolve().parents[2] / "data" / "eval"
"""The bundled evaluation sets of a clone (data/eval/README.md)."""


def load_model(spec: str, seed: int = 0, offload: bool = False,
               contact_regression: str | None = None):  # fmt: skip
    import torch

    from esmdist.model import ESM, build_model, model_config

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec in MODEL_SIZES:
        config = model_config(spec)
        state = build_model(config).state_dict()
        print(f"model: untrained '{spec}' (random init, seed {seed})")
    else:
        from esmdist.export import model_weights

        config, state = model_weights(spec)
        where = "host memory, run block by block on " if offload else ""
        print(f"model: {spec} ({config.arch}, {config.num_params():,} parameters) on "
              f"{where}{device}")  # fmt: skip
    if offload:
        from esmdist.eval.offload import offloaded_model

        model = offloaded_model(config, state)
    else:
        model = ESM(config)
        model.load_state_dict(state)
        model = model.eval().to(device)
    if contact_regression:
        from esmdist.eval.contact_fit import apply_regression, load_regression

        apply_regression(model, load_regression(contact_regression), contact_regression)
        print(f"contact regression: {contact_regression}")
    return model


def model_from_args(args: argparse.Namespace, spec: str | None = None):
    return load_model(spec or args.model, args.seed, getattr(args, "offload", False),
                      getattr(args, "contact_regression", None))  # fmt: skip


def add_model_arguments(command: argparse.ArgumentParser, curve: bool = False) -> None:
    """--model (or, with `curve`, --checkpoints instead), --seed, --offload."""
    which = command.add_mutually_exclusive_group(required=True) if curve else command
    which.add_argument("--model", required=not curve,
                       help=f"a size name for an untrained model ({', '.join(MODEL_SIZES)}), an "
                       "esmdist checkpoint, a run directory (its final/, else its newest "
                       "checkpoint), a fair-esm .pt file or a Hugging Face directory (local or "
                       "s3://)")  # fmt: skip
    if curve:
        which.add_argument("--checkpoints", metavar="RUN_DIR",
                           help="evaluate every committed checkpoint of a run (its output_dir "
                           "or checkpoint.root) and plot the metric against the step")  # fmt: skip
    command.add_argument("--seed", type=int, default=0, help="seed of an untrained model")
    command.add_argument("--offload", action="store_true",
                         help="keep the parameters in host memory and run block by block "
                         "(FSDP2 CPU offload): for models larger than the GPU, e.g. ESM-2 15B")  # fmt: skip


def write_results(out: str, name: str, summary: dict, rows: list[dict]) -> None:
    """`out/{name}.json` (the summary and every row) and `out/{name}.csv` (the rows)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with writing(folder / f"{name}.json"):
        (folder / f"{name}.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    with writing(folder / f"{name}.csv"), open(folder / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {folder / f'{name}.json'}, {folder / f'{name}.csv'}")


def run_curve(args: argparse.Namespace, name: str, evaluate: Callable[[object], dict],
              keys: list[str], baselines: dict[str, str]) -> int:  # fmt: skip
    """`--checkpoints`: `evaluate(model)` per checkpoint; `{name}_curve.{json,csv,png}` in
    --out (default: the run directory). `baselines`: a key's baseline, drawn beside it."""
    from esmdist.eval.curve import evaluate_checkpoints
    from esmdist.eval.plot import plot_curve

    if not args.out and "://" in args.checkpoints:
        raise ValueError("--checkpoints in object storage: give --out, a local directory")
    rows = list(evaluate_checkpoints(args.checkpoints, lambda where: model_from_args(args, where),
                                     evaluate))  # fmt: skip
    print(f"{'step':>10} " + " ".join(f"{key:>18}" for key in keys))
    for row in rows:
        print(f"{row['step']:>10} " + " ".join(
            f"{'no prediction':>18}" if row[key] is None else f"{row[key]:>18.4f}" for key in keys))  # fmt: skip
    out = args.out or args.checkpoints
    write_results(out, f"{name}_curve", {"run": args.checkpoints}, rows)
    figure = plot_curve(rows, keys, f"{args.checkpoints}: {name}", Path(out) / f"{name}_curve.png",
                        baselines)  # fmt: skip
    print(f"plot: {figure}")
    return 0

"""`esmdist plot RUN_DIR`: a run's metrics.jsonl as one PNG — training loss and validation
perplexity, tokens/s and learning rate against the step (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("loss", "training loss"), ("valid_perplexity", "validation perplexity"),
          ("tokens_per_s", "tokens / s"), ("lr", "learning rate"))  # fmt: skip


def read_metrics(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not JSON") from None
    if not records:
        raise ValueError(f"{path}: no metrics yet")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's plot (default `RUN_DIR/metrics.png`); the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (is {run_dir} a run's output_dir?)")
    records = read_metrics(metrics)
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for axis, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("step")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out

"""The evaluation's figures (matplotlib, no display needed): a run's metrics.jsonl (`esmdist plot
RUN_DIR`: training loss, validation perplexity, tokens/s and learning rate against the step),
a predicted contact map over the true one, predicted against measured variant effects, a 2-D
projection of embeddings (the ESM-1b paper's Figure 2 view) and a metric against the
checkpoint step with its baseline (the emergence curve)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from esmdist.storage import writing

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    with writing(out):
        figure.savefig(out, dpi=100)
    _pyplot().close(figure)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's plot (default `RUN_DIR/metrics.png`); the path written."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (is {run_dir} a run's output_dir?)")
    records = read_metrics(metrics)
    reshaped = [r["step"] for r in records if "resume_change" in r]
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for axis, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        for step in reshaped:  # a resume on another world size or backend
            axis.axvline(step, color="tab:orange", linestyle=":", label="resumed, reshaped")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    if reshaped:
        axes.flat[0].legend(*[h[:1] for h in axes.flat[0].get_legend_handles_labels()],
                            fontsize=8)  # fmt: skip
    for axis in axes[1]:
        axis.set_xlabel("step")
    figure.suptitle(str(run_dir))
    return _save(figure, out or run_dir / "metrics.png")


def plot_contacts(predicted: np.ndarray, contacts: np.ndarray, title: str,
                  out: str | Path) -> Path:  # fmt: skip
    """One map: predicted probabilities above the diagonal (with a colour bar), the true
    contacts below it, and the top-L long-range predictions marked above (hits and misses in
    two colours). The title gives long-range P@L beside a random ranking's — or says that a
    constant map is no prediction."""
    from esmdist.eval.contacts import NO_PREDICTION, contact_metrics

    plt = _pyplot()
    length = len(predicted)
    found = contact_metrics(predicted, contacts)
    upper = np.triu(np.ones((length, length), dtype=bool), 1)
    image = np.where(upper, predicted, np.nan)
    figure, axis = plt.subplots(figsize=(7.2, 6))
    shown = axis.imshow(image, cmap="viridis", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axis, label="predicted contact probability (upper triangle)")
    true_rows, true_cols = np.nonzero(np.tril(contacts == 1, -1))
    axis.scatter(true_cols, true_rows, s=3, c="black", marker="s",
                 label="true contact, Cβ–Cβ < 8 Å (lower triangle)")  # fmt: skip
    if found["long_P@L"] is not None:
        rows, cols = np.triu_indices(length, 24)
        scores = np.where(contacts[rows, cols] >= 0, predicted[rows, cols], -np.inf)
        top = np.argsort(-scores, kind="stable")[:length]
        top = top[np.isfinite(scores[top])]
        hit = contacts[rows[top], cols[top]] == 1
        for mark, colour, label in ((hit, "tab:blue", "top-L long range: contact"),
                                    (~hit, "tab:red", "top-L long range: none")):  # fmt: skip
            axis.scatter(cols[top][mark], rows[top][mark], s=7, c=colour, label=label)
        verdict = f"long-range P@L {found['long_P@L']:.3f}"
    else:
        verdict = NO_PREDICTION
    axis.set_xlabel("residue")
    axis.set_ylabel("residue")
    axis.legend(loc="lower left", fontsize=7)
    axis.set_title(f"{title}\n{verdict} (random ranking {found['random_long_P@L']:.3f})",
                   fontsize=9)  # fmt: skip
    return _save(figure, out)


def plot_variants(predicted: np.ndarray, measured: np.ndarray, rho: float, title: str,
                  out: str | Path) -> Path:  # fmt: skip
    """Predicted score against the measured fitness, one point per variant, ρ in the title."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    axis.scatter(measured, predicted, s=8, alpha=0.6)
    axis.set_xlabel("measured (DMS)")
    axis.set_ylabel("predicted (log-likelihood ratio)")
    axis.set_title(f"{title}\nSpearman ρ = {rho:.3f}, {len(measured)} variants", fontsize=9)
    axis.grid(alpha=0.3)
    return _save(figure, out)


def project(embeddings: np.ndarray) -> np.ndarray:
    """[N, 2] principal components of the centred embeddings."""
    centred = embeddings - embeddings.mean(0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    return centred @ directions[:2].T


def plot_projection(embeddings: np.ndarray, labels: list[str] | None, title: str,
                    out: str | Path, shown_labels: int = 10) -> Path:  # fmt: skip
    """PCA of the embeddings, coloured by the `shown_labels` most common labels (the rest
    grey)."""
    plt = _pyplot()
    points = project(embeddings.astype(np.float64))
    figure, axis = plt.subplots(figsize=(7, 6))
    if labels is None:
        axis.scatter(points[:, 0], points[:, 1], s=6)
    else:
        names, counts = np.unique(labels, return_counts=True)
        common = list(names[np.argsort(-counts, kind="stable")][:shown_labels])
        labels = np.array(labels)
        rest = ~np.isin(labels, common)
        if rest.any():
            axis.scatter(points[rest, 0], points[rest, 1], s=5, c="lightgrey", label="other")
        for name in common:
            chosen = labels == name
            axis.scatter(points[chosen, 0], points[chosen, 1], s=7, label=str(name))
        axis.legend(fontsize=8, markerscale=2)
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    axis.set_title(title)
    return _save(figure, out)


def plot_curve(rows: list[dict], keys: list[str], title: str, out: str | Path,
               baselines: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Each metric of `keys` against the checkpoint step, with its baseline (`baselines`: key →
    the baseline's key) dashed in the same panel; a step without a prediction leaves a gap
    (marked ×) instead of a value."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=key)
        missing = [row["step"] for row in rows if row.get(key) is None]
        if missing:
            axis.scatter(missing, [0.0] * len(missing), marker="x", c="tab:red",
                         label="no prediction")  # fmt: skip
        base = (baselines or {}).get(key)
        floor = [(row["step"], row[base]) for row in rows if row.get(base) is not None]
        if floor:
            axis.plot(*zip(*floor, strict=True), linestyle="--", c="grey",
                      label=base.replace("_", " "))  # fmt: skip
        axis.set_xlabel("step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
        if missing or floor:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, out)

"""Full fp32 weights of a committed checkpoint, whatever engine and world size wrote it — for
`esmdist export`, evaluation and `model.init_from` — and of the other model files esmdist reads
(fair-esm `.pt`, Hugging Face directories), local or in object storage.

Nothing in the checkpoint is executed (DCP metadata and values through allow-lists,
DeepSpeed's pickles weights-only), and nothing is allocated from its config alone: the config is
range-checked (`ModelConfig`), the shapes it gives are compared — by arithmetic, nothing built —
with those of the tensors the file really holds, and only then is anything materialised: a
forged `config.json` asking for a huge model is an error naming the key, not an hour of
building and an out-of-memory kill.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from esmdist.checkpoint import (
    STEP_DIR,
    CheckpointError,
    CheckpointStore,
    Committed,
    open_checkpoint,
    step_name,
)
from esmdist.config import ModelSpec, build_section
from esmdist.model import ESM, ModelConfig
from esmdist.storage import writing


def _model_config(checkpoint: Committed) -> ModelConfig:
    job = checkpoint.json("config.json")
    url = checkpoint.store.url_of(checkpoint.name, "config.json")
    if not isinstance(job, dict) or not isinstance(job.get("model"), dict):
        raise CheckpointError(f"{url}: no [model] table")
    try:
        return build_section(ModelSpec, job["model"], "model.").build()
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{url}: {exc}") from None


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, url: str) -> None:
    """The checkpoint's tensor shapes (by model key) against its config's, before any build."""
    try:
        config.check_shapes(shapes, f"{url}: config.json")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def consolidated_weights(where: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, full fp32 state dict) of the committed checkpoint at `where`."""
    checkpoint = open_checkpoint(where)
    config = _model_config(checkpoint)
    train_state = checkpoint.json("train_state.json")
    backend = train_state.get("backend") if isinstance(train_state, dict) else None
    if backend == "deepspeed":
        from esmdist.checkpoint.deepspeed_files import zero_fp32_state

        state = zero_fp32_state(checkpoint.store, checkpoint.name, "model_optim",
                                expected=checkpoint.model_optim)  # fmt: skip
        # The frozen contact regression is no optimizer parameter: DeepSpeed may leave it out
        # of the fp32 state, and then its saved buffer values are in the module state.
        frozen = {k: s for k, s in config.parameter_shapes().items() if k not in state}
        _check_shapes({**frozen, **{k: tuple(v.shape) for k, v in state.items()}}, config,
                      checkpoint.url)  # fmt: skip
        model = ESM(config)
        full = model.state_dict()
        return config, {**{k: full[k] for k in frozen}, **{k: v.float() for k, v in state.items()}}
    from esmdist.checkpoint.dcp import load_dcp, read_dcp_shapes

    shapes = read_dcp_shapes(checkpoint.store, checkpoint.name, "model_optim",
                             expected=checkpoint.model_optim, prefix="model.")  # fmt: skip
    _check_shapes(shapes, config, checkpoint.url)
    wanted = {"model": ESM(config).state_dict()}
    load_dcp(wanted, checkpoint.store, checkpoint.name, "model_optim",
             expected=checkpoint.model_optim, ignored=("optim.",), no_dist=True)  # fmt: skip
    return config, {k: v.float() for k, v in wanted["model"].items()}


FINAL_EXPORT = "final"
"""The Hugging Face directory written in train.output_dir when the last step is done (renamed
into place whole)."""


def write_final_export(
    state: dict[str, torch.Tensor], config: ModelConfig, output_dir: Path
) -> Path:
    """`state` as a Hugging Face EsmForMaskedLM directory, `{output_dir}/final`: written aside
    and renamed whole, so that a `final` directory is always a complete export."""
    from esmdist.model.convert import save_hf

    out = output_dir / FINAL_EXPORT
    partial = out.with_name(f"{FINAL_EXPORT}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with writing(partial):
        save_hf({k: v.float().cpu() for k, v in state.items()}, config, partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def run_model(source: str) -> str | None:
    """The model a run directory stands for: its `final/` export when the run finished, else
    its newest committed checkpoint (in it, or in its `checkpoints/`); None when `source` is
    not a run directory or checkpoint root."""
    if "://" not in source and (Path(source) / FINAL_EXPORT / "config.json").is_file():
        return str(Path(source) / FINAL_EXPORT)
    if "://" not in source and (Path(source) / "config.json").is_file():
        return None  # a Hugging Face directory
    for root in (source.rstrip("/"), f"{source.rstrip('/')}/checkpoints"):
        committed, _ = CheckpointStore(root).steps()
        if committed:
            return f"{root}/{step_name(committed[-1])}"
    return None


def model_weights(source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(architecture, full state dict) of `source`: an esmdist checkpoint (`…/step_NNNNNNNNN`),
    a run directory (its `final/`, else its newest checkpoint), a fair-esm `.pt` file or a
    Hugging Face EsmForMaskedLM directory — local or s3://."""
    from esmdist.model import convert

    if STEP_DIR.match(source.rstrip("/").rsplit("/", 1)[-1]):
        return consolidated_weights(source)
    if ("://" in source and not source.endswith(".pt")) or Path(source).is_dir():
        resolved = run_model(source)
        if resolved is not None:
            print(f"{source}: a run directory; its model is {resolved}", flush=True)
            return model_weights(resolved)
    if "://" in source:
        with tempfile.TemporaryDirectory(prefix="esmdist-model-") as scratch:
            return model_weights(str(_download(source, Path(scratch))))
    path = Path(source)
    if path.is_dir():
        return convert.load_hf(path)
    if path.is_file():
        return convert.load_fair_esm_checkpoint(path)
    raise FileNotFoundError(f"{source}: no such checkpoint file or model directory")


def _download(url: str, scratch: Path) -> Path:
    """A fair-esm file (with its contact-regression companion) or a model directory, fetched."""
    from esmdist.storage import Store

    parent, _, name = url.rstrip("/").rpartition("/")
    store = Store(parent)
    if not store.exists(name):
        raise FileNotFoundError(f"{url}: no such model file or directory")
    target = scratch / name
    if store.fs.isdir(store.path(name)):  # a Hugging Face directory
        store.download_tree(target, name)
        return target
    companion = name.removesuffix(".pt") + "-contact-regression.pt"
    for file in (name, companion) if store.exists(companion) else (name,):
        store.retry(f"downloading {parent}/{file}",
                    lambda f=file: store.fs.get_file(store.path(f), str(scratch / f)))  # fmt: skip
    return target


def model_source_exists(source: str) -> bool:
    if "://" not in source:
        return Path(source).exists()
    from esmdist.storage import Store

    parent, _, name = source.rstrip("/").rpartition("/")
    return Store(parent).exists(name)

"""ESM-2 / ESM-1b models, their named sizes, contact head and conversions."""

from esmdist.model.config import MODEL_SIZES, ModelConfig, model_config

__all__ = ["ESM", "MODEL_SIZES", "ModelConfig", "ModelOutput", "build_model", "model_config"]
_MODEL_FILE = ("ESM", "ModelOutput", "build_model")


def __getattr__(name: str):
    # torch is imported by what uses the model, not by everything that reads the size registry:
    # `esmdist shard` starts a process per worker, and each imports the CLI.
    if name in _MODEL_FILE:
        from esmdist.model import esm

        return getattr(esm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

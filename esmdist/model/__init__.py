"""ESM-2 / ESM-1b models, their named sizes, contact head and conversions."""

from esmdist.model.config import MODEL_SIZES, ModelConfig, model_config
from esmdist.model.esm import ESM, ModelOutput, build_model

__all__ = ["ESM", "MODEL_SIZES", "ModelConfig", "ModelOutput", "build_model", "model_config"]

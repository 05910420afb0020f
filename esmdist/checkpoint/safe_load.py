"""DeepSpeed's checkpoint files are `torch.save` pickles, which DeepSpeed (and its
`zero_to_fp32` consolidation) reads with `weights_only=False`: a forged file could run code.
Every DeepSpeed read esmdist makes happens inside `torch_pickles_without_code()`, which forces
torch's weights-only unpickler on every `torch.load` (whatever the caller asked) and allows,
besides tensors and plain containers, exactly the three DeepSpeed types its files hold.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator

import torch

from esmdist.checkpoint.manifest import CheckpointError
from esmdist.model.convert import weights_only_refusal

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_globals() -> list:
    """The non-torch types in DeepSpeed's ZeRO 1/2/3 checkpoint files (fp32 and bf16): the loss
    scaler object, the ZeRO stage enum and the fragment addresses of optimizer state."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def torch_pickles_without_code(url: str) -> Iterator[None]:
    """Inside: every torch.load is weights-only with DeepSpeed's three types allowed; a file
    that names anything else fails with a CheckpointError naming `url`."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NO)}
    # A user's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (a common workaround on torch ≥ 2.6) would make
    # torch refuse both at once; here it must not apply, whatever the environment says.
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{url}: refusing to unpickle a DeepSpeed file: {weights_only_refusal(exc)} (only tensors, "
            "containers and DeepSpeed's own state types are allowed; a checkpoint must not run "
            "code)"
        ) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

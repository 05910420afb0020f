"""Parallelism behind one small interface (`Engine`): single process, DDP, FSDP2, DeepSpeed.

The model file knows nothing of this room; the training loop only calls `Engine` methods.
"""

from esmdist.parallel.distributed import DistInfo, free_port, init_distributed
from esmdist.parallel.engine import Engine, EngineSettings, build_engine

__all__ = ["DistInfo", "Engine", "EngineSettings", "build_engine", "free_port", "init_distributed"]

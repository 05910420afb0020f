"""What a sharding run is asked to do (`ShardOptions`, validated as a whole) and the error it
stops with."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from esmdist.data.fasta import OnInvalid, ReadPolicy
from esmdist.data.format import FORMAT_VERSION


class ShardError(RuntimeError):
    """The sharding run cannot continue; the message names the input and the fix."""


@dataclass(frozen=True)
class ShardOptions:
    inputs: tuple[str, ...]
    out: str
    clusters: str | None = None
    splits: tuple[tuple[str, float], ...] = (("valid", 0.005), ("test", 0.0))
    seed: int = 0
    min_length: int = 1
    max_length: int | None = None
    on_invalid: OnInvalid = "error"
    on_missing_member: Literal["error", "skip"] = "error"
    dedupe: bool = False
    shard_bytes: int | None = 256 << 20
    shard_samples: int | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("shard: at least one INPUT is required")
        if (self.shard_bytes is None) == (self.shard_samples is None):
            raise ValueError("shard: give exactly one of --shard-size and --shard-samples")
        if self.on_invalid not in ("error", "skip", "map-x"):
            raise ValueError(f"--on-invalid must be error, skip or map-x, not {self.on_invalid}")
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError("--max-length must not be below --min-length")
        if self.min_length < 0:
            raise ValueError(f"--min-length must not be negative, got {self.min_length}")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError(f"--shard-size must be positive, got {self.shard_bytes} bytes")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ValueError(f"--shard-samples must be at least 1, got {self.shard_samples}")
        repeated = sorted({p for p in self.inputs if self.inputs.count(p) > 1})
        if repeated:
            raise ValueError(f"shard: INPUT given more than once: {', '.join(repeated)}")
        if self.on_missing_member not in ("error", "skip"):
            raise ValueError(f"--on-missing-member must be error or skip, not "
                             f"{self.on_missing_member}")  # fmt: skip

    @property
    def read_policy(self) -> ReadPolicy:
        return ReadPolicy(self.on_invalid, self.min_length, self.max_length)

    @property
    def needs_join(self) -> bool:
        """Whether samples group records by something other than their id (stage 2 runs)."""
        return bool(self.clusters) or self.dedupe

    def identity(self) -> dict:
        """Everything the output bytes depend on, besides the input bytes (not where they go)."""
        options = asdict(self)
        del options["out"]
        # Through JSON, so that it compares equal to the copy read back from a manifest.
        return json.loads(json.dumps({"format_version": FORMAT_VERSION, **options}))

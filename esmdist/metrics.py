"""Training metrics: the one FLOPs formula, MFU, the console / JSONL / wandb sinks, and a
step's outcome read from the device a step late (`StepResult`).

Training FLOPs (forward + backward) of one packed batch, written down once:

    6 · N_blocks · T  +  12 · L · d · Σ_seq s²  +  6 · (d² + d · V) · M

T = tokens (no padding exists in packed batches), N_blocks = weights of the transformer
blocks (attention and feed-forward matrices), L = layers, d = width, s = each sequence's length
(attention stays within a sequence), V = vocabulary, M = masked positions (the LM head runs
only there). 6 = 2 (multiply-add) × 3 (forward; backward to activations and to weights);
12·L·d·s per token is that ×3 of QKᵀ and AV. Kaplan et al. 2020 / PaLM's estimate with s per
sequence and the head counted where it runs. MFU = achieved FLOP/s ÷ the device's dense peak.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from esmdist.model import ModelConfig
from esmdist.storage import writing

# Dense peak TFLOP/s per device by (name fragment, dtype), for MFU when not configured.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0,
    ("H100", "fp16"): 989.0,
    ("H100", "fp32"): 67.0,
    ("H200", "bf16"): 989.0,
    ("H200", "fp16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp16"): 312.0,
    ("A100", "fp32"): 19.5,
}


def block_params(config: ModelConfig) -> int:
    e, f = config.embed_dim, config.ffn_dim
    return config.num_layers * (4 * e * e + 2 * e * f)


def batch_flops(config: ModelConfig, lengths: torch.Tensor, masked: int) -> float:
    """Training FLOPs of one packed batch with sequence `lengths` (the formula above)."""
    lengths = lengths.double()
    tokens = float(lengths.sum())
    attention = 12.0 * config.num_layers * config.embed_dim * float((lengths * lengths).sum())
    head = 6.0 * (config.embed_dim**2 + config.embed_dim * config.vocab_size) * masked
    return 6.0 * block_params(config) * tokens + attention + head


def peak_tflops(configured: float, dtype: str, device: torch.device) -> float:
    if configured:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for (frag, d), v in PEAK_TFLOPS.items() if frag in name and d == dtype), 0.0)


class MetricsLogger:
    """Rank 0 writes each record to the console, `metrics.jsonl` and wandb (if enabled)."""

    def __init__(self, output_dir: Path, enabled: bool, wandb_config: dict | None,
                 wandb_settings: dict | None, run_id: str | None = None):  # fmt: skip
        self.enabled = enabled
        self.file = None
        self.wandb_run = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        with writing(self.path):
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if wandb_settings is not None:
            import wandb

            if "WANDB_MODE" not in os.environ and not _wandb_key_configured():
                os.environ["WANDB_MODE"] = "offline"
            self.wandb_run = wandb.init(
                dir=str(output_dir), config=wandb_config, id=run_id, resume="allow",
                **wandb_settings,
            )  # fmt: skip

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        with writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb_run is not None:  # a measurement that is none (no prediction) is absent
            self.wandb_run.log({k: v for k, v in record.items() if v is not None}, step=step)
        shown = " ".join(f"{k}={_fmt(k, v)}" for k, v in record.items() if k not in ("time",))
        print(shown, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.file is not None:
            with writing(self.path):
                self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _fmt(key: str, value) -> str:
    if key in ("eta_s", "wall_s") and isinstance(value, float) and math.isfinite(value):
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"  # H:MM:SS in the console
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "none" if value is None else str(value)


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class StepResult:
    """One step's loss, gradient norm and whether it was applied, copied from the device
    without waiting; `read()` waits for this step's work only, not for what was queued after
    it, so the loop can read a step late and keep the device busy. `stop`: whether any rank
    was asked to stop (agreed before the step began)."""

    def __init__(self, step: int, values: list[torch.Tensor], stop: bool):
        self.step, self.stop = step, stop
        device = values[0].device
        self._host, self._ready = torch.stack([v.to(device, torch.float64) for v in values]), None
        if device.type == "cuda":  # into pinned memory: a copy that does not wait
            on_device, self._host = self._host, torch.empty(3, dtype=torch.float64, pin_memory=True)
            self._host.copy_(on_device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def read(self) -> tuple[float, float, bool]:
        """(loss, gradient norm, applied); a step not applied has a NaN loss."""
        if self._ready is not None:
            self._ready.synchronize()
        loss, norm, applied = self._host.tolist()
        return (loss if applied else math.nan), norm, bool(applied)

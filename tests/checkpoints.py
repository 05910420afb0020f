"""Test-side readers of checkpoint contents (the tests' own files: trusted)."""

from __future__ import annotations

import torch


def tensors(value, prefix=""):
    """Every tensor inside nested dicts/lists, by path."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from tensors(value[key], f"{prefix}/{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from tensors(item, f"{prefix}/{index}")

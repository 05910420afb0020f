"""What autograd saves for backward, measured exactly (each storage once, parameters left out):
the activation memory `esmdist plan` predicts, free of allocator slack. For bench/ and tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_bytes(forward: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors saved while `forward()` runs (its output then backpropagated, so
    the graph is freed)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    return sum(size for pointer, size in storages.items() if pointer not in skip)

"""One check for a config value's range, with an error that names the key."""

from __future__ import annotations

import math


def check_range(section: str, key: str, value: float, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:  # fmt: skip
    """ValueError naming `section.key` unless low ≤ value ≤ high (low < value if `low_open`)."""
    if value < low or value > high or (low_open and value == low):
        bound = f"above {low}" if low_open else f"at least {low}"
        if high != math.inf:
            bound = f"in {'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{section}.{key} must be {bound}, got {value}")

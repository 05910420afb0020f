"""The range of every number in a config, declared with its field and checked in one place.

A numeric field of a config dataclass is made with `bounded(default, low, high)`; the class's
`__post_init__` calls `check_fields(self, "section")`, which checks each such field's type
(an int field takes an int, never a bool or 2.0; a float field a finite number) and range,
with an error that names `section.key`. tests/adversarial/test_config_bounds.py holds every
numeric field of every section to having a range: a value no field bounds is a value a user (or
a forged file) can make nonsense of — a division by zero, a model of 10⁶ layers, a step of
10¹² tokens.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

RANGE = "range"


def check_range(section: str, key: str, value: float, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> None:  # fmt: skip
    """ValueError naming `section.key` unless low ≤ value ≤ high (strict where open)."""
    below = value < low or (low_open and value == low)
    above = value > high or (high_open and value == high)
    if below or above:
        if high == math.inf:
            bound = f"above {low}" if low_open else f"at least {low}"
        else:
            bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{section}.{key} must be {bound}, got {value}")


def bounded(default: Any, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False) -> Any:  # fmt: skip
    """A dataclass field whose value (each value, for a tuple) must lie in [low, high]."""
    return dataclasses.field(default=default, metadata={RANGE: (low, high, low_open, high_open)})


def _numbers(kind: Any) -> type | None:
    """int or float for a field of that type (also in `X | None`, `X | Literal[…]`, tuples)."""
    if kind in (int, float):
        return kind
    for arg in typing.get_args(kind):
        found = _numbers(arg)
        if found is not None:
            return found
    return None


def numeric_fields(cls: type) -> dict[str, type]:
    """The fields of config dataclass `cls` that hold numbers, and whether int or float."""
    hints = typing.get_type_hints(cls)
    return {f.name: kind for f in dataclasses.fields(cls)
            if (kind := _numbers(hints[f.name])) is not None}  # fmt: skip


def _words(kind: Any) -> set:
    """The Literal values a field of type `kind` takes besides numbers ("auto"), and None."""
    if typing.get_origin(kind) is typing.Literal:
        return set(typing.get_args(kind))
    found = {None} if kind is type(None) else set()
    for arg in typing.get_args(kind):
        found |= _words(arg)
    return found


def check_fields(instance: Any, section: str) -> None:
    """Every bounded field of `instance`: its type, then its range (ValueError naming the key;
    the words a field's type allows besides numbers — "auto", None — pass)."""
    kinds, hints = numeric_fields(type(instance)), typing.get_type_hints(type(instance))
    for item in dataclasses.fields(instance):
        bounds = item.metadata.get(RANGE)
        if bounds is None:
            continue
        value = getattr(instance, item.name)
        words = _words(hints[item.name])
        for number in value if isinstance(value, tuple) else (value,):
            if not isinstance(number, int | float) and number in words:
                continue
            wrong = isinstance(number, bool) or not isinstance(number, int | float)
            if kinds[item.name] is int and not wrong and not isinstance(number, int):
                wrong = True
            if wrong or (isinstance(number, float) and not math.isfinite(number)):
                what = "an integer" if kinds[item.name] is int else "a finite number"
                raise ValueError(f"{section}.{item.name} must be {what}, got {number!r}")
            check_range(section, item.name, number, *bounds)

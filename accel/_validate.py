"""Field checks for the config dataclasses, called from their `__post_init__` (so `dataclasses.replace` runs
them too).

Each `check_*(config, name, ...)` reads `config.<name>`, raises `ConfigError` (`ConfigTypeError` for a wrong
type) naming the class, the field and the value, and stores the value normalised (numpy scalars to Python
numbers, lists to tuples), which it also returns. `bool` is not accepted as a number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy

from .errors import ConfigError, ConfigTypeError


def fail(config: Any, name: str, value: Any, problem: str, hint: str | None = None, *, wrong_type=False):
    message = f"{type(config).__name__}.{name}={value!r}: {problem}"
    if hint:
        message += f" ({hint})"
    raise (ConfigTypeError if wrong_type else ConfigError)(message)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _range_text(low, high, open_low: bool, open_high: bool) -> str:
    if low is not None and high is not None:
        return f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if low is not None:
        return f"must be {'>' if open_low else '>='} {low}"
    return f"must be {'<' if open_high else '<='} {high}"


def _in_range(value, low, high, open_low: bool, open_high: bool) -> bool:
    if low is not None and (value <= low if open_low else value < low):
        return False
    if high is not None and (value >= high if open_high else value > high):
        return False
    return True


def _set(config: Any, name: str, value: Any) -> Any:
    setattr(config, name, value)
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _typed_value(
    config: Any, name: str, accept: Callable[[Any], bool], expected: str, optional: bool, hint: str | None
) -> Any:
    """`config.<name>` if `accept` takes it (None when it is None and `optional`); else ConfigTypeError saying
    it must be `expected` (plus " or None" when `optional`)."""
    value = getattr(config, name)
    if value is None and optional:
        return None
    if not accept(value):
        expected = f"{expected} or None" if optional else expected
        fail(config, name, value, f"must be {expected}, got {_type_name(value)}", hint, wrong_type=True)
    return value


def check_int(
    config: Any,
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    optional: bool = False,
    hint: str | None = None,
) -> int | None:
    """An int in [low, high] (either bound may be None); None too if `optional`."""
    value = _typed_value(config, name, is_int, "an int", optional, hint)
    if value is None:
        return None
    value = int(value)
    if not _in_range(value, low, high, False, False):
        fail(config, name, value, _range_text(low, high, False, False), hint)
    return _set(config, name, value)


def check_float(
    config: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    optional: bool = False,
    hint: str | None = None,
) -> float | None:
    """A finite number (ints accepted, stored as float) in the range given; `open_*` excludes that bound."""
    value = _typed_value(config, name, is_real, "a number", optional, hint)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        fail(config, name, value, "must be a finite number", hint)
    if not _in_range(value, low, high, open_low, open_high):
        fail(config, name, value, _range_text(low, high, open_low, open_high), hint)
    return _set(config, name, value)


def check_bool(config: Any, name: str, *, optional: bool = False, hint: str | None = None) -> bool | None:
    """True or False (numpy bools too); None too if `optional`."""
    value = getattr(config, name)
    if value is None and optional:
        return None
    if not isinstance(value, (bool, numpy.bool_)):
        expected = "True, False or None" if optional else "True or False"
        fail(config, name, value, f"must be {expected}, got {_type_name(value)}", hint, wrong_type=True)
    return _set(config, name, bool(value))


def check_choice(config: Any, name: str, choices: tuple, *, optional: bool = False, hint: str | None = None) -> Any:
    """One of `choices` (of the same type: 64.0 is not the group size 64); None too if `optional`."""
    value = getattr(config, name)
    if value is None and optional:
        return None
    for choice in choices:
        if isinstance(value, type(choice)) and not isinstance(value, bool) and value == choice:
            return _set(config, name, choice)
    listed = ", ".join(map(repr, choices)) + (" or None" if optional else "")
    wrong_type = not any(isinstance(value, type(c)) and not isinstance(value, bool) for c in choices)
    fail(config, name, value, f"choose one of {listed}", hint, wrong_type=wrong_type)


def check_callable(config: Any, name: str, *, optional: bool = False, hint: str | None = None) -> Callable | None:
    value = getattr(config, name)
    if value is None and optional:
        return None
    if not callable(value):
        fail(config, name, value, f"must be callable, got {_type_name(value)}", hint, wrong_type=True)
    return value


def _check_sequence(config: Any, name: str, value: Any, what: str, optional: bool, hint: str | None) -> tuple:
    if not isinstance(value, (tuple, list)):
        expected = f"a tuple of {what}" + (" or None" if optional else "")
        fail(config, name, value, f"must be {expected}, got {_type_name(value)}", hint, wrong_type=True)
    return tuple(value)


def check_int_tuple(config: Any, name: str, *, optional: bool = False, hint: str | None = None) -> tuple | None:
    """A tuple (or list) of ints, stored as a tuple."""
    value = getattr(config, name)
    if value is None and optional:
        return None
    items = _check_sequence(config, name, value, "ints", optional, hint)
    bad = [item for item in items if not is_int(item)]
    if bad:
        fail(config, name, value, f"items must be ints, got {_type_name(bad[0])} {bad[0]!r}", hint, wrong_type=True)
    return _set(config, name, tuple(int(item) for item in items))


def check_str_tuple(
    config: Any, name: str, *, choices: tuple | None = None, optional: bool = False, hint: str | None = None
) -> tuple | None:
    """A tuple (or list) of strings, each one of `choices` if given, stored as a tuple. A lone string is refused:
    it would be read as a tuple of its characters."""
    value = getattr(config, name)
    if value is None and optional:
        return None
    items = _check_sequence(config, name, value, "strings", optional, hint)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        fail(config, name, value, f"items must be strings, got {_type_name(bad[0])} {bad[0]!r}", hint, wrong_type=True)
    if choices is not None:
        unknown = [item for item in items if item not in choices]
        if unknown:
            fail(
                config,
                name,
                value,
                f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(map(repr, choices))}",
                hint,
            )
    return _set(config, name, items)


__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_float",
    "check_int",
    "check_int_tuple",
    "check_str_tuple",
    "fail",
    "is_int",
    "is_real",
]

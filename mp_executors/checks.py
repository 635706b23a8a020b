"""Checks of integer arguments, shared by every layer of the package.

One place for "is this a whole number of at least N", so that every argument
(`num_workers`, `threads_per_worker`, `max_retries`, a block size, ...) is
refused the same way: a `ValueError` naming the argument, the value, what it
must be and how to fix it. A bool is refused although it is an int
(`num_workers=True` is surely a mistake), a float even when whole (`2.0`).

It imports nothing from the package, so any layer (core, executors,
factories, planning, the CLI) may use it.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_int", "is_int"]


def is_int(value: Any, minimum: int = 1) -> bool:
    """Whether `value` is an integer (not a bool) >= `minimum`."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def check_int(name: str, value: Any, *, minimum: int = 1, fix: str = "") -> int:
    """`value` as an int if it is an integer (not a bool) >= `minimum`, else ValueError.

    The message reads "`name`=`value!r` is invalid: it must be a positive
    integer" (or "an integer >= `minimum`"), then "; `fix`" when given.
    """
    if not is_int(value, minimum):
        what = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name}={value!r} is invalid: it must be {what}" + (f"; {fix}" if fix else ""))
    return int(value)

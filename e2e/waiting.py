"""Polling until a condition holds: the one way tests and the cluster tool wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(fn: Callable[[], T], timeout: float = 30.0, interval: float = 0.25) -> T:
    """Call `fn` until it returns a truthy value without raising; return that value.

    An exception or a falsy result means "not yet". After `timeout` seconds an
    AssertionError carries the last result or error, so a failure says what was seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = fn()
            if result:
                return result
            last = f"returned {result!r}"
        except Exception as err:  # any failure of the probe means "not yet"
            last = f"raised {type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            name = getattr(fn, "__name__", repr(fn))
            raise AssertionError(f"{name} did not hold within {timeout:.0f}s; last it {last}")
        time.sleep(interval)

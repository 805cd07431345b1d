"""Waiting for a condition with a deadline, the only way tests and the demo wait (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time (an AssertionError, so pytest reports it as a failed check)."""


def wait_for(
    condition: Callable[[], T], what: str = "condition", timeout: float = 30.0, *, interval: float = 0.02
) -> T:
    """Call `condition` until it returns something truthy and return that; raise WaitTimeout after `timeout` seconds.

    The polling interval doubles up to 0.2 s: quick for in-process servers, gentle on a loaded machine.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)

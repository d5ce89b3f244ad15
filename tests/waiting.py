"""Polling with a deadline: tests wait for conditions, never sleep a fixed time and hope."""
from __future__ import annotations

import time


def wait_for(predicate, timeout=60.0, interval=0.02, what="condition"):
    """Poll until ``predicate()`` is truthy and return its value; fail after ``timeout`` seconds.

    The default deadline is generous on purpose: a passing test returns as soon as the condition holds, and
    the suite runs on parallel workers on a busy 2-core machine, where a thread or child may get no CPU for
    seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")

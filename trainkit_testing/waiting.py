"""Polling until a condition holds: the one "wait for it, up to a deadline" loop of the tests and benchmarks.

``wait_for(predicate, timeout_s, what)`` calls ``predicate`` every ``interval_s`` seconds and
returns its first truthy value; once ``timeout_s`` seconds have passed it raises ``error``
(``AssertionError`` by default: a test's expectation not met) naming ``what``. The
predicate is always called at least once, and once more at the deadline. The integration
tests, ``benchmarks/bench_elastic.py`` and the conformance harness
(``conformance.harness.wait_for``, which raises ``TimeoutError``) all poll with it.

Runs anywhere: the pytest process, a benchmark's driver, and inside training functions on
workers (the conformance cases wait for ``is_preempted()`` there). Standard library only.
"""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, *, interval_s: float = 0.05,
             error: type[BaseException] = AssertionError) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    >>> wait_for(lambda: 42, 1, "the answer")
    42
    >>> wait_for(lambda: None, 0.1, "nothing", error=TimeoutError)
    Traceback (most recent call last):
    TimeoutError: timed out after 0.1 s waiting for nothing
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)

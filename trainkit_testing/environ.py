"""Changes to ``os.environ`` that are undone afterwards.

A private Ray cluster or a moto server is configured through environment variables that
must be in ``os.environ`` *before* the processes that read them start (Ray's GCS, raylets
and workers inherit the environment of the process that starts them): a private
``RAY_TMPDIR``, fast health checks, the moto endpoint and fake AWS keys. ``Environ``
records the first value it overwrote for each variable so that ``restore()`` puts the
process back as it was. Runs in the process that starts the cluster or server (the
pytest process, the chaos driver). Standard library only.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional


class Environ:
    """Set and remove variables of ``os.environ``; ``restore()`` undoes every change made through it.

    >>> env = Environ()
    >>> env.set(TRAINKIT_PROGRESS="0")
    >>> env.pop("RAY_ADDRESS")
    >>> env.restore()  # both variables are back as they were
    """

    def __init__(self):
        self.saved: dict[str, Optional[str]] = {}  # variable -> its value before the first change (None: unset)

    def set(self, values: Optional[Mapping[str, str]] = None, /, **more: str) -> None:
        """Set ``values`` and ``more`` (``NAME=value``) in ``os.environ``."""
        for k, v in {**(values or {}), **more}.items():
            self.saved.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def pop(self, *keys: str) -> None:
        """Remove ``keys`` from ``os.environ`` (those that are not there are only remembered as unset)."""
        for k in keys:
            self.saved.setdefault(k, os.environ.get(k))
            os.environ.pop(k, None)

    def restore(self) -> None:
        """Put every variable changed through this object back as it was before the first change."""
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.saved.clear()

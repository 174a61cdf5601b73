"""The plugin's settings: one frozen value per test, parsed from options, ini keys and the marker.

Parsers raise ``trainkit.ConfigError`` (a ``ValueError``) naming the option or marker
keyword, the value seen and what is allowed; the plugin turns them into usage errors.
Pure logic, no Ray; runs in the pytest process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from trainkit.errors import ConfigError

MARKER_KEYS = ("workers", "nodes", "backend")


@dataclass(frozen=True)
class Settings:
    """What a test runs with: ranks per fit, virtual nodes, backend, hang timeout, keep passing runs."""

    workers: int = 2
    nodes: int = 2
    backend: str = "ray"
    hang_timeout_s: Optional[float] = None
    keep_runs: bool = False

    @property
    def local(self) -> bool:
        """The ``local`` backend runs one rank in the test process (``num_workers=0``)."""
        return self.backend == "local"


SETTINGS_KEY = pytest.StashKey[Settings]()  # config.stash: the session's settings
RUNS_KEY = pytest.StashKey[list]()  # item.stash: run folders (URIs) the test's fits wrote
FAILED_KEY = pytest.StashKey[bool]()  # item.stash: some phase of the test failed


def _int(value: Any, name: str, minimum: int, allowed: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(name, value, allowed)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(name, value, allowed) from None
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, allowed)
    return value


def parse_workers(value: Any, name: str = "--trainkit-workers") -> int:
    return _int(value, name, 1, "an int >= 1 (ranks per fit; use local_training for num_workers=0)")


def parse_nodes(value: Any, name: str = "--trainkit-nodes") -> int:
    return _int(value, name, 1, "an int >= 1 (virtual nodes of the fake Ray cluster)")


def parse_backend(value: Any, name: str = "--trainkit-backend") -> str:
    from trainkit.backends.api import available_backends

    known = sorted(available_backends())
    if not isinstance(value, str) or value.strip() not in known:
        raise ConfigError(name, value, "one of " + ", ".join(known),
                          hint="third-party backends register under the entry point group trainkit.backends")
    return value.strip()


def parse_hang_timeout(value: Any, name: str = "--trainkit-hang-timeout") -> Optional[float]:
    if value is None or (isinstance(value, str) and value.strip() in ("", "off", "none")):
        return None
    allowed = "a number of seconds > 0 (or empty / off for no hang detection)"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(name, value, allowed) from None
    if isinstance(value, bool) or not seconds > 0 or math.isinf(seconds):
        raise ConfigError(name, value, allowed)
    return seconds


def item_settings(item: pytest.Item) -> Settings:
    """The settings in force for one test: the session's, overridden by its ``trainkit`` marker."""
    base: Settings = item.config.stash[SETTINGS_KEY]
    marker = item.get_closest_marker("trainkit")
    if marker is None:
        return base
    if marker.args:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.trainkit takes keywords only "
                                f"({', '.join(MARKER_KEYS)}), got positional {marker.args!r}")
    unknown = set(marker.kwargs) - set(MARKER_KEYS)
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.trainkit got unknown keyword(s) {sorted(unknown)}; "
                                f"allowed: {', '.join(MARKER_KEYS)}")
    kw = marker.kwargs
    where = f"{item.nodeid}: @pytest.mark.trainkit"
    try:
        return Settings(
            workers=parse_workers(kw["workers"], f"{where}(workers=...)") if "workers" in kw else base.workers,
            nodes=parse_nodes(kw["nodes"], f"{where}(nodes=...)") if "nodes" in kw else base.nodes,
            backend=parse_backend(kw["backend"], f"{where}(backend=...)") if "backend" in kw else base.backend,
            hang_timeout_s=base.hang_timeout_s,
            keep_runs=base.keep_runs,
        )
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None

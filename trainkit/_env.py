"""Every ``TRAINKIT_*`` environment variable, declared once with its default.

Read only when configuration is resolved (``RunConfig``, ``HangConfig``, backends at
``fit()``), never deep inside constructors of internals. Runs in every process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    doc: str

    def get(self) -> str:
        return os.environ.get(self.name, self.default)

    def get_float(self) -> float | None:
        raw = self.get()
        if raw == "":
            return None
        try:
            return float(raw)
        except ValueError:
            from trainkit.errors import ConfigError

            raise ConfigError(self.name, raw, "a number of seconds") from None


STORAGE_PATH = EnvVar("TRAINKIT_STORAGE_PATH", "~/trainkit_results",
                      "default RunConfig.storage_path")
BACKEND = EnvVar("TRAINKIT_BACKEND", "ray", "backend used by fit() when num_workers >= 1")
HANG_TIMEOUT_S = EnvVar("TRAINKIT_HANG_TIMEOUT_S", "", "default HangConfig.timeout_s (empty: off)")
DEBUG_RANK = EnvVar("TRAINKIT_DEBUG_RANK", "", "world rank that waits for a debugger (debugpy)")
PROGRESS = EnvVar("TRAINKIT_PROGRESS", "auto", "driver progress line: auto (when a tty), 1, 0")
WORKER_START_TIMEOUT_S = EnvVar("TRAINKIT_WORKER_START_TIMEOUT_S", "60",
                                "how long fit() waits for min_workers to be placeable")
REPORT_CHANNEL = EnvVar("TRAINKIT_REPORT_CHANNEL", "tcp",
                        "how ranks reach the controller at report() and collectives: tcp (a direct "
                        "connection) or ray (actor calls)")
PREEMPTION_GRACE_S = EnvVar("TRAINKIT_PREEMPTION_GRACE_S", "0",
                            "grace period a SIGTERM preemption notice gives (0: unknown)")

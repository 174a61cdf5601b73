"""OOM: tell a worker killed for memory from a plain death, with its last memory samples.

A rank killed by the kernel's OOM killer dies of SIGKILL, which Ray reports like any other
death; one killed by Ray's memory monitor carries Ray's exit type ``NODE_OUT_OF_MEMORY``.
So while a training function runs, ``MemoryWatch`` (a daemon thread in the rank's process)
writes, every ``INTERVAL_S``, the process's resident memory (the last ``KEEP`` samples), its
memory limit (its cgroup's limit, or the node's memory), the cgroup's OOM-kill counter and
the node's total and available memory to ``<tmp>/trainkit-ranks/<pid>.mem.json``.

When a rank dies, ``oom_verdict(pid, death_message)`` runs on its node (the controller sends
it there): the death is an OOM when Ray says so, when the cgroup's OOM-kill counter rose
since the rank started, or when its last sample was within ``NEAR_LIMIT`` of its limit. The
verdict carries the samples and the node's memory, for the failure record and diagnose.

``MemoryWatch`` runs in the rank's process; ``oom_verdict`` on the rank's node.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Optional

from trainkit.diagnostics.claims import claims_dir

INTERVAL_S = 0.5
KEEP = 10
NEAR_LIMIT = 0.9  # a last sample at >= 90% of the limit, then SIGKILL: the kernel's OOM killer
RAY_OOM_MARKERS = ("NODE_OUT_OF_MEMORY", "OutOfMemoryError", "out of memory", "low on memory")


def _mem_path(pid: int) -> str:
    return os.path.join(claims_dir(), f"{pid}.mem.json")


def rss_bytes(pid: int | str = "self") -> Optional[int]:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def node_memory() -> dict:
    """``{"total": bytes, "available": bytes}`` of this machine (``/proc/meminfo``)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out["total" if key == "MemTotal" else "available"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def memory_cgroup(pid: int | str = "self") -> Optional[str]:
    """The folder of the process's memory cgroup (v1 ``memory`` or v2 unified), if mounted."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            path = os.path.join("/sys/fs/cgroup/memory", parts[2].lstrip("/"))
            return path if os.path.isdir(path) else None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":
            for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
                path = os.path.join(root, parts[2].lstrip("/"))
                if os.path.exists(os.path.join(path, "memory.max")):
                    return path
    return None


def cgroup_limit(path: Optional[str]) -> Optional[int]:
    for name in ("memory.limit_in_bytes", "memory.max"):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(path, name)) as f:
                text = f.read().strip()
            if text != "max" and int(text) < 1 << 60:
                return int(text)
    return None


def cgroup_oom_kills(path: Optional[str]) -> Optional[int]:
    """The cgroup's OOM-kill count (``oom_kill`` in v1 ``memory.oom_control`` or v2 ``memory.events``)."""
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
    return None


class MemoryWatch:
    """Samples this process's memory in a daemon thread while the block runs (best effort)."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self.path = _mem_path(os.getpid())
        self._stop = threading.Event()
        self._samples: list = []
        self._baseline: dict = {}  # cgroup folder -> OOM kills when first seen
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> None:
        cg = memory_cgroup()
        if cg is not None and cg not in self._baseline:
            self._baseline[cg] = cgroup_oom_kills(cg) or 0
        node = node_memory()
        rss = rss_bytes()
        if rss is not None:
            self._samples = (self._samples + [rss])[-KEEP:]
        doc = {"rss": self._samples, "cgroup": cg, "oom_kills_at_start": self._baseline.get(cg),
               "limit": cgroup_limit(cg) or node.get("total"), "node_total": node.get("total"),
               "node_available": node.get("available")}
        tmp = self.path + ".tmp"
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "MemoryWatch":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="trainkit-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self.interval_s)
        with contextlib.suppress(OSError):
            os.remove(self.path)


def oom_verdict(pid: int, death_message: str = "") -> Optional[dict]:
    """On the dead rank's node: ``{"reason", "rss_samples", "limit", "node_total", "node_available",
    "cgroup"}`` when ``pid`` died for memory, else None. Removes the rank's memory file."""
    doc: dict = {}
    with contextlib.suppress(OSError, ValueError):
        with open(_mem_path(pid)) as f:
            doc = json.load(f)
    with contextlib.suppress(OSError):
        os.remove(_mem_path(pid))
    record = {"rss_samples": doc.get("rss", []), "limit": doc.get("limit"), "cgroup": doc.get("cgroup"),
              "node_total": doc.get("node_total"), "node_available": node_memory().get("available")}
    if any(m in death_message for m in RAY_OOM_MARKERS):
        return {"reason": "Ray's memory monitor killed it (the node ran low on memory)", **record}
    if not doc:
        return None
    kills, before = cgroup_oom_kills(doc.get("cgroup")), doc.get("oom_kills_at_start")
    if kills is not None and before is not None and kills > before:
        return {"reason": f"the kernel's OOM killer killed it (its memory cgroup's limit, "
                          f"{_gib(doc.get('limit'))})", **record}
    rss, limit = (doc.get("rss") or [None])[-1], doc.get("limit")
    if rss and limit and rss >= NEAR_LIMIT * limit:
        return {"reason": f"it died at {_gib(rss)} of its {_gib(limit)} limit (the kernel's OOM killer)", **record}
    return None


def _gib(n: Optional[int]) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "an unknown amount"


def describe(verdict: dict) -> str:
    """One line for the failure record: why, and the last sample against the limit."""
    last = (verdict.get("rss_samples") or [None])[-1]
    return (f"killed for memory: {verdict['reason']}; last RSS sample {_gib(last)}, limit {_gib(verdict.get('limit'))}, "
            f"node {_gib(verdict.get('node_available'))} free of {_gib(verdict.get('node_total'))}")

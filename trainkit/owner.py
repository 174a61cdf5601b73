"""Who a run's owner is: the content of ``owner.json`` (``Owner``), this process as an owner, and
whether an owner is gone (``owner_gone``): on its own machine (same host name, boot and pid
namespace) when its pid is not running or is another process now (its start time
differs), anywhere when it was not renewed within its ``lease_s`` (``trainkit.lease.owner_gone``).

Pure but for ``/proc`` reads; used by ``trainkit.lease`` (the driver) and by readers that show
a dead driver's ``running`` run as aborted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import uuid
from typing import Optional

@dataclasses.dataclass(frozen=True)
class Owner:
    """The content of ``owner.json``: who owns the run, since when, and until when without a renewal."""

    host: str
    pid: int
    started: Optional[float]  # the process's start time (Unix s): tells a reused pid apart
    machine: str  # host name / boot id / pid namespace: where ``pid`` names this process
    token: str  # random, one per fit(): tells two leases of one process apart
    since: float
    renewed_at: float
    lease_s: float
    backend: str = ""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: Optional[bytes]) -> Optional["Owner"]:
        """The owner in ``data``; None for a missing or damaged file."""
        if data is None:
            return None
        try:
            d = json.loads(data)
            return cls(host=str(d["host"]), pid=int(d["pid"]), started=d.get("started"), machine=str(d["machine"]),
                       token=str(d["token"]), since=float(d["since"]), renewed_at=float(d["renewed_at"]),
                       lease_s=float(d["lease_s"]), backend=str(d.get("backend", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self, now: Optional[float] = None) -> str:
        """``pid 4242 on host-a (since 2026-12-02 01:11:06, lease renewed 3 s ago, lease_s=30)``."""
        age = max(0.0, (time.time() if now is None else now) - self.renewed_at)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} (since {since}, lease renewed {age:.0f} s ago, lease_s={self.lease_s:g})"


# -- this process and other processes --------------------------------------------------------------
def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


_machine_id: list = []


def machine() -> str:
    """Where a pid means one process: the host name, the boot (a reboot reuses pids) and the pid namespace
    (containers on one kernel that share a host name). Read once per process."""
    if not _machine_id:
        try:
            pidns = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            pidns = ""
        _machine_id.append(f"{socket.gethostname()}/{_read_text('/proc/sys/kernel/random/boot_id')}/{pidns}")
    return _machine_id[0]


def process_started(pid: int) -> Optional[float]:
    """When process ``pid`` started (Unix seconds, exact to a clock tick); None when no such process
    runs (a zombie has ended). ``-1.0`` when it runs but its start time cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name: field 3 (state) on
        if fields[0] in ("Z", "X"):
            return None
        return round(_boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)  # field 22: starttime
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        import psutil
    except ImportError:
        if os.name != "posix":
            return -1.0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:  # it exists, owned by someone else
            pass
        return -1.0
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else round(proc.create_time(), 2)
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return -1.0


_boot: list = []


def _boot_time() -> int:
    if not _boot:
        _boot.append(next(int(line.split()[1]) for line in _read_text("/proc/stat").splitlines()
                          if line.startswith("btime")))
    return _boot[0]


def this_owner(lease_s: float, backend: str) -> Owner:
    now = time.time()
    started = process_started(os.getpid())
    return Owner(host=socket.gethostname(), pid=os.getpid(), started=started if started and started > 0 else None,
                 machine=machine(), token=uuid.uuid4().hex, since=now, renewed_at=now, lease_s=lease_s,
                 backend=backend)

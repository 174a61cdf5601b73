"""Capture a process's Python stacks: ``py-spy dump --pid``, or faulthandler on a signal.

* ``install_signal_dump()`` runs in each rank's worker process (``RankWorker``): it
  registers ``faulthandler`` on ``SIGUSR2``, appending all threads' stacks to
  ``<tmp>/trainkit-stacks-<pid>.txt``. This works even while the rank's thread is blocked
  in C code (gloo), because faulthandler's handler is written in C.
* ``dump_local(pid, mode)`` runs on the rank's node: py-spy first (``--full-filenames``,
  ``--subprocesses`` so DataLoader workers show too), falling back to the signal where
  py-spy is missing or not permitted (``mode="auto"``).
* ``capture(targets, mode)`` runs in the controller: it dumps many ranks at once, one
  thread per process on the controller's own node and one Ray task per other node,
  pinned there (``NodeAffinitySchedulingStrategy``, ``num_cpus=0``).

Each dump is a dict ``{"text", "method", "error", "alive", "dump_s"}``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

DUMP_SIGNAL = signal.SIGUSR2
PYSPY_TIMEOUT_S = 5.0
_signal_file = None  # kept open for faulthandler (it writes to the file descriptor)


def signal_dump_path(pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"trainkit-stacks-{pid}.txt")


def install_signal_dump() -> Optional[str]:
    """Register faulthandler for ``SIGUSR2`` in this process (idempotent). Returns the dump file."""
    global _signal_file
    if _signal_file is not None:
        return _signal_file.name
    path = signal_dump_path(os.getpid())
    try:
        f = open(path, "a")
        faulthandler.register(DUMP_SIGNAL, file=f, all_threads=True, chain=False)
    except (OSError, RuntimeError, ValueError):
        return None
    _signal_file = f
    return path


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return True


def pyspy_available() -> bool:
    return shutil.which("py-spy") is not None


def _pyspy(pid: int, subprocesses: bool, timeout_s: float) -> tuple[str, str]:
    exe = shutil.which("py-spy")
    if exe is None:
        return "", "py-spy is not installed"
    cmd = [exe, "dump", "--pid", str(pid), "--full-filenames"]
    if subprocesses:
        cmd.append("--subprocesses")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "", f"py-spy timed out after {timeout_s:.0f} s"
    except OSError as e:
        return "", f"py-spy could not run: {e}"
    if out.returncode != 0 or "Thread" not in out.stdout:
        err = (out.stderr or out.stdout).strip().splitlines()
        return "", f"py-spy failed (exit {out.returncode}): {err[-1] if err else 'no output'}"
    return out.stdout, ""


def _faulthandler(pid: int, timeout_s: float) -> tuple[str, str]:
    path = signal_dump_path(pid)
    try:
        start = os.path.getsize(path)
    except OSError:
        return "", f"no faulthandler dump file {path}: the process did not register one"
    try:
        os.kill(pid, DUMP_SIGNAL)
    except OSError as e:
        return "", f"cannot signal pid {pid}: {e}"
    deadline = time.monotonic() + timeout_s
    size, stable_since = start, None
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = os.path.getsize(path)
        if now != size:
            size, stable_since = now, time.monotonic()
        elif size > start and stable_since is not None and time.monotonic() - stable_since > 0.05:
            break
    if size <= start:
        return "", f"faulthandler wrote nothing within {timeout_s:.1f} s"
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size - start).decode("utf-8", errors="replace"), ""


def dump_local(pid: int, mode: str = "auto", *, subprocesses: bool = True,
               timeout_s: float = PYSPY_TIMEOUT_S) -> dict:
    """Dump the stacks of ``pid`` on this machine.

    ``mode``: ``"py-spy"``, ``"faulthandler"``, or ``"auto"`` (py-spy, else faulthandler).

    >>> dump_local(os.getpid(), "py-spy")["method"]  # doctest: +SKIP
    'py-spy'
    """
    t0 = time.monotonic()
    if not pid_alive(pid):
        return {"text": "", "method": "none", "error": f"process {pid} is gone", "alive": False,
                "dump_s": round(time.monotonic() - t0, 4)}
    errors = []
    text = ""
    method = "none"
    if mode in ("auto", "py-spy"):
        text, err = _pyspy(pid, subprocesses, timeout_s)
        method = "py-spy"
        if err:
            errors.append(err)
    if not text and mode in ("auto", "faulthandler"):
        text, err = _faulthandler(pid, min(timeout_s, 2.0))
        method = "faulthandler"
        if err:
            errors.append(err)
    alive = pid_alive(pid)
    return {"text": text, "method": method if text else "none", "error": "; ".join(errors) if not text else
            "; ".join(errors), "alive": alive, "dump_s": round(time.monotonic() - t0, 4)}


def dump_many(pids: list, mode: str = "auto") -> list[dict]:
    """Dump several processes of this machine in parallel (one thread each)."""
    if not pids:
        return []
    with ThreadPoolExecutor(max_workers=min(len(pids), 16)) as pool:
        return list(pool.map(lambda p: dump_local(int(p), mode), pids))


def sample_local(pid: int, duration_s: float = 1.0, interval_s: float = 0.05) -> dict:
    """Dump ``pid`` again and again for about ``duration_s`` (a straggler's sample, py-spy only):
    ``{"texts": [dump, ...], "error", "alive"}``."""
    texts, errors = [], []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        d = dump_local(pid, "py-spy", subprocesses=False, timeout_s=min(PYSPY_TIMEOUT_S, duration_s + 1))
        if d["text"]:
            texts.append(d["text"])
        elif d["error"] and d["error"] not in errors:
            errors.append(d["error"])
        if not d["alive"]:
            break
        time.sleep(interval_s)
    return {"texts": texts, "error": "; ".join(errors) if not texts else "", "alive": pid_alive(pid)}


_remote_fns: dict = {}


def _remote(fn=None):
    """``fn`` (``dump_many`` by default) as a Ray task that takes no CPU and is never retried."""
    import ray

    fn = fn or dump_many
    if fn not in _remote_fns:
        _remote_fns[fn] = ray.remote(num_cpus=0, max_retries=0)(fn)
    return _remote_fns[fn]


_HOST: Optional[str] = None


def host_id() -> str:
    """This machine as its processes see it: hostname and boot id. The Ray nodes of a fake cluster
    share one machine, so a file or a pid on one of them is this process's file or pid too."""
    global _HOST
    if _HOST is None:
        import socket

        boot = ""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            pass
        _HOST = f"{socket.gethostname()}/{boot}"
    return _HOST


async def on_node(node_id: str, fn, *args, timeout_s: float = 10.0, host: Optional[str] = None):
    """``fn(*args)`` on the node ``node_id``: in a thread when it is the caller's node or on the
    caller's machine (``host``: the node's ``host_id()``), else as a Ray task pinned there (a
    worker process start on that node, 0.5 s on 2 cores). Runs in the controller (inside Ray)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not node_id or node_id == ray.get_runtime_context().get_node_id() or (host and host == host_id()):
        job = asyncio.to_thread(fn, *args)
    else:
        job = _await_ref(_remote(fn).options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id, soft=False)).remote(*args))
    return await asyncio.wait_for(job, timeout_s)


async def capture(targets: list, mode: str = "auto", *, timeout_s: float = 10.0) -> dict:
    """Dump ``targets`` = [(key, node_id, pid), ...] in parallel. Returns key -> dump dict.

    Processes on the caller's node are dumped from here; each other node gets one Ray task
    pinned to it. Runs in the controller (inside Ray).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    by_node: dict[str, list] = {}
    for key, node, pid in targets:
        by_node.setdefault(node or here, []).append((key, pid))
    jobs, keys = [], []
    for node, items in by_node.items():
        pids = [p for _, p in items]
        if node == here:
            jobs.append(asyncio.to_thread(dump_many, pids, mode))
        else:
            ref = _remote().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                                    ).remote(pids, mode)
            jobs.append(_await_ref(ref))
        keys.append([k for k, _ in items])
    results = await asyncio.gather(*[asyncio.wait_for(j, timeout_s) for j in jobs], return_exceptions=True)
    out = {}
    for ks, res in zip(keys, results):
        for i, k in enumerate(ks):
            if isinstance(res, BaseException):
                out[k] = {"text": "", "method": "none", "error": f"dump failed: {type(res).__name__}: {res}",
                          "alive": True, "dump_s": None}
            else:
                out[k] = res[i]
    return out


async def _await_ref(ref):
    return await ref

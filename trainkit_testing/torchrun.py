"""Launching ``torchrun`` (and other subprocesses that start ranks) from a test, and killing all of it on a timeout.

``torchrun_command(script, *args)`` is ``python -m torch.distributed.run --nproc-per-node=2
--master-addr=127.0.0.1 --master-port=<a free port> script args...`` (``max_restarts=N`` adds
``--max-restarts=N``); ``launch_env(...)`` is this process's environment without the
variables a rank of an enclosing launch would carry (``RANK``, ``MASTER_PORT``, ...), with
one OpenMP thread and unbuffered output; ``run_process_group(cmd, ...)`` runs the command in
a session of its own and waits for it, so that on a timeout SIGKILL reaches the ranks too,
not only the launcher, and ``subprocess.TimeoutExpired`` is raised with what it printed.

Runs in the pytest process. Standard library only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Optional, Sequence

# What a rank of an enclosing torchrun (or a test run under one) has set, that a new launch must not inherit.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master-port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: str, max_restarts: Optional[int] = None) -> list[str]:
    """``torchrun --nproc-per-node=2`` on 127.0.0.1 and a free port, for ``args`` (the script and its arguments)."""
    restarts = [] if max_restarts is None else [f"--max-restarts={max_restarts}"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", *restarts,
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]


def launch_env(unset: Sequence[str] = (), **env: str) -> dict[str, str]:
    """``os.environ`` with ``OMP_NUM_THREADS=1`` and ``PYTHONUNBUFFERED=1``, without ``RANK_ENV`` and
    ``unset``, and with ``env`` on top."""
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in (*RANK_ENV, *unset):
        full.pop(var, None)
    full.update(env)
    return full


def run_process_group(cmd: Sequence[str], *, cwd, env: dict[str, str], timeout_s: float,
                      stderr: int = subprocess.STDOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session (process group) with text output, stdout captured and
    stderr merged into it (``stderr=subprocess.PIPE``: captured apart). Past ``timeout_s`` the
    whole group is SIGKILLed and ``subprocess.TimeoutExpired`` is raised, its ``output`` (and
    ``stderr``) what the processes had printed."""
    # Own process group, so a timeout kills the ranks too, not only the torchrun launcher.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd,
                          start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            os.killpg(popen.pid, signal.SIGKILL)
            e.output, e.stderr = popen.communicate()
            raise
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)

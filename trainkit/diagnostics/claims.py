"""Rank claims: each rank process says which run it belongs to, so that ``diagnose --live``
touches only that run's processes.

While a training function runs, its process keeps a small file
``<tmp>/trainkit-ranks/<pid>.json`` (``{"run", "world_rank", "attempt", "started"}``;
``started`` is the process's start time, ``trainkit.owner.process_started``, so that a
reused pid does not inherit a claim). ``check(pid, run_uri)`` is what ``diagnose --live`` asks before it
dumps a pid taken from a run folder's events: a pid without a claim, with a claim for
another run, or whose start time differs is refused with the reason. An ``events.jsonl``
that names any pid therefore cannot make trainkit run py-spy on a process outside the run.

The claim is written by ``trainkit.backends.api.install_session`` (every backend) in the
rank's process; ``check`` runs in the shell process of ``trainkit diagnose``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Iterator, Optional

from trainkit.owner import process_started


def claims_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "trainkit-ranks")


def _claim_path(pid: int) -> str:
    return os.path.join(claims_dir(), f"{pid}.json")


@contextlib.contextmanager
def claim(run_uri: str, world_rank: int, attempt: int) -> Iterator[None]:
    """Claim this process for ``run_uri`` for the block (best effort: a claim that cannot be
    written only means ``diagnose --live`` will refuse to dump this rank)."""
    pid = os.getpid()
    path = _claim_path(pid)
    try:
        os.makedirs(claims_dir(), exist_ok=True)
        sweep()
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"run": run_uri, "world_rank": world_rank, "attempt": attempt, "started": process_started(pid)}, f)
        os.replace(tmp, path)
        written = True
    except OSError:
        written = False
    try:
        yield
    finally:
        if written:
            with contextlib.suppress(OSError):
                os.remove(path)


SWEEP_AFTER_S = 60.0  # a gone process's files are kept this long (the controller reads a dead rank's memory file)


def sweep() -> None:
    """Remove the claim and memory files of processes gone for a while (killed ranks leave theirs)."""
    try:
        names = os.listdir(claims_dir())
    except OSError:
        return
    now = time.time()
    for name in names:
        pid = name.split(".", 1)[0]
        path = os.path.join(claims_dir(), name)
        with contextlib.suppress(OSError):
            if pid.isdigit() and process_started(int(pid)) is None and now - os.path.getmtime(path) > SWEEP_AFTER_S:
                os.remove(path)


def check(pid: int, run_uri: str) -> Optional[str]:
    """None when ``pid`` is a live rank of ``run_uri``; otherwise why it is refused."""
    try:
        with open(_claim_path(pid)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return f"pid {pid} is not a rank of this run (it holds no trainkit rank claim)"
    except (OSError, ValueError) as e:
        return f"pid {pid}: its rank claim cannot be read ({type(e).__name__})"
    if not isinstance(doc, dict) or doc.get("run") != run_uri:
        return f"pid {pid} is a rank of another run ({doc.get('run') if isinstance(doc, dict) else '?'})"
    started = process_started(pid)
    if started is None:
        return f"pid {pid} is gone"
    if doc.get("started") != started:
        return f"pid {pid} was reused by another process since the rank claimed it"
    return None

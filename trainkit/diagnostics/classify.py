"""What a stack dump says about a rank: where it is stuck, and the user's innermost frame.

Parses the two formats trainkit captures (``py-spy dump`` text, innermost frame first,
and ``faulthandler`` text, also innermost first) into processes, threads and frames,
picks the rank's training thread (the one running ``RankWorker.run``) and classifies it:

    user_code     the innermost frame that decides is the user's own code
    collective    inside ``torch.distributed`` (all_reduce, barrier, ...)
    data_loading  inside ``torch.utils.data`` (a DataLoader waiting for its workers)
    report        inside trainkit's ``report()`` / barrier, not arrived at this index
    dead          the process is gone
    unknown       no stack (dump failed) or no frame to go by

The user frame is the innermost frame outside trainkit, torch, Ray, site-packages and
the standard library, written ``function (file:line)`` with the file's base name.
Pure functions, no I/O; runs wherever a dump is read (controller, diagnose).
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Optional

CLASSIFICATIONS = ("user_code", "collective", "data_loading", "report", "dead", "unknown")

DESCRIPTIONS = {
    "user_code": "in user code",
    "collective": "in a torch.distributed collective",
    "data_loading": "in data loading",
    "report": "in report() of another index",
    "dead": "dead (its process is gone)",
    "unknown": "stack unavailable",
    "waiting": "waiting at the barrier",
}


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int

    def short(self) -> str:
        return f"{self.function} ({os.path.basename(self.file)}:{self.line})"


@dataclass
class Thread:
    name: str
    ident: str
    frames: list = field(default_factory=list)  # innermost first


@dataclass
class Process:
    pid: Optional[int]
    threads: list = field(default_factory=list)
    parent: Optional[int] = None


@dataclass(frozen=True)
class Classification:
    classification: str
    user_frame: Optional[str] = None  # "function (file.py:12)"
    user_file: Optional[str] = None  # full path of that frame's file
    user_line: Optional[int] = None
    thread: str = ""
    subprocesses: tuple = ()  # ({"pid", "classification", "user_frame"}, ...)

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.classification, self.classification)

    def to_dict(self) -> dict:
        return {"classification": self.classification, "description": self.description,
                "user_frame": self.user_frame, "user_file": self.user_file, "user_line": self.user_line,
                "thread": self.thread, "subprocesses": list(self.subprocesses)}


# -- parsing --------------------------------------------------------------------------------------
_PYSPY_PROCESS = re.compile(r"^Process (\d+): ")
_PYSPY_PARENT = re.compile(r"^Parent Process (\d+): ")
_PYSPY_THREAD = re.compile(r'^Thread (\S+) \(([^)]*)\)(?:: "(.*)")?\s*$')
_PYSPY_FRAME = re.compile(r"^\s{4}(.+) \((.+):(\d+)\)\s*$")
_FH_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+)(?: \[(.*)\])? \(most recent call first\):")
_FH_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (.+)$')


def parse_dump(text: str) -> list[Process]:
    """Processes -> threads -> frames (innermost first) from py-spy or faulthandler text."""
    procs: list[Process] = []
    proc: Optional[Process] = None
    thread: Optional[Thread] = None
    for raw in (text or "").splitlines():
        m = _PYSPY_PROCESS.match(raw)
        if m:
            proc = Process(int(m.group(1)))
            procs.append(proc)
            thread = None
            continue
        m = _PYSPY_PARENT.match(raw)
        if m and proc is not None:
            proc.parent = int(m.group(1))
            continue
        m = _PYSPY_THREAD.match(raw) if not raw.startswith("Thread 0x") or "(most recent" not in raw else None
        if m:
            if proc is None:
                proc = Process(None)
                procs.append(proc)
            thread = Thread(name=m.group(3) or "", ident=m.group(1))
            proc.threads.append(thread)
            continue
        m = _FH_THREAD.match(raw)
        if m:
            if proc is None:
                proc = Process(None)
                procs.append(proc)
            thread = Thread(name=m.group(3) or ("current" if m.group(1) == "Current thread" else ""),
                            ident=m.group(2))
            proc.threads.append(thread)
            continue
        if thread is None:
            continue
        m = _PYSPY_FRAME.match(raw)
        if m and not raw.startswith("        "):  # deeper indentation: py-spy --locals lines
            thread.frames.append(Frame(m.group(1), m.group(2), int(m.group(3))))
            continue
        m = _FH_FRAME.match(raw)
        if m:
            thread.frames.append(Frame(m.group(3), m.group(1), int(m.group(2))))
    return procs


# -- frame kinds ----------------------------------------------------------------------------------
_TRAINKIT_PKGS = ("trainkit", "trainkit_testing", "fault_injection")
_LIB_PKGS = ("torch", "ray", "cloudpickle", "numpy", "debugpy", "_pytest", "pluggy")
_STDLIB_DIRS = tuple({os.path.normpath(p) + os.sep for p in (sysconfig.get_paths().get("stdlib"),
                                                           sysconfig.get_paths().get("platstdlib")) if p})


def _parts(path: str) -> list[str]:
    return path.replace("\\", "/").split("/")


def _package(path: str) -> Optional[str]:
    """The top-level package of a library frame, or None for a user frame."""
    if path.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return "<internal>"
    parts = _parts(path)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            return parts[i + 1].removesuffix(".py") if i + 1 < len(parts) else marker
    for d in _STDLIB_DIRS:
        if path.startswith(d):
            return "stdlib"
    if re.search(r"/lib/python3\.\d+/", path):
        return "stdlib"
    for pkg in _TRAINKIT_PKGS + ("torch", "ray"):
        # a source checkout: <repo>/trainkit/session.py; the package folder has an __init__ sibling
        if pkg in parts[:-1]:
            return pkg
    if len(parts) == 1:  # a bare "threading.py" (py-spy without --full-filenames)
        name = parts[0].removesuffix(".py")
        if name in getattr(sys, "stdlib_module_names", ()):
            return "stdlib"
    elif parts[0] in getattr(sys, "stdlib_module_names", ()) and not path.startswith("/"):
        return "stdlib"
    elif parts[0] in _LIB_PKGS + _TRAINKIT_PKGS and not path.startswith("/"):
        return parts[0]
    return None


def is_user_frame(frame: Frame) -> bool:
    """True for the user's own code: not trainkit, torch, Ray, site-packages or the standard library."""
    return _package(frame.file) is None


def _frame_kind(frame: Frame) -> Optional[str]:
    p = "/" + frame.file.replace("\\", "/")
    if "/torch/utils/data/" in p:
        return "data_loading"
    if "/torch/distributed/" in p:
        return "collective"
    if _package(frame.file) == "trainkit" and (p.endswith("/trainkit/session.py") and frame.function.split(".")[-1] in (
            "report", "collective")
            or p.endswith("/trainkit/collective.py")):
        return "report"
    return None


def _is_training_thread(t: Thread) -> bool:
    return any(f.file.replace("\\", "/").endswith("trainkit/backends/ray/worker.py")
               and f.function.split(".")[-1] == "run" for f in t.frames)


def training_thread(proc: Process) -> Optional[Thread]:
    """The thread running the training function: under ``RankWorker.run``, else the one with user frames."""
    for t in proc.threads:
        if _is_training_thread(t):
            return t
    for t in proc.threads:
        if any(is_user_frame(f) for f in t.frames):
            return t
    return proc.threads[0] if proc.threads else None


def classify_thread(frames: list) -> tuple[str, Optional[Frame]]:
    """(classification, innermost user frame) for one thread's frames, innermost first."""
    user = next((f for f in frames if is_user_frame(f)), None)
    for f in frames:
        kind = _frame_kind(f)
        if kind:
            return kind, user
    if user is not None:
        return "user_code", user
    return "unknown", None


def classify_dump(text: str, *, alive: bool = True) -> Classification:
    """Classify a rank from its dump (py-spy or faulthandler).

    >>> classify_dump('Thread 7 (idle): "t"\\n    stuck (/home/u/train.py:12)\\n').user_frame
    'stuck (train.py:12)'
    """
    if not alive:
        return Classification("dead")
    procs = parse_dump(text)
    if not procs:
        return Classification("unknown")
    main = procs[0]
    t = training_thread(main)
    if t is None:
        return Classification("unknown")
    kind, user = classify_thread(t.frames)
    subs = []
    for p in procs[1:]:
        st = training_thread(p)
        if st is None:
            continue
        sk, su = classify_thread(st.frames)
        subs.append({"pid": p.pid, "classification": sk, "user_frame": su.short() if su else None})
    return Classification(kind, user.short() if user else None, user.file if user else None,
                          user.line if user else None, t.name or t.ident, tuple(subs))


def describe(classification: str) -> str:
    return DESCRIPTIONS.get(classification, classification)

"""The one event stream: everything that happens in a run, as ``events.jsonl``.

Each event is a frozen, JSON-serialisable dataclass with a ``type`` tag. The controller
(or the local runner) writes them; ``trainkit diagnose``, chaos verdicts, the pytest
plugin and ``Result.from_path`` read them. Readers tolerate a damaged or truncated
file: they stop at the first unreadable line and say which.

Runs wherever a run is coordinated (driver for local mode, controller actor, rank 0
under torchrun); readers run anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional

_REGISTRY: dict[str, type["Event"]] = {}


def _event(tag: str):
    def wrap(cls):
        cls.type = tag
        _REGISTRY[tag] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        d = {"type": self.type}
        d.update(asdict(self))
        return json.dumps(jsonable(d), sort_keys=False)


@_event("run_started")
@dataclass(frozen=True)
class RunStarted(Event):
    name: str = ""
    path: str = ""
    backend: str = ""
    num_workers: Any = None
    resumed_from_index: Optional[int] = None


@_event("attempt_started")
@dataclass(frozen=True)
class AttemptStarted(Event):
    attempt: int = 0
    world_size: int = 0
    # one entry per rank: {"world_rank", "local_rank", "node_rank", "node_id", "pid"}
    ranks: tuple = ()
    start_index: int = 0  # report index of the checkpoint the attempt resumes from (0: none)


@_event("report_committed")
@dataclass(frozen=True)
class ReportCommitted(Event):
    attempt: int = 0
    index: int = 0
    metrics: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None
    world_size: int = 0
    barrier_s: float = 0.0  # first arrival to commit


@_event("worker_failed")
@dataclass(frozen=True)
class WorkerFailed(Event):
    attempt: int = 0
    failures: tuple = ()  # WorkerFailure.to_dict(), root cause first
    kind: str = "failure"  # failure | preemption | hang
    will_retry: bool = False


@_event("group_restarted")
@dataclass(frozen=True)
class GroupRestarted(Event):
    attempt: int = 0  # the new attempt
    reason: str = ""
    from_index: int = 0


@_event("resized")
@dataclass(frozen=True)
class Resized(Event):
    attempt: int = 0
    old_world_size: int = 0
    new_world_size: int = 0
    reason: str = ""


@_event("preempted")
@dataclass(frozen=True)
class Preempted(Event):
    attempt: int = 0
    world_ranks: tuple = ()
    node_id: str = ""
    grace_s: float = 0.0


@_event("hang_detected")
@dataclass(frozen=True)
class HangDetected(Event):
    attempt: int = 0
    index: int = 0
    missing_ranks: tuple = ()
    waited_s: float = 0.0
    summary: str = ""
    diagnostics: str = ""  # folder under diagnostics/
    ranks: tuple = ()  # per rank: {"world_rank", "state", "classification", "user_frame"}


@_event("fault_injected")
@dataclass(frozen=True)
class FaultInjected(Event):
    attempt: int = 0
    action: str = ""
    world_rank: Optional[int] = None
    node: Optional[int] = None
    index: Optional[int] = None
    detail: dict = field(default_factory=dict)


@_event("debugger_listening")
@dataclass(frozen=True)
class DebuggerListening(Event):
    attempt: int = 0
    world_rank: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    reason: str = ""


@_event("run_finished")
@dataclass(frozen=True)
class RunFinished(Event):
    status: str = "finished"  # finished | failed | aborted
    error: Optional[dict] = None
    attempts: int = 1
    last_index: int = 0


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars become numbers, NaN/inf stay (as Python's json writes them)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return repr(obj)


def parse_event(line: str) -> Event:
    d = json.loads(line)
    cls = _REGISTRY.get(d.pop("type", None))
    if cls is None:
        raise ValueError("unknown event type")
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in names:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


@dataclass
class EventsRead:
    events: list
    bad_line: Optional[int] = None  # 1-based line where reading stopped
    problem: str = ""


def parse_events(data: bytes | str | None) -> EventsRead:
    """Parse an ``events.jsonl`` text up to its last complete, valid line."""
    if data is None:
        return EventsRead([], None, "events.jsonl is missing")
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    events = []
    lines = text.split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(parse_event(line))
        except (ValueError, TypeError) as e:
            truncated = i == len(lines)  # last line without newline
            why = "truncated" if truncated else f"unreadable ({type(e).__name__}: {e})"
            return EventsRead(events, i, f"events.jsonl line {i} is {why}; read {len(events)} events before it")
    return EventsRead(events)


class EventLog:
    """Appends events to ``events.jsonl`` of a run store; keeps them in memory too.

    On object stores (no append) writes are buffered and the whole file is rewritten
    at ``flush()``, which the ledger calls at commits and status changes.
    """

    def __init__(self, store, existing: list | None = None):
        self._store = store
        self.events: list[Event] = list(existing or [])
        self._pending: list[str] = []
        self._listeners: list = []

    def subscribe(self, fn) -> None:
        self._listeners.append(fn)

    def emit(self, event: Event, flush: bool = False) -> Event:
        self.events.append(event)
        self._pending.append(event.to_json() + "\n")
        for fn in self._listeners:
            fn(event)
        if self._store.local or flush:
            self.flush()
        return event

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._store.append_text("events.jsonl", text)

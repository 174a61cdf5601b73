"""The one event stream: everything that happens in a run, as ``events.jsonl``.

Each event is a frozen, JSON-serialisable dataclass with a ``type`` tag. The controller
(or the local runner) writes them; ``trainkit diagnose``, chaos verdicts, the pytest
plugin and ``Result.from_path`` read them. Readers tolerate a damaged or truncated
file: a torn line (an interrupted write: it starts like an event and is cut off) is
skipped and reading goes on; any other unreadable line stops reading there; either is
said, with the line. The writer never continues a torn line: a file that does not end
with a newline gets one first.

Runs wherever a run is coordinated (driver for local mode, controller actor, rank 0
under torchrun); readers run anywhere.
"""

from __future__ import annotations

import json
import os
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

    def to_dict(self) -> dict:
        """The event as the JSON object ``events.jsonl`` holds for it."""
        d = {"type": self.type}
        d.update(asdict(self))
        return jsonable(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


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
    step_s: tuple = ()  # per world rank: previous release (or attempt start) to its arrival here


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


@_event("straggler_detected")
@dataclass(frozen=True)
class StragglerDetected(Event):
    attempt: int = 0
    index: int = 0  # the report at which it was named
    world_rank: int = 0
    node_id: str = ""
    median_step_s: float = 0.0  # its step time over the reports that named it
    others_median_step_s: float = 0.0  # the other ranks' step time over the same reports
    classification: str = ""  # data_loading | compute | collective | checkpoint_io | user_code | unknown
    user_frame: Optional[str] = None
    samples: int = 0  # stack samples taken (about 1 s of py-spy dumps)
    frames: dict = field(default_factory=dict)  # "function (file:line)" -> samples it was in (top ones)
    error: str = ""  # why no sample could be taken


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


@_event("spare_ready")
@dataclass(frozen=True)
class SpareReady(Event):
    """A hot spare (``RunConfig(spare_workers=N)``) was started: placed, torch imported, waiting."""

    node_id: str = ""
    pid: Optional[int] = None
    ready: int = 0  # spares ready now, this one included
    wanted: int = 0  # RunConfig.spare_workers
    start_s: float = 0.0  # from its start to ready
    warm: bool = False  # started for an earlier fit of a warm group this run took
    regrow: bool = False  # in the slot of a rank an elastic group re-formed without: the group grows with it


@_event("spare_used")
@dataclass(frozen=True)
class SpareUsed(Event):
    """A hot spare took the place of a dead or stuck rank's process; the group re-forms with it."""

    attempt: int = 0  # the attempt that failed
    replaced_pid: Optional[int] = None
    replaced_node_id: str = ""
    pid: Optional[int] = None
    node_id: str = ""
    ready: int = 0  # spares still ready after this one was taken


@_event("spare_unplaced")
@dataclass(frozen=True)
class SpareUnplaced(Event):
    """A hot spare could not be placed or started; the run goes on without it."""

    ready: int = 0
    wanted: int = 0
    waited_s: float = 0.0
    reason: str = ""
    gave_up: bool = False  # False: still waiting for room in the background
    regrow: bool = False  # the slot of a rank an elastic group re-formed without (waits with no deadline)


@_event("checkpoint_skipped")
@dataclass(frozen=True)
class CheckpointSkipped(Event):
    """A committed checkpoint was found damaged or missing and not handed out."""

    dir: str = ""  # its folder in the run folder
    index: int = 0  # the report index that committed it
    problem: str = ""  # what is wrong: "its folder is missing", "model.pt is missing", ...
    fallback: Optional[str] = None  # the checkpoint used instead (None: no intact one is left)


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
    skipped: tuple = ()  # 1-based torn lines skipped (reading went on after them)


_EVENT_START = '{"type"'  # how every line the writer writes begins


def parse_events(data: bytes | str | None) -> EventsRead:
    """Parse an ``events.jsonl`` text up to its last complete, valid line.

    A torn line in the middle (an interrupted append, made a line of its own by the next writer's
    newline) is skipped and the rest is read; any other unreadable line stops reading there."""
    if data is None:
        return EventsRead([], None, "events.jsonl is missing")
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    events = []
    skipped: list[int] = []
    lines = text.split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(parse_event(line))
        except (ValueError, TypeError) as e:
            truncated = i == len(lines)  # last line without newline
            if not truncated and isinstance(e, json.JSONDecodeError) and line.startswith(_EVENT_START):
                skipped.append(i)
                continue
            why = "truncated" if truncated else f"unreadable ({type(e).__name__}: {e})"
            problem = f"events.jsonl line {i} is {why}; read {len(events)} events before it"
            if skipped:
                problem += f" ({_torn(skipped)})"
            return EventsRead(events, i, problem, tuple(skipped))
    if skipped:
        return EventsRead(events, None, f"events.jsonl {_torn(skipped)}; read {len(events)} events",
                          tuple(skipped))
    return EventsRead(events)


def read_run(run_path: "str | os.PathLike") -> list[Event]:
    """The events of the local run folder ``run_path``, read as ``parse_events`` reads them (a torn
    line skipped, reading stopped at a truncated or unreadable one); none when there is no file."""
    try:
        with open(os.path.join(run_path, "events.jsonl"), "rb") as f:
            return parse_events(f.read()).events
    except FileNotFoundError:
        return []


def read_run_dicts(run_path: "str | os.PathLike") -> list[dict]:
    """``read_run`` as the JSON objects the file holds (``{"type": "report_committed", ...}``)."""
    return [e.to_dict() for e in read_run(run_path)]


def _torn(lines: list[int]) -> str:
    where = f"line {lines[0]}" if len(lines) == 1 else f"lines {', '.join(map(str, lines))}"
    return f"{where} torn by an interrupted write, skipped"


class EventLog:
    """Appends events to ``events.jsonl`` of a run store; keeps them in memory too.

    On object stores (no append) writes are buffered and the whole file is rewritten
    at ``flush()``, which the ledger calls at commits and status changes. ``torn``: the
    file does not end with a newline (its last write was interrupted), so the first write
    starts with one; so does the next write after a failed one. A failed write keeps its
    events pending for the next flush.
    """

    def __init__(self, store, existing: list | None = None, *, torn: bool = False):
        self._store = store
        self.events: list[Event] = list(existing or [])
        self._pending: list[str] = []
        self._listeners: list = []
        self._newline_first = torn

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
        text = ("\n" if self._newline_first else "") + "".join(self._pending)
        try:
            self._store.append_text("events.jsonl", text)
        except BaseException:
            self._newline_first = True  # a local append may have stopped half-way
            raise
        self._pending.clear()
        self._newline_first = False

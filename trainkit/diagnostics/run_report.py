"""What ``trainkit diagnose`` knows about a run: a typed ``RunReport`` read from the run's folder.

``load_report(run)`` finds the run (a folder, an ``s3://`` URL, or a run name under
``$TRAINKIT_STORAGE_PATH``) and reads JSON and text only: ``run_state.json``,
``events.jsonl`` through ``trainkit.events.parse_events``, ``diagnostics/hang-*/summary.json``
and the ``rank-<r>.txt`` stack dumps. Nothing is unpickled or executed. A damaged file
becomes an entry of ``RunReport.problems``, never an exception: only a run that cannot be
found raises (``DiagnoseError``).

``RunReport`` and its parts are frozen dataclasses; ``RunReport.to_dict()`` is the document
``trainkit diagnose --json`` writes (``REPORT_VERSION``). Records that other modules write
and this one passes on (a ``WorkerFailure`` dict, a hang's rank row from ``summary.json``,
an attempt's rank list) keep every key they were read with. Turning a report into text is
``trainkit.diagnostics.render``.

Runs wherever a run folder is read: the user's shell (``trainkit diagnose``), the driver,
the pytest process (a failing test's report).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

from trainkit import events as ev
from trainkit.diagnostics import checks
from trainkit.diagnostics.steps import step_table, straggler_rows
from trainkit.diagnostics.suggestions import suggestions
from trainkit.diagnostics.classify import DESCRIPTIONS
from trainkit.errors import TrainkitError, WorkerFailure
from trainkit.storage import DIAGNOSTICS, EVENTS, MANIFEST, RunStore

REPORT_VERSION = 1


class DiagnoseError(TrainkitError):
    """``trainkit diagnose`` cannot find or open the run it was given."""

    hint = "pass a run folder, an s3:// URL, or a run name under $TRAINKIT_STORAGE_PATH"


# -- the report ---------------------------------------------------------------------------------
class _Part:
    """A part of the report: ``to_dict()`` gives its fields in order, parts in it as their own dicts."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Part) or hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Attempt(_Part):
    """One attempt of the run: from ``run_state.json`` and its ``attempt_started`` event."""

    attempt: int
    world_size: Optional[int]
    outcome: str = ""  # "" while it runs
    ranks: tuple = ()  # attempt_started's records: {"world_rank", "local_rank", "node_rank", "node_id", "pid"}
    start_index: int = 0  # report index of the checkpoint it resumed from
    last_index: Optional[int] = None  # its last committed report
    started: Optional[float] = None  # time of attempt_started; None: that event was not read

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.started is None:
            del d["started"]
        return d


@dataclass(frozen=True)
class Failure(_Part):
    """One failed rank of one ``worker_failed`` event (root cause first), as the controller recorded it."""

    worker: WorkerFailure  # rank, node, pid, kind, exception; kind is None where the record has none
    attempt: int
    event_kind: str  # the event's kind: failure | preemption | hang
    will_retry: bool
    root_cause: bool  # the first failure of its event
    time: float
    record: Mapping  # the WorkerFailure dict as read, for to_dict

    @classmethod
    def from_record(cls, record: Mapping, event: ev.WorkerFailed, root_cause: bool) -> "Failure":
        worker = WorkerFailure.from_dict({"world_rank": None, "kind": None, **record})
        return cls(worker, event.attempt, event.kind, event.will_retry, root_cause, event.time, record)

    def to_dict(self) -> dict:
        return dict(self.record, attempt=self.attempt, event_kind=self.event_kind, will_retry=self.will_retry,
                    root_cause=self.root_cause, time=self.time)


@dataclass(frozen=True)
class HangRank(_Part):
    """One rank as a hang saw it: a row of the hang's ``summary.json`` (or of its event), with its stack."""

    world_rank: Optional[int]
    state: Optional[str]  # missing | waiting
    classification: Optional[str]  # a key of classify.DESCRIPTIONS
    user_frame: Optional[str]  # "function (file.py:12)"
    description: Optional[str]
    pid: Optional[int]
    node_id: str
    dump: str  # how the stack was taken (py-spy, faulthandler), "?" if not said
    file: Optional[str]  # the dump's file name in the hang's folder
    subprocesses: Sequence  # ({"pid", "classification", "user_frame"}, ...)
    stack: Optional[str]  # the dump's text; None when no file was named
    record: Mapping  # the row as read (with description and stack), for to_dict

    @classmethod
    def from_row(cls, row: Mapping) -> "HangRank":
        return cls(row.get("world_rank"), row.get("state"), row.get("classification"), row.get("user_frame"),
                   row.get("description"), row.get("pid"), row.get("node_id", ""), row.get("dump", "?"),
                   row.get("file"), row.get("subprocesses") or (), row.get("stack"), row)

    def to_dict(self) -> dict:
        return dict(self.record)


@dataclass(frozen=True)
class Hang(_Part):
    """One detected hang: its ``diagnostics/hang-*`` folder, its event, or both."""

    folder: str  # "diagnostics/hang-..." relative to the run, "" when only the event is known
    kind: str  # barrier | group
    attempt: int
    index: int  # the report index the ranks were waiting for
    time: Optional[float]
    missing_ranks: tuple
    waiting_ranks: tuple
    waited_s: float
    action: str
    summary: str
    dump_s: Optional[float]
    ranks: tuple[HangRank, ...]


@dataclass(frozen=True)
class RankRow(_Part):
    """One rank of the last attempt: node, pid, the last committed report, where the last hang saw it."""

    world_rank: Optional[int]
    node_id: str
    pid: Optional[int]
    last_committed_index: Optional[int]
    reached_index: Optional[int]  # the barrier it waits at, if the last hang saw it waiting
    hang: Optional[HangRank] = None  # its row in the last hang of the attempt

    @property
    def state(self) -> Optional[str]:
        return self.hang.state if self.hang else None

    @property
    def classification(self) -> Optional[str]:
        return self.hang.classification if self.hang else None

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["hang"]
        if self.hang is not None:
            d.update(state=self.hang.state, classification=self.hang.classification, user_frame=self.hang.user_frame)
        return d


@dataclass(frozen=True)
class Debugger(_Part):
    """A rank that listened for a debugger (a ``debugger_listening`` event)."""

    attempt: int
    world_rank: int
    host: str
    port: int
    reason: str
    time: float


@dataclass(frozen=True)
class Fault(_Part):
    """A fault the chaos runner injected (a ``fault_injected`` event)."""

    attempt: int
    action: str
    world_rank: Optional[int]
    node: Optional[int]
    index: Optional[int]


@dataclass(frozen=True)
class EventsRead(_Part):
    """How far ``events.jsonl`` could be read."""

    read: int  # events read
    stopped_at_line: Optional[int]  # 1-based line of the first damaged line; None: read to the end
    problem: str  # "" when the whole file was read


@dataclass(frozen=True)
class LiveStack(_Part):
    """A fresh stack of one rank of a running run (``trainkit diagnose --live``, trainkit.diagnostics.live)."""

    world_rank: Optional[int]
    pid: Optional[int] = None
    stack: Optional[str] = None  # None: nothing was dumped, the row is a note (``error``) only
    classification: Optional[str] = None
    user_frame: Optional[str] = None
    error: str = ""
    dump_s: Optional[float] = None
    dumped_on: Optional[str] = None  # the Ray node id whose task took the dump (None: this process)

    def to_dict(self) -> dict:
        return super().to_dict() if self.stack is not None else {"world_rank": self.world_rank, "error": self.error}


@dataclass(frozen=True)
class RunReport(_Part):
    """Everything ``trainkit diagnose`` knows about a run. ``to_dict()`` is its ``--json`` document.

    >>> rep = load_report("/tmp/trainkit_results/my_run")  # doctest: +SKIP
    >>> rep.status, [h.missing_ranks for h in rep.hangs]  # doctest: +SKIP
    ('failed', [(1,)])
    """

    run: str  # the run folder's URI
    name: str
    status: str  # running | finished | failed | aborted | unknown
    attempts: tuple[Attempt, ...]
    error: Optional[Mapping]  # TrainingFailedError.to_dict() of a failed run
    failures: tuple[Failure, ...]  # per attempt, root cause first
    hangs: tuple[Hang, ...]  # oldest first
    ranks: tuple[RankRow, ...]  # of the last attempt
    last_index: int  # the last committed report
    debuggers: tuple[Debugger, ...]
    faults: tuple[Fault, ...]
    events: EventsRead
    problems: tuple[str, ...]  # files that could not be read, said in words
    suggestions: tuple[str, ...]  # what to look at or change, most specific first
    steps: tuple = ()  # StepRow per rank of the last attempt (trainkit.diagnostics.steps)
    stragglers: tuple = ()  # StragglerRow per straggler_detected event
    live: Optional[tuple[LiveStack, ...]] = None  # only with --live

    @property
    def failed_or_hung(self) -> bool:
        """The run failed or was aborted, or it hung and did not finish (``trainkit diagnose`` exits 1)."""
        return self.status in ("failed", "aborted") or bool(self.hangs) and self.status != "finished"

    def to_dict(self) -> dict:
        """The ``--json`` document: plain JSON types, ``version`` first, ``live`` only with --live."""
        d = {"version": REPORT_VERSION, **super().to_dict()}
        if self.live is None:
            del d["live"]
        return ev.jsonable(d)


# -- locating the run ---------------------------------------------------------------------------
def open_run(run: Any, storage_filesystem: Any = None) -> RunStore:
    """A ``RunStore`` for a run folder, an ``s3://`` URL, or a run name under the default storage.

    >>> open_run("/tmp/trainkit_results/my_run").name  # doctest: +SKIP
    'my_run'
    """
    from trainkit import _env
    from trainkit.result import split_run_path

    path = os.fspath(run)
    if storage_filesystem is not None or "://" in path:
        parent, name = split_run_path(path)
        return RunStore(parent, name, storage_filesystem)
    expanded = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(expanded):
        parent, name = os.path.split(expanded.rstrip(os.sep))
        return RunStore(parent, name)
    if os.sep not in path and "/" not in path:
        base = os.path.expanduser(_env.STORAGE_PATH.get())
        if "://" in base:
            return RunStore(base, path)
        if os.path.isdir(os.path.join(base, path)):
            return RunStore(os.path.abspath(base), path)
        raise DiagnoseError(f"no run folder {path!r} here and no run named {path!r} under "
                            f"{base} ($TRAINKIT_STORAGE_PATH)")
    raise DiagnoseError(f"run folder {path!r} does not exist")


# -- reading ------------------------------------------------------------------------------------
def _read_text(store: RunStore, rel: str, problems: list) -> Optional[str]:
    try:
        data = store.read_bytes(rel)
    except Exception as e:  # noqa: BLE001 - unreadable storage is a problem to report, not a crash
        problems.append(f"{rel}: cannot read ({type(e).__name__}: {e})")
        return None
    return None if data is None else data.decode("utf-8", errors="replace")


def _read_json(store: RunStore, rel: str, problems: list) -> Any:
    text = _read_text(store, rel, problems)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        problems.append(f"{rel} is not valid JSON ({e}); ignored")
        return None


def _list_diagnostics(store: RunStore, problems: list) -> list[str]:
    try:
        return store.list_dirs(DIAGNOSTICS)
    except OSError as e:  # said in the report; the hangs named by events are still shown
        problems.append(f"cannot list {DIAGNOSTICS}/: {type(e).__name__}: {e}")
        return []


def _load_hang(store: RunStore, folder: str, event: Optional[ev.HangDetected], problems: list) -> Hang:
    summary = _read_json(store, f"{DIAGNOSTICS}/{folder}/summary.json", problems) if folder else None
    if not isinstance(summary, dict):
        summary = {}
    rows = []
    for r in summary.get("ranks") or [dict(r) for r in (event.ranks if event else ())]:
        if not isinstance(r, dict):
            continue
        row = dict(r)
        row.setdefault("description", DESCRIPTIONS.get(row.get("classification", ""), ""))
        fname = row.get("file")
        if folder and fname and "/" not in fname:
            row["stack"] = _read_text(store, f"{DIAGNOSTICS}/{folder}/{fname}", problems) or ""
        rows.append(HangRank.from_row(row))
    return Hang(
        folder=f"{DIAGNOSTICS}/{folder}" if folder else "",
        kind=summary.get("kind", "barrier"),
        attempt=summary.get("attempt", event.attempt if event else 0),
        index=summary.get("index", event.index if event else 0),
        time=summary.get("detected_at", event.time if event else None),
        missing_ranks=tuple(summary.get("missing_ranks", event.missing_ranks if event else [])),
        waiting_ranks=tuple(summary.get("waiting_ranks", [])),
        waited_s=summary.get("waited_s", event.waited_s if event else 0.0),
        action=summary.get("action", ""),
        summary=summary.get("summary", event.summary if event else ""),
        dump_s=summary.get("dump_s"),
        ranks=tuple(rows),
    )


def load_report(run: Any, *, storage_filesystem: Any = None) -> RunReport:
    """Everything ``trainkit diagnose`` knows about a run (a folder, an ``s3://`` URL, a run name, a ``RunStore``).

    Raises ``DiagnoseError`` only when the run folder cannot be found; damaged files
    become entries of ``problems``.

    >>> load_report("/tmp/trainkit_results/my_run").to_dict()["status"]  # doctest: +SKIP
    'failed'
    """
    store = run if isinstance(run, RunStore) else open_run(run, storage_filesystem)
    problems: list[str] = []
    state = _read_json(store, MANIFEST, problems)
    events_text = _read_text(store, EVENTS, problems)
    if state is None and events_text is None:
        if problems:  # the storage answered with an error (credentials, permissions), not "no such file"
            err = DiagnoseError(f"cannot read the run {store.uri}: {problems[0]}")
            err.hint = "check the storage's credentials and permissions (for s3://: AWS_* or ~/.aws)"
            raise err
        raise DiagnoseError(f"{store.uri} has neither {MANIFEST} nor {EVENTS}: not a trainkit run folder "
                            "(or the run never started)")
    if state is None and not any(p.startswith(MANIFEST) for p in problems):
        problems.append(f"{MANIFEST} is missing: the status and attempts below come from {EVENTS} alone")
    state, bad = checks.manifest_problems(state)
    problems += bad
    if state:
        from trainkit.result import shown_state

        state = shown_state(store, state)  # a running run whose driver is gone is shown aborted
    problems += checks.checkpoint_problems(store, state)
    read = ev.parse_events(events_text)
    if read.problem and events_text is not None:
        problems.append(read.problem)
    events = read.events

    attempts: dict[int, dict] = {}  # Attempt fields, filled in as the events come
    for a in state.get("attempts") or []:
        if isinstance(a, dict) and "attempt" in a:
            attempts[a["attempt"]] = {"attempt": a["attempt"], "world_size": a.get("world_size"),
                                      "outcome": a.get("outcome", ""), "ranks": (), "start_index": 0,
                                      "last_index": None}
    failures, hang_events, debuggers, faults = [], [], [], []
    finished = None
    for e in events:
        if isinstance(e, ev.AttemptStarted):
            a = attempts.setdefault(e.attempt, {"attempt": e.attempt, "world_size": e.world_size, "outcome": "",
                                                "ranks": (), "start_index": 0, "last_index": None})
            a.update(world_size=e.world_size, ranks=tuple(dict(r) for r in e.ranks), start_index=e.start_index,
                     started=e.time)
        elif isinstance(e, ev.ReportCommitted):
            if e.attempt in attempts:
                attempts[e.attempt]["last_index"] = e.index
        elif isinstance(e, ev.WorkerFailed):
            failures += [Failure.from_record(f, e, i == 0) for i, f in enumerate(e.failures) if isinstance(f, dict)]
        elif isinstance(e, ev.HangDetected):
            hang_events.append(e)
        elif isinstance(e, ev.DebuggerListening):
            debuggers.append(Debugger(e.attempt, e.world_rank, e.host, e.port, e.reason, e.time))
        elif isinstance(e, ev.FaultInjected):
            faults.append(Fault(e.attempt, e.action, e.world_rank, e.node, e.index))
        elif isinstance(e, ev.RunFinished):
            finished = e

    # hangs: one per diagnostics folder; events without a folder (or folders without events) still count
    hangs, seen = [], set()
    for e in hang_events:
        folder = (e.diagnostics or "").rstrip("/").rsplit("/", 1)[-1]
        seen.add(folder)
        hangs.append(_load_hang(store, folder, e, problems))
    for folder in _list_diagnostics(store, problems):
        if folder.startswith("hang-") and folder not in seen:
            if _read_text(store, f"{DIAGNOSTICS}/{folder}/summary.json", []) is None:
                problems.append(f"{DIAGNOSTICS}/{folder} has no summary.json and no hang_detected event: not a hang")
                continue
            hangs.append(_load_hang(store, folder, None, problems))
    hangs.sort(key=lambda h: h.time or 0)

    status = state.get("status") or (finished.status if finished else "unknown")
    if status in ("finished", "failed", "aborted"):  # an attempt the manifest never closed ended with the run
        for a in attempts.values():
            a["outcome"] = a["outcome"] or ("aborted" if status == "aborted" else "ended")
    error = state.get("error") or (finished.error if finished else None)
    numbered = tuple(Attempt(**attempts[k]) for k in sorted(attempts))
    last = numbered[-1] if numbered and numbered[-1].attempt else None
    stream = EventsRead(len(events), read.bad_line,
                        read.problem if events_text is not None else "events.jsonl is missing")
    failures, hangs, debuggers = tuple(failures), tuple(hangs), tuple(debuggers)
    stragglers = straggler_rows(events)
    return RunReport(
        run=store.uri, name=store.name, status=status, attempts=numbered, error=error, failures=failures,
        hangs=hangs, ranks=_rank_table(last, hangs),
        last_index=_last_index(state, events),
        debuggers=debuggers, faults=tuple(faults), events=stream, problems=tuple(problems),
        steps=step_table(events, last.attempt if last else None), stragglers=stragglers,
        suggestions=suggestions(status, failures, hangs, debuggers, stream, stragglers, faults),
    )


def _last_index(state: dict, events: list) -> int:
    from trainkit.result import lineage

    rows = lineage(events)
    if rows:
        return rows[-1][0]
    for c in state.get("checkpoints") or []:
        if isinstance(c, dict) and c.get("dir") == state.get("latest_checkpoint"):
            return c.get("index", 0)
    return 0


def _rank_table(attempt: Optional[Attempt], hangs: Sequence[Hang]) -> tuple[RankRow, ...]:
    """Per rank of the last attempt: node, pid, last committed report, where the last hang saw it."""
    if not attempt:
        return ()
    committed = attempt.last_index if attempt.last_index is not None else attempt.start_index
    last_hang = next((h for h in reversed(hangs) if h.attempt == attempt.attempt), None)
    by_rank = {r.world_rank: r for r in (last_hang.ranks if last_hang else ())}
    rows = []
    for r in attempt.ranks or ():
        rank = r.get("world_rank")
        h = by_rank.get(rank)
        reached = committed
        if h is not None and h.state == "waiting" and last_hang.kind == "barrier":
            reached = last_hang.index
        rows.append(RankRow(rank, r.get("node_id", ""), r.get("pid"), committed, reached, h))
    return tuple(rows)

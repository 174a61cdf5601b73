"""``trainkit diagnose RUN``: explain a run from its folder.

``load_report`` reads only JSON and text from the run folder (``run_state.json``,
``events.jsonl`` through ``trainkit.events.parse_events``, ``diagnostics/*/summary.json``
and the ``rank-<r>.txt`` stack dumps): nothing is unpickled or executed, and a damaged
file is reported as a problem, never raised. ``render_text`` and ``render_short`` turn
the report into text; ``main(args)`` is the CLI entry (``trainkit.cli`` calls it).

Runs in the driver, a test process or a shell; ``--live`` also runs py-spy on the
ranks of a running run (trainkit.diagnostics.stacks).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from trainkit import events as ev
from trainkit.errors import StorageError, TrainkitError
from trainkit.storage import DIAGNOSTICS, EVENTS, MANIFEST, RunStore

REPORT_VERSION = 1

_DESCRIBE = {  # classification -> words (trainkit.diagnostics.classify keeps the same keys)
    "user_code": "in user code",
    "collective": "in a torch.distributed collective",
    "data_loading": "in data loading",
    "report": "in report() of another index",
    "dead": "dead (its process is gone)",
    "waiting": "waiting at the barrier",
    "unknown": "stack unavailable",
}


class DiagnoseError(TrainkitError):
    """``trainkit diagnose`` cannot find or open the run it was given."""


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
    base = store.path(DIAGNOSTICS)
    try:
        if store.local:
            return sorted(e.name for e in os.scandir(base) if e.is_dir())
        entries = store.fs.ls(base, detail=True)
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:  # said in the report; the hangs named by events are still shown
        problems.append(f"cannot list {DIAGNOSTICS}/: {type(e).__name__}: {e}")
        return []


def _load_hang(store: RunStore, folder: str, event: Optional[ev.HangDetected], problems: list) -> dict:
    summary = _read_json(store, f"{DIAGNOSTICS}/{folder}/summary.json", problems) if folder else None
    if not isinstance(summary, dict):
        summary = {}
    hang = {
        "folder": f"{DIAGNOSTICS}/{folder}" if folder else "",
        "kind": summary.get("kind", "barrier"),
        "attempt": summary.get("attempt", event.attempt if event else 0),
        "index": summary.get("index", event.index if event else 0),
        "time": summary.get("detected_at", event.time if event else None),
        "missing_ranks": list(summary.get("missing_ranks", event.missing_ranks if event else [])),
        "waiting_ranks": list(summary.get("waiting_ranks", [])),
        "waited_s": summary.get("waited_s", event.waited_s if event else 0.0),
        "action": summary.get("action", ""),
        "summary": summary.get("summary", event.summary if event else ""),
        "dump_s": summary.get("dump_s"),
        "ranks": [],
    }
    ranks = summary.get("ranks") or [dict(r) for r in (event.ranks if event else ())]
    for r in ranks:
        if not isinstance(r, dict):
            continue
        row = dict(r)
        row.setdefault("description", _DESCRIBE.get(row.get("classification", ""), ""))
        fname = row.get("file")
        if folder and fname and "/" not in fname:
            row["stack"] = _read_text(store, f"{DIAGNOSTICS}/{folder}/{fname}", problems) or ""
        hang["ranks"].append(row)
    return hang


def load_report(run: Any, *, storage_filesystem: Any = None) -> dict:
    """Everything ``trainkit diagnose`` knows about a run, as JSON-ready data.

    Raises ``DiagnoseError`` only when the run folder cannot be found; damaged files
    become entries of ``report["problems"]``.

    >>> rep = load_report("/tmp/trainkit_results/my_run")  # doctest: +SKIP
    >>> rep["status"], [h["missing_ranks"] for h in rep["hangs"]]  # doctest: +SKIP
    ('failed', [[1]])
    """
    store = run if isinstance(run, RunStore) else open_run(run, storage_filesystem)
    problems: list[str] = []
    state = _read_json(store, MANIFEST, problems)
    events_text = _read_text(store, EVENTS, problems)
    if state is None and events_text is None:
        raise DiagnoseError(f"{store.uri} has neither {MANIFEST} nor {EVENTS}: not a trainkit run folder "
                            "(or the run never started)")
    if not isinstance(state, dict):
        state = {}
    read = ev.parse_events(events_text)
    if read.problem and events_text is not None:
        problems.append(read.problem)
    events = read.events

    attempts: dict[int, dict] = {}
    for a in state.get("attempts") or []:
        if isinstance(a, dict) and "attempt" in a:
            attempts[a["attempt"]] = {"attempt": a["attempt"], "world_size": a.get("world_size"),
                                      "outcome": a.get("outcome", ""), "ranks": [], "start_index": 0,
                                      "last_index": None}
    failures, hang_events, debuggers, faults = [], [], [], []
    last_committed: dict[int, int] = {}
    finished = None
    for e in events:
        if isinstance(e, ev.AttemptStarted):
            a = attempts.setdefault(e.attempt, {"attempt": e.attempt, "world_size": e.world_size, "outcome": "",
                                                "ranks": [], "start_index": 0, "last_index": None})
            a.update(world_size=e.world_size, ranks=[dict(r) for r in e.ranks], start_index=e.start_index,
                     started=e.time)
        elif isinstance(e, ev.ReportCommitted):
            last_committed[e.attempt] = e.index
            if e.attempt in attempts:
                attempts[e.attempt]["last_index"] = e.index
        elif isinstance(e, ev.WorkerFailed):
            for i, f in enumerate(e.failures):
                if isinstance(f, dict):
                    failures.append(dict(f, attempt=e.attempt, event_kind=e.kind, will_retry=e.will_retry,
                                         root_cause=i == 0, time=e.time))
        elif isinstance(e, ev.HangDetected):
            hang_events.append(e)
        elif isinstance(e, ev.DebuggerListening):
            debuggers.append({"attempt": e.attempt, "world_rank": e.world_rank, "host": e.host, "port": e.port,
                              "reason": e.reason, "time": e.time})
        elif isinstance(e, ev.FaultInjected):
            faults.append({"attempt": e.attempt, "action": e.action, "world_rank": e.world_rank, "node": e.node,
                           "index": e.index})
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
            hangs.append(_load_hang(store, folder, None, problems))
    hangs.sort(key=lambda h: h["time"] or 0)

    status = state.get("status") or (finished.status if finished else "unknown")
    if finished is None and status == "running" and read.bad_line is None and events:
        status = "running"
    error = state.get("error") or (finished.error if finished else None)
    last_attempt = max(attempts) if attempts else None
    ranks = _rank_table(attempts.get(last_attempt) if last_attempt else None, hangs, last_attempt)
    report = {
        "version": REPORT_VERSION,
        "run": store.uri,
        "name": store.name,
        "status": status,
        "attempts": [attempts[k] for k in sorted(attempts)],
        "error": error,
        "failures": failures,
        "hangs": hangs,
        "ranks": ranks,
        "last_index": _last_index(state, events),
        "debuggers": debuggers,
        "faults": faults,
        "events": {"read": len(events), "stopped_at_line": read.bad_line, "problem": read.problem
                   if events_text is not None else "events.jsonl is missing"},
        "problems": problems,
    }
    report["suggestions"] = _suggestions(report)
    return report


def _last_index(state: dict, events: list) -> int:
    from trainkit.result import lineage

    rows = lineage(events)
    if rows:
        return rows[-1][0]
    for c in state.get("checkpoints") or []:
        if isinstance(c, dict) and c.get("dir") == state.get("latest_checkpoint"):
            return c.get("index", 0)
    return 0


def _rank_table(attempt: Optional[dict], hangs: list, attempt_no: Optional[int]) -> list[dict]:
    """Per rank of the last attempt: node, pid, last committed report, where the last hang saw it."""
    if not attempt:
        return []
    committed = attempt.get("last_index")
    if committed is None:
        committed = attempt.get("start_index", 0)
    last_hang = next((h for h in reversed(hangs) if h.get("attempt") == attempt_no), None)
    by_rank = {r.get("world_rank"): r for r in (last_hang or {}).get("ranks", [])}
    rows = []
    for r in attempt.get("ranks") or []:
        rank = r.get("world_rank")
        row = {"world_rank": rank, "node_id": r.get("node_id", ""), "pid": r.get("pid"),
               "last_committed_index": committed, "reached_index": committed}
        h = by_rank.get(rank)
        if h is not None:
            row["state"] = h.get("state")
            row["classification"] = h.get("classification")
            row["user_frame"] = h.get("user_frame")
            if h.get("state") == "waiting" and last_hang.get("kind") == "barrier":
                row["reached_index"] = last_hang.get("index")
        rows.append(row)
    return rows


def _suggestions(rep: dict) -> list[str]:
    out: list[str] = []
    seen = set()

    def add(s: str) -> None:
        if s not in seen:
            seen.add(s)
            out.append(s)

    for h in rep["hangs"]:
        for r in h["ranks"]:
            if r.get("state") != "missing":
                continue
            c, where = r.get("classification"), r.get("user_frame") or "the training function"
            if c == "user_code":
                add(f"rank {r.get('world_rank')} is busy or blocked in {where}: look for a loop, lock, sleep or "
                    "I/O there that only some ranks run")
            elif c == "collective":
                add(f"rank {r.get('world_rank')} waits in a torch.distributed collective at {where}: check that "
                    "every rank makes the same collectives in the same order (a rank that skips one, or reports "
                    "one time fewer, leaves the others blocked)")
            elif c == "data_loading":
                add(f"rank {r.get('world_rank')} waits for data at {where}: check the Dataset/DataLoader worker "
                    "(a stuck __getitem__, a full disk, a dead worker); DataLoader(timeout=...) turns this into an "
                    "error")
            elif c == "report":
                add(f"rank {r.get('world_rank')} is inside report() but has not arrived: a slow checkpoint upload "
                    "or a report hook; check storage speed and checkpoint size")
            elif c == "dead":
                add(f"rank {r.get('world_rank')}'s process is gone: look at logs/ and the node's system log "
                    "(OOM killer)")
    kinds = {f.get("kind") for f in rep["failures"]}
    if "mismatch" in kinds:
        add("ranks made different numbers of report()/collective calls: make every rank call report() the same "
            "number of times")
    if "died" in kinds:
        add("a worker process died: raise FailureConfig(max_failures=...) to restart from the latest checkpoint, "
            "and check the node's memory")
    if rep["hangs"] and rep["status"] == "failed" and not rep["debuggers"]:
        add("to step through the stuck rank, re-run with TRAINKIT_DEBUG_RANK=<rank> and attach a debugger "
            "(debugpy) to the port in the debugger_listening event")
    if rep["events"]["stopped_at_line"]:
        add("events.jsonl is damaged: the run's controller probably died while writing it; what follows the "
            "damaged line is not shown")
    return out


# -- rendering ----------------------------------------------------------------------------------
def _failure_line(f: dict) -> str:
    where = f"rank {f.get('world_rank')}"
    extra = []
    if f.get("node_id"):
        extra.append(f"node {str(f['node_id'])[:12]}")
    if f.get("pid"):
        extra.append(f"pid {f['pid']}")
    if extra:
        where += " (" + ", ".join(extra) + ")"
    what = f"{f.get('exc_type')}: {f.get('message', '')}" if f.get("exc_type") else f.get("message", "")
    what = (what or f.get("kind", "")).strip().splitlines()[0] if (what or f.get("kind")) else ""
    return f"{where}: {what}"


def _hang_line(h: dict) -> str:
    missing = h.get("missing_ranks") or []
    head = (f"hang at report {h.get('index')}" if h.get("kind") != "group"
            else f"group hang after report {max(int(h.get('index') or 1) - 1, 0)}")
    parts = []
    for r in h.get("ranks", []):
        if r.get("state") == "missing":
            frame = f" at {r['user_frame']}" if r.get("user_frame") else ""
            parts.append(f"rank {r.get('world_rank')} {r.get('classification', 'unknown')}{frame}")
    body = "; ".join(parts) or f"missing ranks {missing}"
    return f"{head} (attempt {h.get('attempt')}, {float(h.get('waited_s') or 0):.1f} s): {body}"


def render_short(report: dict) -> str:
    """A few lines: run path, status, failures with rank/node/root cause, hangs with missing ranks and frames.

    >>> print(render_short(load_report(path)))  # doctest: +SKIP
    run /tmp/x/my_run: failed (2 attempts, last report 3)
      root cause: rank 1 (node 5f0c1a2b3c4d, pid 4242): HangDetectedError: hang at report 4: ...
      hang at report 4 (attempt 2, 2.0 s): rank 1 user_code at stuck (train.py:12)
    """
    n = len(report.get("attempts") or [])
    lines = [f"run {report.get('run')}: {report.get('status')} ({n} attempt{'s' if n != 1 else ''}, "
             f"last report {report.get('last_index', 0)})"]
    shown = 0
    for f in report.get("failures", []):
        if f.get("root_cause") and shown < 3:
            label = "root cause" if not f.get("will_retry") else f"attempt {f.get('attempt')} failed"
            lines.append(f"  {label}: {_failure_line(f)}")
            shown += 1
    for h in (report.get("hangs") or [])[-3:]:
        lines.append(f"  {_hang_line(h)}")
    for d in (report.get("debuggers") or [])[-2:]:
        lines.append(f"  debugger: rank {d['world_rank']} listens on {d['host']}:{d['port']} ({d['reason']})")
    ev_info = report.get("events") or {}
    if ev_info.get("stopped_at_line"):
        lines.append(f"  note: {ev_info.get('problem')}")
    lines.append(f"  details: trainkit diagnose {report.get('run')}")
    return "\n".join(lines)


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.rstrip().splitlines())


def _highlight_stack(stack: str, user_frames) -> str:
    """Mark the user's frames (``function (file:line)``) in a stack dump with ``>>``."""
    if not stack:
        return ""
    if isinstance(user_frames, str) or user_frames is None:
        user_frames = [user_frames]
    marks = []
    for uf in user_frames:
        if uf:
            loc = uf.rsplit("(", 1)[-1].rstrip(")")
            file, _, line = loc.rpartition(":")
            marks.append((uf.split(" (", 1)[0], file, line))
    out = []
    for s in stack.rstrip().splitlines():
        hit = not s.startswith("#") and any(
            (f"{func} (" in s and f"{file}:{line})" in s) or (f'{file}", line {line} in {func}' in s)
            for func, file, line in marks)
        out.append((">> " if hit else "   ") + s)
    return "\n".join(out)


def _training_section(stack: str) -> str:
    """The header, the training thread and each subprocess's main thread of a dump (not Ray's idle threads)."""
    from trainkit.diagnostics.classify import parse_dump, training_thread

    procs = parse_dump(stack)
    if not procs:
        return stack
    lines = [s for s in stack.splitlines() if s.startswith("#")]
    for i, p in enumerate(procs):
        t = training_thread(p)
        if t is None:
            continue
        who = "training thread" if i == 0 else "subprocess"
        lines.append(f"{who} {t.name or t.ident} (pid {p.pid}):" if p.pid else f"{who} {t.name or t.ident}:")
        lines += [f"    {f.function} ({f.file}:{f.line})" for f in t.frames]
    return "\n".join(lines)


def render_text(report: dict, *, stacks: bool = True) -> str:
    """The full human report: status, attempts, failures, hangs with stacks, ranks, suggestions."""
    lines = [f"run:      {report.get('run')}", f"status:   {report.get('status')}"]
    atts = report.get("attempts") or []
    if atts:
        lines.append("attempts: " + ", ".join(
            f"#{a['attempt']} world size {a.get('world_size')} ({a.get('outcome') or 'running'})" for a in atts))
    lines.append(f"last committed report: {report.get('last_index', 0)}")
    ev_info = report.get("events") or {}
    if ev_info.get("problem"):
        lines.append(f"events:   read {ev_info.get('read', 0)}; {ev_info['problem']}")
    for p in report.get("problems") or []:
        if p != ev_info.get("problem"):
            lines.append(f"problem:  {p}")

    fails = report.get("failures") or []
    if fails:
        lines += ["", "failures (root cause first per attempt):"]
        for f in fails:
            tag = "root cause" if f.get("root_cause") else "also"
            retry = "restarted" if f.get("will_retry") else "final"
            lines.append(f"  attempt {f.get('attempt')} [{f.get('kind')}, {tag}, {retry}]: {_failure_line(f)}")
            if f.get("traceback") and f.get("root_cause"):
                lines.append(_indent(f["traceback"]))

    hangs = report.get("hangs") or []
    for h in hangs:
        lines += ["", f"{_hang_line(h)}"]
        if h.get("summary"):
            lines.append(f"  summary: {h['summary']}")
        if h.get("folder"):
            lines.append(f"  evidence: {h['folder']}/ (action {h.get('action') or '?'}, dumps took "
                         f"{h.get('dump_s') if h.get('dump_s') is not None else '?'} s)")
        for r in sorted(h.get("ranks", []), key=lambda r: (r.get("state") != "missing", r.get("world_rank", 0))):
            desc = r.get("description") or _DESCRIBE.get(r.get("classification", ""), "")
            if r.get("state") == "waiting":
                desc = _DESCRIBE["waiting"]
            frame = f" at {r['user_frame']}" if r.get("user_frame") else ""
            lines.append(f"  rank {r.get('world_rank')} [{r.get('state')}] {r.get('classification')}{frame}: "
                         f"{desc} (pid {r.get('pid')}, node {str(r.get('node_id', ''))[:12]}, dump "
                         f"{r.get('dump', '?')})")
            for sp in r.get("subprocesses") or []:
                if sp.get("user_frame"):
                    lines.append(f"    subprocess {sp.get('pid')}: {sp.get('classification')} at {sp['user_frame']}")
            if stacks and r.get("state") == "missing" and r.get("stack"):
                frames = [r.get("user_frame")] + [sp.get("user_frame") for sp in r.get("subprocesses") or []]
                lines.append(_indent(_highlight_stack(_training_section(r["stack"]), frames)))
                if h.get("folder") and r.get("file"):
                    lines.append(f"      (all threads: {h['folder']}/{r['file']})")

    ranks = report.get("ranks") or []
    if ranks:
        lines += ["", "ranks of the last attempt:"]
        for r in ranks:
            extra = f", {r['state']} {r.get('classification')}" if r.get("state") else ""
            lines.append(f"  rank {r['world_rank']}: node {str(r.get('node_id', ''))[:12]}, pid {r.get('pid')}, "
                         f"last committed report {r.get('last_committed_index')}, reached {r.get('reached_index')}"
                         f"{extra}")
    for d in report.get("debuggers") or []:
        lines.append(f"debugger: attempt {d['attempt']} rank {d['world_rank']} listened on {d['host']}:{d['port']} "
                     f"({d['reason']})")
    if report.get("live"):
        lines += ["", "live stacks:"]
        for r in report["live"]:
            frame = f" at {r['user_frame']}" if r.get("user_frame") else ""
            lines.append(f"  rank {r.get('world_rank')} (pid {r.get('pid')}): {r.get('classification')}{frame}"
                         + (f" [{r['error']}]" if r.get("error") else ""))
            if stacks and r.get("stack"):
                lines.append(_indent(_highlight_stack(r["stack"], r.get("user_frame"))))
    sugg = report.get("suggestions") or []
    if sugg:
        lines += ["", "suggestions:"] + [f"  - {s}" for s in sugg]
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------
def main(args) -> int:
    """``trainkit diagnose RUN [--live] [--json OUT]``: 0 readable, 1 the run failed or hung, 2 usage."""
    try:
        report = load_report(args.run)
    except (DiagnoseError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("hint: pass a run folder, an s3:// URL, or a run name under $TRAINKIT_STORAGE_PATH", file=sys.stderr)
        return 2
    if getattr(args, "live", False):
        report["live"] = _live(report)
    out = getattr(args, "json", None)
    if out:
        text = json.dumps(ev.jsonable(report), indent=1)
        if out == "-":
            print(text)
        else:
            try:
                with open(out, "w") as f:
                    f.write(text + "\n")
            except OSError as e:
                print(f"error: cannot write {out}: {e}", file=sys.stderr)
                return 2
    if out != "-":
        print(render_text(report))
    failed = report["status"] in ("failed", "aborted") or bool(report["hangs"]) and report["status"] != "finished"
    return 1 if failed else 0


def _live(report: dict) -> list[dict]:
    """Fresh stacks of every rank of the last attempt whose process runs on this machine."""
    from trainkit.diagnostics.classify import classify_dump
    from trainkit.diagnostics.stacks import dump_local

    rows = []
    ranks = report.get("ranks") or []
    if report.get("status") != "running":
        return [{"world_rank": None, "error": f"the run is {report.get('status')}, not running: nothing to dump"}]
    for r in ranks:
        pid = r.get("pid")
        t0 = time.monotonic()
        dump = dump_local(int(pid), mode="py-spy") if pid else {"text": "", "method": "none", "error": "no pid"}
        c = classify_dump(dump["text"], alive=dump.get("alive", True))
        rows.append({"world_rank": r.get("world_rank"), "pid": pid, "stack": dump["text"],
                     "classification": c.classification, "user_frame": c.user_frame,
                     "error": dump.get("error", ""), "dump_s": round(time.monotonic() - t0, 3)})
    return rows

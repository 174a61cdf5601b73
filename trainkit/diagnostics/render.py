"""A ``RunReport`` as text: ``render_text`` (what ``trainkit diagnose`` prints) and ``render_short``.

``render_short`` is a few lines (status, root causes, hangs with the missing ranks and their
user frames), the form a failing test's report and the docs show; ``render_text`` is the
whole report, with the stuck ranks' stacks and the user's frames marked ``>>``. Pure
functions of the report: no I/O. Runs wherever a report is shown (the user's shell, the
pytest process).
"""

from __future__ import annotations

from typing import Iterable, Optional

from trainkit.diagnostics.classify import DESCRIPTIONS, parse_dump, training_thread
from trainkit.diagnostics.run_report import Failure, Hang, RunReport

_STACK_PAD = "      "


def _failure_line(f: Failure) -> str:
    """``rank 1 (node 5f0c1a2b3c4d, pid 11): ValueError: boom``: the first line of what happened."""
    w = f.worker
    what = (w.what() or w.kind or "").strip().splitlines()
    return f"{w.where(exit_code=False)}: {what[0] if what else ''}"


def _hang_line(h: Hang) -> str:
    head = (f"hang at report {h.index}" if h.kind != "group"
            else f"group hang after report {max(int(h.index or 1) - 1, 0)}")
    parts = []
    for r in h.ranks:
        if r.state == "missing":
            frame = f" at {r.user_frame}" if r.user_frame else ""
            parts.append(f"rank {r.world_rank} {r.classification if r.classification is not None else 'unknown'}"
                         f"{frame}")
    body = "; ".join(parts) or f"missing ranks {list(h.missing_ranks or [])}"
    return f"{head} (attempt {h.attempt}, {float(h.waited_s or 0):.1f} s): {body}"


def render_short(report: RunReport) -> str:
    """A few lines: run path, status, failures with rank/node/root cause, hangs with missing ranks and frames.

    >>> print(render_short(load_report(path)))  # doctest: +SKIP
    run /tmp/x/my_run: failed (2 attempts, last report 3)
      root cause: rank 1 (node 5f0c1a2b3c4d, pid 4242): HangDetectedError: hang at report 4: ...
      hang at report 4 (attempt 2, 2.0 s): rank 1 user_code at stuck (train.py:12)
    """
    n = len(report.attempts)
    lines = [f"run {report.run}: {report.status} ({n} attempt{'s' if n != 1 else ''}, "
             f"last report {report.last_index})"]
    roots = [f for f in report.failures if f.root_cause][:3]
    for f in roots:
        label = "root cause" if not f.will_retry else f"attempt {f.attempt} failed"
        lines.append(f"  {label}: {_failure_line(f)}")
    for h in report.hangs[-3:]:
        lines.append(f"  {_hang_line(h)}")
    for d in report.debuggers[-2:]:
        lines.append(f"  debugger: rank {d.world_rank} listens on {d.host}:{d.port} ({d.reason})")
    for s in report.stragglers[-2:]:
        lines.append(f"  straggler: {s.describe()}")
    if report.events.stopped_at_line:
        lines.append(f"  note: {report.events.problem}")
    lines.append(f"  details: trainkit diagnose {report.run}")
    return "\n".join(lines)


def _indent(text: str, pad: str = _STACK_PAD) -> str:
    return "\n".join(pad + line for line in text.rstrip().splitlines())


def _highlight_stack(stack: str, user_frames: Iterable[Optional[str]]) -> str:
    """Mark the user's frames (``function (file:line)``) in a stack dump with ``>>``."""
    if not stack:
        return ""
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


def _hang_section(h: Hang, stacks: bool) -> list[str]:
    lines = ["", _hang_line(h)]
    if h.summary:
        lines.append(f"  summary: {h.summary}")
    if h.folder:
        lines.append(f"  evidence: {h.folder}/ (action {h.action or '?'}, dumps took "
                     f"{h.dump_s if h.dump_s is not None else '?'} s)")
    for r in sorted(h.ranks, key=lambda r: (r.state != "missing", 0 if r.world_rank is None else r.world_rank)):
        desc = r.description or DESCRIPTIONS.get(r.classification or "", "")
        if r.state == "waiting":
            desc = DESCRIPTIONS["waiting"]
        frame = f" at {r.user_frame}" if r.user_frame else ""
        lines.append(f"  rank {r.world_rank} [{r.state}] {r.classification}{frame}: {desc} (pid {r.pid}, node "
                     f"{str(r.node_id)[:12]}, dump {r.dump})")
        for sp in r.subprocesses:
            if sp.get("user_frame"):
                lines.append(f"    subprocess {sp.get('pid')}: {sp.get('classification')} at {sp['user_frame']}")
        if stacks and r.state == "missing" and r.stack:
            frames = [r.user_frame] + [sp.get("user_frame") for sp in r.subprocesses]
            lines.append(_indent(_highlight_stack(_training_section(r.stack), frames)))
            if h.folder and r.file:
                lines.append(f"{_STACK_PAD}(all threads: {h.folder}/{r.file})")
    return lines


def render_text(report: RunReport, *, stacks: bool = True) -> str:
    """The full human report: status, attempts, failures, hangs with stacks, ranks, suggestions.

    >>> print(render_text(load_report(path), stacks=False))  # doctest: +SKIP
    run:      /tmp/x/my_run
    status:   failed
    ...
    """
    lines = [f"run:      {report.run}", f"status:   {report.status}"]
    if report.attempts:
        lines.append("attempts: " + ", ".join(
            f"#{a.attempt} world size {a.world_size} ({a.outcome or 'running'})" for a in report.attempts))
    lines.append(f"last committed report: {report.last_index}")
    events = report.events
    if events.problem:
        lines.append(f"events:   read {events.read}; {events.problem}")
    lines += [f"problem:  {p}" for p in report.problems if p != events.problem]

    if report.failures:
        lines += ["", "failures (root cause first per attempt):"]
        for f in report.failures:
            tag = "root cause" if f.root_cause else "also"
            retry = "restarted" if f.will_retry else "final"
            lines.append(f"  attempt {f.attempt} [{f.worker.kind}, {tag}, {retry}]: {_failure_line(f)}")
            if f.worker.traceback and f.root_cause:
                lines.append(_indent(f.worker.traceback))

    for h in report.hangs:
        lines += _hang_section(h, stacks)

    if report.ranks:
        lines += ["", "ranks of the last attempt:"]
        for r in report.ranks:
            extra = f", {r.state} {r.classification}" if r.state else ""
            lines.append(f"  rank {r.world_rank}: node {str(r.node_id)[:12]}, pid {r.pid}, "
                         f"last committed report {r.last_committed_index}, reached {r.reached_index}{extra}")
    if report.steps:
        named = {s.world_rank for s in report.stragglers}
        lines += ["", "step times of the last attempt (previous report to arrival at the next):"]
        for r in report.steps:
            mark = "  <- straggler" if r.world_rank in named else ""
            lines.append(f"  rank {r.world_rank}: median {r.median_step_s:.3f} s, max {r.max_step_s:.3f} s over "
                         f"{r.reports} report(s){mark}")
    if report.stragglers:
        lines += ["", "stragglers:"] + [f"  {s.describe()}" for s in report.stragglers]
    for d in report.debuggers:
        lines.append(f"debugger: attempt {d.attempt} rank {d.world_rank} listened on {d.host}:{d.port} ({d.reason})")
    if report.live:
        lines += ["", "live stacks:"]
        for s in report.live:
            frame = f" at {s.user_frame}" if s.user_frame else ""
            lines.append(f"  rank {s.world_rank} (pid {s.pid}): {s.classification or 'not dumped'}{frame}"
                         + (f" [{s.error}]" if s.error else ""))
            if stacks and s.stack:
                lines.append(_indent(_highlight_stack(s.stack, [s.user_frame])))
    if report.suggestions:
        lines += ["", "suggestions:"] + [f"  - {s}" for s in report.suggestions]
    return "\n".join(lines)

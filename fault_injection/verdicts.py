"""Verdicts: check a scenario's expectations against a finished run's ``events.jsonl`` and manifest.

Only the run's files count, never in-memory state: what ``trainkit chaos`` says can be
re-checked later from the run folder alone. Pure functions of (events, manifest, the set
of folders in the run directory); runs in the driver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from trainkit import events as ev
from trainkit.errors import TrainingFailedError
from trainkit.result import lineage


@dataclass
class Row:
    name: str
    expected: Any
    observed: Any
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def final_status(events: list) -> Optional[str]:
    done = [e for e in events if isinstance(e, ev.RunFinished)]
    return done[-1].status if done else None


def error_text(events: list, state: Optional[dict]) -> str:
    err = (state or {}).get("error")
    if err is None:
        done = [e for e in events if isinstance(e, ev.RunFinished) and e.error]
        err = done[-1].error if done else None
    return str(TrainingFailedError.from_dict(err)) if err else ""


def world_sizes(events: list) -> list[int]:
    return [e.world_size for e in events if isinstance(e, ev.ReportCommitted)]


def lost_checkpoints(events: list, state: Optional[dict], existing_dirs: Optional[set]) -> list[str]:
    """Problems with the checkpoint lineage (empty: nothing lost)."""
    problems = []
    latest = 0
    for e in events:
        if isinstance(e, ev.ReportCommitted) and e.checkpoint:
            latest = e.index
        elif isinstance(e, ev.AttemptStarted) and e.start_index != latest:
            problems.append(f"attempt {e.attempt} resumed from report {e.start_index}, but report {latest} "
                            "was the latest committed checkpoint")
        elif isinstance(e, ev.RunStarted):
            latest = e.resumed_from_index or 0
    committed = [e for e in events if isinstance(e, ev.ReportCommitted) and e.checkpoint]
    if committed and state is not None:
        last = committed[-1].checkpoint
        if state.get("latest_checkpoint") != last:
            problems.append(f"run_state.json names {state.get('latest_checkpoint')!r} as the latest checkpoint, "
                            f"the event stream {last!r}")
        if existing_dirs is not None:
            for c in state.get("checkpoints", []):
                if c["dir"] not in existing_dirs:
                    problems.append(f"{c['dir']} is in run_state.json but not in storage")
    return sorted(set(problems), key=problems.index)


def recovery_times(events: list) -> list[dict]:
    """Per failure that was retried: the fault (or failure) time to the next report of a later attempt."""
    out = []
    last_fault = None
    for i, e in enumerate(events):
        if isinstance(e, ev.FaultInjected):
            last_fault = e
        if not (isinstance(e, ev.WorkerFailed) and e.will_retry):
            continue
        start = last_fault.time if last_fault is not None and last_fault.time <= e.time else e.time
        nxt = next((r for r in events[i + 1:] if isinstance(r, ev.ReportCommitted) and r.attempt > e.attempt), None)
        out.append({"attempt": e.attempt, "kind": e.kind,
                    "fault": last_fault.action if last_fault is not None else None,
                    "failure_at": e.time, "recovered_at": nxt.time if nxt else None,
                    "recovery_s": round(nxt.time - start, 3) if nxt else None})
        last_fault = None
    return out


def fault_rows(faults: list, events: list) -> list[Row]:
    """One row per fault of the scenario: ``fault0 kill_worker rank 1 at report 3``, expected ``fired``.

    A fault that never fired fails its row (the other rows then say nothing about it) unless
    the fault is ``optional: true``. ``faults`` are the scenario's typed faults, in order.
    """
    from fault_injection import faults as F

    fired: dict = {}
    for e in events:
        if isinstance(e, ev.FaultInjected):
            fired[e.detail.get("fault")] = fired.get(e.detail.get("fault"), 0) + 1
    rows = []
    for i, fault in enumerate(faults):
        fid = F.fault_id(fault, i)
        n = fired.get(fid, 0)
        observed = "never fired" if not n else "fired" if n == 1 else f"fired {n} times"
        rows.append(Row(F.describe(fault, fid), "fired (optional)" if fault.optional else "fired", observed,
                        bool(n) or fault.optional))
    return rows


DEFAULT_STATUS = "finished"  # the expectation of a scenario that sets none: the run finished


def check(expect, events: list, state: Optional[dict], existing_dirs: Optional[set] = None) -> list[Row]:
    """One row per expectation the scenario sets (``expect`` is a ``scenario.Expect``); with none set, the
    default one: ``default: run finished``."""
    if expect.is_default:
        got = final_status(events)
        return [Row("default: run finished", DEFAULT_STATUS, got, got == DEFAULT_STATUS)]
    return _check(expect, events, state, existing_dirs)


def _check(expect, events: list, state: Optional[dict], existing_dirs: Optional[set]) -> list[Row]:
    rows = []
    sizes = world_sizes(events)
    if expect.status is not None:
        got = final_status(events)
        rows.append(Row("status", expect.status, got, got == expect.status))
    if expect.restarts is not None:
        got = sum(1 for e in events if isinstance(e, ev.GroupRestarted))
        rows.append(Row("restarts", expect.restarts, got, got == expect.restarts))
    if expect.final_world_size is not None:
        got = sizes[-1] if sizes else None
        rows.append(Row("final_world_size", expect.final_world_size, got, got == expect.final_world_size))
    if expect.min_world_size is not None:
        got = min(sizes) if sizes else None
        rows.append(Row("min_world_size", expect.min_world_size, got, got == expect.min_world_size))
    if expect.reports is not None:
        indices = [i for i, _ in lineage(events)]
        ok = indices == list(range(1, expect.reports + 1))
        got = len(indices) if ok else _describe_indices(indices)
        rows.append(Row("reports", expect.reports, got, ok))
    if expect.no_lost_checkpoints is not None:
        problems = lost_checkpoints(events, state, existing_dirs)
        got = not problems
        rows.append(Row("no_lost_checkpoints", expect.no_lost_checkpoints,
                        got if got else "; ".join(problems), got == expect.no_lost_checkpoints))
    if expect.error_contains is not None:
        text = error_text(events, state)
        first = text.splitlines()[0] if text else ""
        rows.append(Row("error_contains", expect.error_contains, first[:200] or None,
                        expect.error_contains in text))
    if expect.max_recovery_s is not None:
        rec = [r["recovery_s"] for r in recovery_times(events)]
        got = max((r for r in rec if r is not None), default=None)
        ok = all(r is not None and r <= expect.max_recovery_s for r in rec)
        rows.append(Row("max_recovery_s", expect.max_recovery_s, got if None not in rec else "never recovered", ok))
    return rows


def _describe_indices(indices: list[int]) -> str:
    if not indices:
        return "no reports"
    missing = sorted(set(range(1, max(indices) + 1)) - set(indices))
    dup = sorted({i for i in indices if indices.count(i) > 1})
    parts = [f"{len(indices)} reports (1..{max(indices)})"]
    if missing:
        parts.append(f"missing {missing[:10]}")
    if dup:
        parts.append(f"repeated {dup[:10]}")
    return ", ".join(parts)

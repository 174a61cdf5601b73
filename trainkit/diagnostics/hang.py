"""The controller's hang monitor: one asyncio task per attempt, in the controller actor.

It shows the ``Watchdog`` (trainkit.diagnostics.watchdog) the attempt's open barrier round
and its progress whenever the barrier changes, and sleeps until the watchdog's next
deadline otherwise. On a hang it dumps every rank of the group in parallel (missing and
waiting ones; trainkit.diagnostics.stacks), classifies the stacks
(trainkit.diagnostics.classify), writes ``diagnostics/hang-<index>-<time>/rank-<r>.txt``
and ``summary.json`` through the run's ``RunStore``, emits ``hang_detected``, logs the
one-line summary, and then, by ``HangConfig.action``:

* ``warn``: keeps watching; the watchdog repeats the report with back-off.
* ``fail`` / ``restart``: returns a ``HangEnd``, the decision to end the attempt with
  ``kind="hang"`` failures (and for ``fail`` the ``HangDetectedError`` the run ends with).
  The controller acts on it; the monitor changes no controller state.

It reads the run's ``store`` and ``ledger`` and the attempt's ``number``, ``group`` and
``barrier``, and never blocks the event loop: dumps run in threads or pinned Ray tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Optional

from trainkit import events as ev
from trainkit.diagnostics import stacks
from trainkit.diagnostics.classify import classify_dump, parse_dump, training_thread
from trainkit.diagnostics.watchdog import Hang, Observation, Watchdog, summary_line
from trainkit.errors import HangDetectedError, NCCLHangError, WorkerFailure
from trainkit.storage import DIAGNOSTICS

logger = logging.getLogger("trainkit.hang")


@dataclass(frozen=True)
class HangEnd:
    """The monitor's decision: end the attempt with ``failures``; the run fails with ``error`` when
    it is set (``HangConfig(action="fail")``), else the group restarts (``"restart"``)."""

    failures: tuple
    error: Optional[HangDetectedError]
    why: str


def start(run, attempt) -> Optional[asyncio.Future]:
    """Start the monitor for ``attempt`` of ``run``: a task whose result is a ``HangEnd`` or None
    (None when hang detection is off)."""
    hc = run.spec.run_config.hang_config
    if hc is None or not hc.timeout_s:
        return None
    return asyncio.ensure_future(_monitor(run, attempt, hc))


def stop(task: Optional[asyncio.Future]) -> None:
    if task is not None and not task.done():
        task.cancel()


async def _monitor(run, attempt, hc) -> Optional[HangEnd]:
    dog = Watchdog(hc.timeout_s, repeat=hc.action == "warn")
    barrier = attempt.barrier
    log = run.ledger.events.events
    cursor = len(log)
    committed = run.ledger.latest_index  # the report the attempt resumed from, then each one it commits
    last_progress = time.monotonic()
    rounds = barrier.rounds
    try:
        while run.attempt is attempt:
            barrier.changed.clear()
            now = time.monotonic()
            if barrier.rounds != rounds:  # a round completed (a report committed, a collective passed)
                rounds, last_progress = barrier.rounds, now
            for e in log[cursor:]:
                if isinstance(e, ev.ReportCommitted) and e.attempt == attempt.number:
                    committed = e.index
            cursor = len(log)
            rnd = barrier.round
            obs = Observation(now=now, world_size=attempt.world_size, committed_index=committed,
                              last_progress=last_progress, round_key=rnd.key if rnd else None,
                              round_started=rnd.started if rnd else 0.0,
                              arrived=frozenset(rnd.arrivals) if rnd else frozenset())
            hang = dog.check(obs)
            if hang is not None:
                end = await handle(run, attempt, hc, hang)
                if end is not None:
                    return end
                continue
            deadline = dog.next_deadline()
            try:
                await asyncio.wait_for(barrier.changed.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - diagnostics must never take the run down
        logger.exception("trainkit: the hang monitor failed")
    return None


async def handle(run, attempt, hc, hang: Hang) -> Optional[HangEnd]:
    """Dump, classify, write the evidence and emit the event; the decision to end the attempt
    (``fail`` / ``restart``) or None (``warn``)."""
    group = attempt.group
    t0 = time.monotonic()
    targets = []
    for r, b in enumerate(group.ranks):
        info = group.infos[b]
        targets.append((r, info.get("node_id", ""), info.get("pid")))
    dumps = await stacks.capture(targets, hc.dump)
    dump_s = round(time.monotonic() - t0, 4)
    rows = []
    for r, node, pid in targets:
        d = dumps.get(r) or {"text": "", "method": "none", "error": "not dumped", "alive": True}
        c = classify_dump(d.get("text", ""), alive=d.get("alive", True))
        row = {"world_rank": r, "state": "missing" if r in hang.missing_ranks else "waiting", "node_id": node,
               "pid": pid, "dump": d.get("method"), "dump_s": d.get("dump_s"), "error": d.get("error", ""),
               "file": f"rank-{r}.txt", **c.to_dict()}
        if row["state"] == "waiting":
            row["description"] = "waiting at the barrier"
        rows.append((row, d.get("text", "")))
    by_rank = {row["world_rank"]: row for row, _ in rows}
    summary = summary_line(hang, by_rank)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime()) + f"-{int(time.time() * 1000) % 1000:03d}"
    folder = f"hang-{hang.index}-{stamp}"
    doc = {"version": 1, "kind": hang.kind, "attempt": attempt.number, "index": hang.index, "at": hang.at,
           "detected_at": time.time(), "waited_s": hang.waited_s, "timeout_s": hc.timeout_s, "action": hc.action,
           "repeat": hang.repeat, "missing_ranks": list(hang.missing_ranks), "waiting_ranks": list(hang.waiting_ranks),
           "summary": summary, "dump_s": dump_s, "ranks": [row for row, _ in rows]}
    files = {f"rank-{row['world_rank']}.txt": _rank_file(row, text) for row, text in rows}
    files["summary.json"] = json.dumps(ev.jsonable(doc), indent=1)
    try:
        if run.store.local:
            _write(run.store, folder, files)
        else:
            await asyncio.to_thread(_write, run.store, folder, files)
    except Exception as e:  # noqa: BLE001 - still emit the event and act
        logger.warning("trainkit: could not write %s/%s: %s", DIAGNOSTICS, folder, e)
    run.ledger.emit(ev.HangDetected(
        attempt=attempt.number, index=hang.index, missing_ranks=tuple(hang.missing_ranks), waited_s=hang.waited_s,
        summary=summary, diagnostics=f"{DIAGNOSTICS}/{folder}",
        ranks=tuple({"world_rank": row["world_rank"], "state": row["state"],
                     "classification": row["classification"], "user_frame": row["user_frame"]}
                    for row, _ in rows)), flush=True)
    again = " (still)" if hang.repeat else ""
    logger.warning("trainkit: %s%s [%s/%s]", summary, again, DIAGNOSTICS, folder)
    print(f"trainkit: {summary}{again} [evidence: {run.store.uri}/{DIAGNOSTICS}/{folder}]", file=sys.stderr,
          flush=True)
    if hc.action not in ("fail", "restart"):
        return None
    failures = _hang_failures(hang, [r for r, _ in rows], {r["world_rank"]: t for r, t in rows})
    cls = hang_error_class([by_rank[r]["classification"] for r in hang.missing_ranks if r in by_rank],
                           getattr(run.spec.torch_config, "backend", None))
    return HangEnd(tuple(failures), cls(summary, failures) if hc.action == "fail" else None,
                   f"hang detected: {summary}")


def hang_error_class(missing_classifications: list, backend: Optional[str]) -> type:
    """``NCCLHangError`` (Ray's name, a ``HangDetectedError``) when a missing rank is stuck in a
    torch.distributed collective on the NCCL backend; ``HangDetectedError`` otherwise.

    >>> hang_error_class(["collective"], "nccl").__name__, hang_error_class(["collective"], "gloo").__name__
    ('NCCLHangError', 'HangDetectedError')
    """
    if backend == "nccl" and "collective" in missing_classifications:
        return NCCLHangError
    return HangDetectedError


def _rank_file(row: dict, text: str) -> str:
    head = (f"# rank {row['world_rank']} ({row['state']}), pid {row['pid']}, node {row['node_id']}\n"
            f"# dump: {row['dump']} in {row['dump_s']} s{'; ' + row['error'] if row['error'] else ''}\n"
            f"# classification: {row['classification']}"
            f"{' at ' + row['user_frame'] if row.get('user_frame') else ''}\n\n")
    return head + (text or "(no stack)\n")


def _write(store, folder: str, files: dict) -> None:
    store.makedirs(f"{DIAGNOSTICS}/{folder}")
    for name, text in files.items():
        store.write_bytes_atomic(f"{DIAGNOSTICS}/{folder}/{name}", text.encode())


def thread_traceback(text: str) -> str:
    """The training thread of a dump as a Python-style traceback (outermost first)."""
    procs = parse_dump(text)
    t = training_thread(procs[0]) if procs else None
    if t is None:
        return ""
    lines = ["Stack of the training thread (most recent call last):"]
    for f in reversed(t.frames):
        lines.append(f'  File "{f.file}", line {f.line}, in {f.function}')
    return "\n".join(lines) + "\n"


def _hang_failures(hang: Hang, rows: list, texts: dict) -> list[WorkerFailure]:
    """One ``kind="hang"`` failure per missing rank, the likeliest cause first."""
    failures = []
    for row in rows:
        if row["state"] != "missing":
            continue
        where = f" in {row['user_frame']}" if row.get("user_frame") else ""
        failures.append(WorkerFailure(
            world_rank=row["world_rank"], node_id=row["node_id"] or "", pid=row["pid"], kind="hang",
            exc_type="HangDetected",
            message=f"not arrived at {hang.at} after {hang.waited_s:.1f} s; {row['classification']}{where}",
            traceback=thread_traceback(texts.get(row["world_rank"], ""))))
    order = {"user_code": 0, "data_loading": 1, "report": 2, "unknown": 3, "collective": 4, "dead": 5}
    cls = {r["world_rank"]: r["classification"] for r in rows}
    failures.sort(key=lambda f: order.get(cls.get(f.world_rank, ""), 9))
    return failures

"""The controller's hang monitor: one asyncio task per attempt, in the controller actor.

Every tick it shows the ``Watchdog`` (trainkit.diagnostics.watchdog) the open barrier
round and the last progress; on a hang it dumps every rank of the group in parallel
(missing and waiting ones; trainkit.diagnostics.stacks), classifies the stacks
(trainkit.diagnostics.classify), writes ``diagnostics/hang-<index>-<time>/rank-<r>.txt``
and ``summary.json`` through the run's ``RunStore``, emits ``hang_detected``, logs the
one-line summary, and then acts on ``HangConfig.action``:

* ``warn``: keep waiting; the watchdog repeats the report with back-off.
* ``fail``: end the attempt; the run fails with ``HangDetectedError`` (``run.hang_error``).
* ``restart``: end the attempt with ``kind="hang"`` failures; the controller restarts the
  group from the latest checkpoint, counting a failure against ``max_failures``.

It reads the controller's ``_Run`` (``round``, ``ledger``, ``attempt``, ``ended``) and
never blocks the event loop: dumps run in threads or pinned Ray tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Optional

from trainkit import events as ev
from trainkit.diagnostics import stacks
from trainkit.diagnostics.classify import classify_dump, parse_dump, training_thread
from trainkit.diagnostics.watchdog import Hang, Observation, Watchdog, summary_line
from trainkit.errors import HangDetectedError, WorkerFailure
from trainkit.storage import DIAGNOSTICS

logger = logging.getLogger("trainkit.hang")


def start(run, group) -> Optional[asyncio.Future]:
    """Start the monitor for the current attempt of ``run`` (None when hang detection is off)."""
    hc = run.spec.run_config.hang_config
    if hc is None or not hc.timeout_s:
        return None
    return asyncio.ensure_future(_monitor(run, group, hc))


def stop(task: Optional[asyncio.Future]) -> None:
    if task is not None and not task.done():
        task.cancel()


async def _monitor(run, group, hc) -> None:
    attempt = run.attempt
    dog = Watchdog(hc.timeout_s, repeat=hc.action == "warn")
    log = run.ledger.events.events
    cursor = len(log)
    committed = run.ledger.latest_index
    last_progress = time.monotonic()
    last_round = None
    tick_s = min(0.05, hc.timeout_s / 20)
    try:
        while run.attempt == attempt and run.group is group:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            for e in log[cursor:]:
                if isinstance(e, ev.ReportCommitted) and e.attempt == attempt:
                    committed, last_progress = e.index, now
            cursor = len(log)
            rnd = run.round
            if last_round is not None and rnd is not last_round:
                last_progress = now  # the round completed
            last_round = rnd
            obs = Observation(now=now, world_size=run.world_size, committed_index=committed,
                              last_progress=last_progress, round_key=rnd.key if rnd else None,
                              round_started=rnd.started if rnd else 0.0,
                              arrived=frozenset(rnd.arrivals) if rnd else frozenset())
            hang = dog.check(obs)
            if hang is None:
                continue
            await handle(run, group, hc, hang)
            if hc.action != "warn":
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - diagnostics must never take the run down
        logger.exception("trainkit: the hang monitor failed")


async def handle(run, group, hc, hang: Hang) -> dict:
    """Dump, classify, write the evidence, emit the event and act. Returns the summary dict."""
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
    doc = {"version": 1, "kind": hang.kind, "attempt": run.attempt, "index": hang.index, "at": hang.at,
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
    doc["written_s"] = round(time.monotonic() - t0, 4)
    run.ledger.emit(ev.HangDetected(
        attempt=run.attempt, index=hang.index, missing_ranks=tuple(hang.missing_ranks), waited_s=hang.waited_s,
        summary=summary, diagnostics=f"{DIAGNOSTICS}/{folder}",
        ranks=tuple({"world_rank": row["world_rank"], "state": row["state"],
                     "classification": row["classification"], "user_frame": row["user_frame"]}
                    for row, _ in rows)), flush=True)
    again = " (still)" if hang.repeat else ""
    logger.warning("trainkit: %s%s [%s/%s]", summary, again, DIAGNOSTICS, folder)
    print(f"trainkit: {summary}{again} [evidence: {run.store.uri}/{DIAGNOSTICS}/{folder}]", file=sys.stderr,
          flush=True)
    if hc.action in ("fail", "restart"):
        _end_attempt(run, hc, hang, summary, [r for r, _ in rows], {r["world_rank"]: t for r, t in rows})
    return doc


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


def _end_attempt(run, hc, hang: Hang, summary: str, rows: list, texts: dict) -> None:
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
    failures.sort(key=lambda f: order.get(next((r["classification"] for r in rows
                                                if r["world_rank"] == f.world_rank), ""), 9))
    if hc.action == "fail":
        run.hang_error = HangDetectedError(summary, failures)
    rnd, run.round = run.round, None
    if rnd is not None and rnd.fut is not None and not rnd.fut.done():
        rnd.fut.set_result(("stop", f"hang detected: {summary}"))
    if run.ended is not None and not run.ended.done():
        run.ended.set_result(failures)

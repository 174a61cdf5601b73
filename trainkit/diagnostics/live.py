"""``trainkit diagnose --live``: fresh stacks of the ranks of a run that is still going.

``live_stacks(report)`` runs py-spy (trainkit.diagnostics.stacks) on the pid of every rank
of the report's last attempt and classifies each dump (trainkit.diagnostics.classify). A
pid is dumped only after its process showed that it is a rank of this run (its claim,
trainkit.diagnostics.claims): a pid that an ``events.jsonl`` names but that belongs to
another process is refused, and the refusal is in the output. It runs in the user's
shell process and sees only the ranks whose processes run on this machine: run it on the
machine where the ranks run. Imported only when ``--live`` is given.
"""

from __future__ import annotations

import time

from trainkit.diagnostics import claims
from trainkit.diagnostics.classify import classify_dump
from trainkit.diagnostics.run_report import LiveStack, RunReport
from trainkit.diagnostics.stacks import dump_local


def live_stacks(report: RunReport) -> tuple[LiveStack, ...]:
    """One ``LiveStack`` per rank of the last attempt; a single note when the run is not running.

    >>> [s.classification for s in live_stacks(load_report("/tmp/trainkit_results/my_run"))]  # doctest: +SKIP
    ['report', 'user_code']
    """
    if report.status != "running":
        return (LiveStack(None, error=f"the run is {report.status}, not running: nothing to dump"),)
    rows = []
    for r in report.ranks:
        t0 = time.monotonic()
        refused = claims.check(int(r.pid), report.run) if r.pid else "no pid"
        if refused:
            rows.append(LiveStack(r.world_rank, r.pid, error=f"refused: {refused}"))
            continue
        dump = dump_local(int(r.pid), mode="py-spy")
        c = classify_dump(dump["text"], alive=dump.get("alive", True))
        rows.append(LiveStack(r.world_rank, r.pid, dump["text"], c.classification, c.user_frame,
                              dump.get("error", ""), round(time.monotonic() - t0, 3)))
    return tuple(rows)

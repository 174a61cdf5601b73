"""``trainkit diagnose --live``: fresh stacks of the ranks of a run that is still going.

``live_stacks(report)`` runs py-spy (trainkit.diagnostics.stacks) on the pid of every rank
of the report's last attempt and classifies each dump (trainkit.diagnostics.classify). A
pid is dumped only after its process showed, on its own node, that it is a rank of this
run (its claim, trainkit.diagnostics.claims): a pid that an ``events.jsonl`` names but
that belongs to another process is refused, and the refusal is in the output.

Ranks run on several nodes: when this process can reach the run's Ray cluster (it is a
Ray driver already, or ``RAY_ADDRESS`` names the cluster), each node's ranks
are checked and dumped by a task pinned to that node (``stacks.on_node``, as the hang
watchdog does), so a rank on another machine is dumped there. Without a cluster it dumps
the ranks on this machine only, and says so. Runs in the user's shell process; imported
only when ``--live`` is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

from trainkit.diagnostics import claims
from trainkit.diagnostics.classify import classify_dump
from trainkit.diagnostics.run_report import LiveStack, RunReport
from trainkit.diagnostics.stacks import dump_local, on_node

NODE_DUMP_TIMEOUT_S = 20.0


def dump_claimed(items: list, run_uri: str) -> list[dict]:
    """On a rank's node: for each ``(world_rank, pid)``, refuse a pid that is not a rank of
    ``run_uri``, dump the others. Returns one dict per item (``refused`` or a dump)."""
    import sys

    here = None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        here = sys.modules["ray"].get_runtime_context().get_node_id()
    out = []
    for _, pid in items:
        refused = claims.check(int(pid), run_uri) if pid else "no pid"
        out.append({"refused": refused} if refused else dict(dump_local(int(pid), mode="py-spy"), node=here))
    return out


def _row(rank, pid, got: dict, t0: float) -> LiveStack:
    if got.get("refused"):
        return LiveStack(rank, pid, error=f"refused: {got['refused']}")
    c = classify_dump(got.get("text", ""), alive=got.get("alive", True))
    return LiveStack(rank, pid, got.get("text", ""), c.classification, c.user_frame, got.get("error", ""),
                     round(time.monotonic() - t0, 3), got.get("node"))


def _connect_ray() -> bool:
    """Whether this process is (or now becomes, through ``RAY_ADDRESS``) a driver of the ranks' cluster."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return True
    if not os.environ.get("RAY_ADDRESS"):
        return False
    import ray

    try:
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.ERROR, log_to_driver=False)
        return True
    except (ConnectionError, RuntimeError, ValueError):  # no cluster to join: this machine only
        return False


async def _dump_by_node(by_node: dict, run_uri: str) -> dict:
    jobs = {node: on_node(node, dump_claimed, items, run_uri, timeout_s=NODE_DUMP_TIMEOUT_S)
            for node, items in by_node.items()}
    results = await asyncio.gather(*jobs.values(), return_exceptions=True)
    return dict(zip(jobs, results))


def live_stacks(report: RunReport, *, use_ray: Optional[bool] = None) -> tuple[LiveStack, ...]:
    """One ``LiveStack`` per rank of the last attempt; a single note when the run is not running.

    >>> [s.classification for s in live_stacks(load_report("/tmp/trainkit_results/my_run"))]  # doctest: +SKIP
    ['report', 'user_code']
    """
    if report.status != "running":
        return (LiveStack(None, error=f"the run is {report.status}, not running: nothing to dump"),)
    t0 = time.monotonic()
    remote = any(r.node_id not in ("", "local") for r in report.ranks)
    if use_ray is None:
        use_ray = remote and _connect_ray()
    rows = []
    if not use_ray:
        for r in report.ranks:
            (got,) = dump_claimed([(r.world_rank, r.pid)], report.run)
            rows.append(_row(r.world_rank, r.pid, got, t0))
        if remote:
            rows.append(LiveStack(None, error="not connected to the run's Ray cluster (set RAY_ADDRESS to dump "
                                              "ranks on other nodes): only the ranks on this machine were dumped"))
        return tuple(rows)
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    by_node: dict[str, list] = {}
    for r in report.ranks:
        if r.node_id in alive:
            by_node.setdefault(r.node_id, []).append((r.world_rank, r.pid))
        else:  # not a node of the cluster this process is connected to: this machine, if anywhere
            (got,) = dump_claimed([(r.world_rank, r.pid)], report.run)
            rows.append(_row(r.world_rank, r.pid, got, t0))
    results = asyncio.run(_dump_by_node(by_node, report.run)) if by_node else {}
    for node, items in by_node.items():
        got = results[node]
        for i, (rank, pid) in enumerate(items):
            if isinstance(got, BaseException):
                rows.append(LiveStack(rank, pid, error=f"not dumped: the task on node {node[:12]} failed: "
                                                       f"{type(got).__name__}: {got}"))
            else:
                rows.append(_row(rank, pid, got[i], t0))
    return tuple(sorted(rows, key=lambda s: (s.world_rank is None, s.world_rank)))

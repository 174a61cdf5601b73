"""Attempt supervision: run every rank of a group and watch until the attempt ends.

``supervise`` starts each rank's ``run()`` on its worker, then waits on three things at
once: the ranks' records (a finish, an exception, a death), the attempt's ``ended`` future
(a mismatch, a failed commit, a stop after a commit, an abort) and the hang monitor's
decision. After the first failure it collects the others for ``FAILURE_WINDOW_S`` so that
the root cause comes first (or less, once every other rank waits in the barrier, where no
failure of its own can come from), closes the barrier, keeps the ranks that return at once (their
processes are reused by a repaired group) and returns the ``Outcome`` that ``decide`` reads.

Runs in the controller actor.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import RayError

from trainkit.backends import barrier as br
from trainkit.backends.decide import Outcome, root_cause_first
from trainkit.backends.ray.state import Attempt, Run
from trainkit.backends.ray.worker_group import resolve
from trainkit.backends.ray.capacity import alive_nodes
from trainkit.diagnostics import hang as hang_monitor
from trainkit.diagnostics import memory, stacks
from trainkit.errors import ReportError, WorkerFailure

FAILURE_WINDOW_S = 0.3  # after the first failure, wait this long to collect the others (root cause first)
UNBLOCK_WAIT_S = 0.5  # after an attempt ends, how long its ranks may take to return (else they are replaced)
RELEASED_WAIT_S = 5.0  # and a rank that was waiting in the barrier, known to be released, this much more
OOM_CHECK_S = 2.0  # how long the node of a dead rank may take to say whether it died for memory

logger = logging.getLogger("trainkit.controller")


async def supervise(run: Run, attempt: Attempt, hooks: list, controller) -> Outcome:
    """Run every rank until all finished or the attempt ended; how it ended."""
    spec, group = run.spec, attempt.group
    start = {"dir": run.ledger.state["latest_checkpoint"], "index": run.ledger.latest_index}
    tasks: dict[asyncio.Future, int] = {}
    for r, b in enumerate(group.ranks):
        gi = group.infos[b]
        info = {"world_rank": r, "world_size": attempt.world_size, "attempt": attempt.number,
                **{k: gi[k] for k in ("local_rank", "local_world_size", "node_rank", "node_id")}}
        log_path = f"logs/attempt-{attempt.number}/rank-{r}.log"  # relative to the run folder
        ref = group.workers[b].run.remote(run.fn_bytes, spec.takes_config, spec.train_loop_config, info,
                                          run.store, controller, run.run_id, start, spec.datasets, hooks, log_path,
                                          run.channel)
        tasks[asyncio.ensure_future(resolve(ref))] = r
    monitor = hang_monitor.start(run, attempt)  # None unless HangConfig.timeout_s is set
    failures: list[WorkerFailure] = []
    pending = set(tasks)
    first_failure_at = None
    while pending:
        timeout = None if first_failure_at is None else max(0.0, first_failure_at + FAILURE_WINDOW_S
                                                             - time.monotonic())
        watched = pending | {attempt.ended} | ({monitor} if monitor is not None else set())
        done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            break  # failure window over
        if monitor in done:
            end, monitor = monitor.result(), None
            if end is not None:  # the hang monitor's decision: end the attempt
                attempt.hang_error = end.error
                attempt.barrier.close(("stop", end.why))
                attempt.end(list(end.failures))
        if attempt.ended in done:
            failures += [f for f in attempt.ended.result() if all(f.world_rank != g.world_rank for g in failures)]
            first_failure_at = first_failure_at or time.monotonic()
            attempt.ended = asyncio.get_running_loop().create_future()  # later failures go to the same list
        for t in done & tasks.keys():
            pending.discard(t)
            _rank_returned(run, attempt, tasks[t], t.result(), failures)
            if failures and first_failure_at is None:
                first_failure_at = time.monotonic()
        if failures and _all_waiting(attempt, [tasks[t] for t in pending]):
            break  # every other rank waits in the barrier: nothing more can come from them
    hang_monitor.stop(monitor)
    seen = dict(returned=frozenset(attempt.returned), preempted=frozenset(attempt.preempted),
                elastic=spec.scaling_config.elastic, min_workers=spec.scaling_config.min_workers,
                aborted=run.aborted, hang_error=attempt.hang_error)
    if not failures and len(attempt.finished) == attempt.world_size:
        return Outcome(value=attempt.finished.get(0, {}).get("value"), **seen)
    closed = attempt.barrier.close(("stop", "the attempt ended"))
    if pending:
        # ranks waiting in a trainkit barrier return at once when it is closed: their processes
        # are healthy and kept for the repaired group (ranks stuck in a gloo collective or in
        # user code are not, and are replaced)
        done, pending = await asyncio.wait(pending, timeout=UNBLOCK_WAIT_S)
        released = set(closed.arrivals) if closed is not None else set()
        if attempt.stop is not None:  # stopped after a commit: every rank had the reply
            released = set(range(attempt.world_size))
        slow = {t for t in pending if tasks[t] in released}
        if slow:  # released from the barrier but slow to return (a loaded machine): worth more than a restart
            more, _ = await asyncio.wait(slow, timeout=RELEASED_WAIT_S)
            done, pending = done | more, pending - more
        for t in done:
            if "died" in t.result():  # it had arrived, then died: a failure of its own, not reusable
                _rank_returned(run, attempt, tasks[t], t.result(), failures)
            else:
                attempt.returned.add(tasks[t])
        seen["returned"] = frozenset(attempt.returned)
    for t in pending:
        t.cancel()
    failures = failures or [WorkerFailure(world_rank=-1, kind="interrupted", message="attempt interrupted")]
    await _tell_oom(failures, attempt)
    return Outcome(failures=tuple(root_cause_first(failures)), **seen)


def _all_waiting(attempt: Attempt, ranks: list) -> bool:
    """Whether every rank in ``ranks`` waits in the open round of the barrier (then the failure
    window can end at once: a rank blocked in trainkit's barrier has no failure of its own to tell)."""
    rnd = attempt.barrier.round
    return rnd is not None and all(r in rnd.arrivals for r in ranks)


def _rank_returned(run: Run, attempt: Attempt, r: int, rec: dict, failures: list) -> None:
    """Rank ``r``'s ``run()`` call ended with ``rec``: a finish, an exception or a death."""
    if "died" in rec:
        run.capacity.worker_died(attempt.group.info(r)["node_id"])
        failures.append(attempt.failure(r, kind="preempted" if r in attempt.preempted else "died",
                                        exc_type="WorkerDied", message=rec["died"]))
    else:
        attempt.returned.add(r)
    if rec.get("ok"):
        attempt.finished[r] = rec
        rnd = attempt.barrier.round
        if rnd is not None and rnd.arrivals:  # the ranks waiting in it can never be released
            end_with_mismatch(attempt, r, br.returned_while_waiting(r, rec.get("index", 0), list(rnd.arrivals),
                                                                 rnd.key))
    elif "failure" in rec and all(g.world_rank != r for g in failures):
        f = rec["failure"]  # api.failure_from on the rank, kind "exception" or "mismatch"
        failures.append(attempt.failure(r, kind=f.kind, exc_type=f.exc_type, message=f.message,
                                        traceback=f.traceback))
    # "interrupted": the controller ended the attempt; the reason is in failures already


def end_with_mismatch(attempt: Attempt, rank: int, err: ReportError) -> None:
    """``rank`` broke the barrier's rules: its waiting peers get ``err``, and the attempt ends."""
    attempt.barrier.close(("error", err))
    attempt.end([attempt.failure(rank, kind="mismatch", exc_type="ReportError", message=str(err))])


async def _tell_oom(failures: list, attempt: Attempt) -> None:
    """A dead rank whose node shows it died for memory becomes ``kind="oom"``, with its samples."""
    deaths = [f for f in failures if f.kind == "died" and f.pid]
    if not deaths:
        return
    alive = alive_nodes()
    for f in deaths:
        if f.node_id not in alive:  # a lost node answers no task: a node death, not an OOM
            continue
        try:
            verdict = await stacks.on_node(f.node_id, memory.oom_verdict, int(f.pid), f.message,
                                           timeout_s=OOM_CHECK_S,
                                           host=(attempt.group.info(f.world_rank) or {}).get("host"))
        except (asyncio.TimeoutError, RayError) as e:
            logger.debug("no OOM verdict for rank %s: %s", f.world_rank, e)
            continue
        if verdict:
            f.kind, f.message, f.memory = "oom", memory.describe(verdict), verdict

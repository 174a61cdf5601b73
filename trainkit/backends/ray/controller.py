"""The controller: an async Ray actor (``num_cpus=0``) that runs fits on groups of ``RankWorker``s.

One controller per driver process and cluster, reused across fits, so that healthy
worker groups stay warm between fits (a new fit with the same shape reuses them).
For each run it keeps the ``RunLedger``, the open barrier round and the attempt loop:

    start group (placement group, actors, torch.distributed)  ->  run on every rank
    ->  rounds: every rank arrives with the same (operation, sequence) key; the last
        arrival commits (reports through the ledger) and releases all
    ->  an exception, a dead actor or a mismatch ends the attempt: the group is killed
        at once and restarted from the latest committed checkpoint while
        ``FailureConfig.max_failures`` allows; past it the run fails.

Runs in the controller actor's process. The controller dies with the driver, and the
workers with the controller (Ray owner semantics), so no worker outlives its driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainkit import events as ev
from trainkit.config import PROCESS_GROUP_TIMEOUT_S
from trainkit.diagnostics import hang as hang_monitor
from trainkit.errors import (CheckpointError, ControllerError, HangDetectedError, ReportError, TrainingFailedError,
                             WorkerFailure, WorkerGroupError)
from trainkit.ledger import RunLedger
from trainkit.policies import (FailureDecision, count_fitting_workers, decide_failure, decide_group_size,
                               decide_resize)
from trainkit.storage import RunStore

from trainkit.backends.ray.worker import RankWorker

class _NotPlaced(Exception):
    """An elastic group of this size could not be placed quickly; try a smaller one."""


logger = logging.getLogger("trainkit.controller")

_FAILURE_WINDOW_S = 0.3
_UNBLOCK_WAIT_S = 0.5  # after an attempt ends, how long ranks released from a barrier may take to return  # after the first failure, wait this long to collect the others (root cause first)


@dataclass
class _Group:
    key: tuple
    pg: Any
    workers: list  # in bundle order
    infos: list  # setup() records, bundle order
    ranks: list = field(default_factory=list)  # world rank -> bundle index

    def kill(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass


@dataclass
class _Round:
    key: tuple  # ("report", index) or (op, seq)
    started: float
    arrivals: dict = field(default_factory=dict)  # world rank -> payload
    fut: Optional[asyncio.Future] = None


class _Run:
    def __init__(self, run_id: str, spec, fn_bytes: bytes):
        self.run_id = run_id
        self.spec = spec
        self.fn_bytes = fn_bytes
        rc = spec.run_config
        self.store = RunStore(rc.storage_path, rc.name, rc.storage_filesystem)
        self.ledger: Optional[RunLedger] = None
        self.attempt = 0
        self.world_size = 0
        self.group: Optional[_Group] = None
        self.round: Optional[_Round] = None
        self.finished: dict[int, dict] = {}  # world rank -> run() record, this attempt
        self.ended: Optional[asyncio.Future] = None  # set with a list of WorkerFailure to end the attempt
        self.aborted = False
        self.preempted: dict[int, tuple] = {}  # world rank -> (node_id, deadline), this attempt
        self.stop: Optional[WorkerFailure] = None  # set at a commit: end the attempt after it (resize, preemption)
        self.last_resize_check = 0.0
        self.grow_backoff_s = 1.0  # doubled after a grow that could not be placed
        self.grow_probe: Optional[asyncio.Future] = None  # a placement probe for extra workers, in flight
        self.grow_ready = 0  # extra workers a probe could place: grow at the next checkpointed report
        self.returned: set[int] = set()  # world ranks whose run() returned (their process is reusable)
        self.carry: Optional[_Group] = None  # a repaired group for the next attempt
        self.suspect: dict[str, float] = {}  # node id -> when a worker died there (may be a lost node)
        self.doomed: dict[str, float] = {}  # node id -> until when it is distrusted (a preemption notice)
        self.hang_error = None  # set by the hang monitor (HangConfig(action="fail")): the run ends with it
        self.progress: dict = {"index": 0, "metrics": None, "world_size": 0, "attempt": 0, "status": "starting"}


def _rank_failure(run: "_Run", rank: int, **kw) -> WorkerFailure:
    """A failure of ``rank`` with its node and pid filled in from the current group."""
    g = run.group
    info = g.infos[g.ranks[rank]] if g is not None and 0 <= rank < len(g.ranks) else {}
    return WorkerFailure(world_rank=rank, node_id=info.get("node_id", ""), pid=info.get("pid"), **kw)


def _describe_ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


class Controller:
    def __init__(self):
        self.runs: dict[str, _Run] = {}
        self.idle: list[_Group] = []

    async def ping(self) -> bool:
        return True

    # -- the attempt loop ---------------------------------------------------------------
    async def run(self, run_id: str, spec, fn_bytes: bytes):
        run = _Run(run_id, spec, fn_bytes)
        self.runs[run_id] = run
        try:
            return ("ok", await self._run(run))
        except TrainingFailedError as e:
            # Errors raised before an attempt ends (resources that can never fit, placement
            # timeouts) have not finished the ledger yet: Result.from_path must show them too.
            if run.ledger is not None and run.ledger.state.get("status") == "running":
                run.ledger.finish("failed", e)
            return ("error", e)
        except Exception as e:  # noqa: BLE001 - an internal error still ends the run cleanly
            import traceback

            err = ControllerError(f"{type(e).__name__}: {e}", [WorkerFailure(
                world_rank=-1, kind="controller", exc_type=type(e).__name__, message=str(e),
                traceback=traceback.format_exc())])
            if run.ledger is not None:
                run.ledger.finish("failed", err)
            return ("error", err)
        finally:
            for g in (run.group, run.carry):  # after an internal error: never leave workers or resources held
                if g is not None:
                    g.kill()
            self.runs.pop(run_id, None)

    async def _run(self, run: _Run):
        spec = run.spec
        rc = spec.run_config
        sc = spec.scaling_config
        run.ledger = ledger = await asyncio.to_thread(
            RunLedger, run.store, rc.checkpoint_config, backend="ray", num_workers=sc.num_workers)
        for cb in rc.callbacks:
            if hasattr(cb, "on_event"):
                ledger.events.subscribe(cb.on_event)
        hooks = [cb.worker_hook() for cb in rc.callbacks if hasattr(cb, "worker_hook")]
        fc = rc.failure_config
        last_size = 0
        while True:
            size = await self._choose_size(run)
            start_tries = 0
            while True:
                try:
                    group = await self._start_group(run, size, quick=sc.elastic and size > sc.min_workers)
                    break
                except _NotPlaced:
                    # elastic: a lost node may still look alive; a failed grow falls back to the old size
                    if last_size and last_size < size:
                        run.grow_backoff_s = min(run.grow_backoff_s * 2, 60.0)
                    size = max(size - 1, sc.min_workers, last_size if last_size < size else 0)
                except ray.exceptions.RayError as e:
                    # a worker (or its node) died while the group was starting: nothing ran yet, so
                    # nothing is lost; start again on what is left, a few times
                    start_tries += 1
                    if start_tries > _START_RETRIES:
                        raise
                    logger.debug("run %s: a worker died while the group started (%s); again", run.run_id, e)
                    await asyncio.sleep(1.0)  # let Ray notice a lost node
                    size = await self._choose_size(run)
            logger.debug("run %s: starting a group of %d (last %d)", run.run_id, size, last_size)
            if last_size and size != last_size:
                ledger.emit(ev.Resized(attempt=run.attempt + 1, old_world_size=last_size, new_world_size=size,
                                       reason="grow" if size > last_size else "shrink"))
            last_size = size
            run.group = group
            ranks = [{"world_rank": r, "local_rank": group.infos[b]["local_rank"],
                      "node_rank": group.infos[b]["node_rank"], "node_id": group.infos[b]["node_id"],
                      "pid": group.infos[b]["pid"]} for r, b in enumerate(group.ranks)]
            run.attempt = ledger.start_attempt(size, ranks)
            run.world_size = size
            run.finished = {}
            run.returned = set()
            run.round = None
            run.preempted = {}
            run.stop = None
            run.grow_ready = 0
            if run.grow_probe is not None:
                run.grow_probe.cancel()
                run.grow_probe = None
            run.ended = asyncio.get_running_loop().create_future()
            run.progress.update(attempt=run.attempt, world_size=size, status="running")
            outcome, payload = await self._watch(run, group, hooks)
            if outcome == "finished":
                self._release(group, healthy=not run.preempted)  # a noticed worker is going away: not kept warm
                run.group = None
                ledger.finish("finished")
                run.progress["status"] = "finished"
                return ledger.result(return_value=payload)
            failures: list[WorkerFailure] = payload
            run.group = None
            if run.aborted:
                group.kill()
                err = WorkerGroupError("the run was aborted (Ctrl-C or a dead driver)", failures)
                ledger.record_failure(run.attempt, failures, will_retry=False)
                ledger.finish("aborted", err)
                raise err
            if failures[0].kind == "resize":
                await self._discard(run, group)
                ledger.end_attempt("resized")
                continue
            # Decide and record first: the failure is in the event stream at once, not after a worker start.
            preemption = any(f.kind == "preempted" for f in failures)
            if preemption:
                ledger.preemptions += 1
            else:
                ledger.failures += 1
            retryable = not any(f.kind == "mismatch" for f in failures) and run.hang_error is None
            decision = decide_failure(ledger.failures, fc.max_failures, retryable=retryable,
                                      preemption=preemption, preemptions_so_far=ledger.preemptions,
                                      max_preemptions=fc.max_preemptions)
            will_retry = decision is FailureDecision.RETRY
            ledger.record_failure(run.attempt, failures, will_retry=will_retry,
                                  kind="preemption" if preemption else
                                  "hang" if failures[0].kind == "hang" else "failure")
            if not will_retry:
                group.kill()
                why = ("ranks disagree about report()/collective calls" if not retryable else
                       f"{ledger.failures} failure(s), max_failures={fc.max_failures}")
                err = run.hang_error or (HangDetectedError if failures[0].kind == "hang" else WorkerGroupError)(
                    f"{why}; root cause: {failures[0].headline()}", failures)
                ledger.finish("failed", err)
                run.progress["status"] = "failed"
                raise err
            reusable = {group.ranks[r] for r in run.returned if r not in run.preempted}  # a noticed rank is going away
            if not sc.elastic and reusable and not preemption and run.hang_error is None:
                # keep the ranks that returned; start only the dead or stuck ones (one worker start)
                run.carry = await self._repair(run, group, reusable)
            else:
                await self._discard(run, group)
            if preemption:
                await self._wait_preempted_nodes(run)
            ledger.emit(ev.GroupRestarted(attempt=run.attempt + 1, reason=failures[0].headline(),
                                          from_index=ledger.latest_index))

    async def _watch(self, run: _Run, group: _Group, hooks: list):
        """Run every rank; return ("finished", rank-0 value) or ("failed", [WorkerFailure, ...])."""
        spec = run.spec
        start = {"dir": run.ledger.state["latest_checkpoint"], "index": run.ledger.latest_index}
        me = ray.get_runtime_context().current_actor
        tasks: dict[asyncio.Future, int] = {}
        for r, b in enumerate(group.ranks):
            info = {"world_rank": r, "world_size": run.world_size, "local_rank": group.infos[b]["local_rank"],
                    "local_world_size": group.infos[b]["local_world_size"],
                    "node_rank": group.infos[b]["node_rank"], "node_id": group.infos[b]["node_id"],
                    "attempt": run.attempt}
            log_path = f"logs/attempt-{run.attempt}/rank-{r}.log"  # relative to the run folder
            ref = group.workers[b].run.remote(run.fn_bytes, spec.takes_config, spec.train_loop_config, info,
                                              run.store, me, run.run_id, start, spec.datasets, hooks, log_path)
            tasks[asyncio.ensure_future(_resolve(ref))] = r
        watchdog = hang_monitor.start(run, group)  # None unless HangConfig.timeout_s is set
        failures: list[WorkerFailure] = []
        pending = set(tasks)
        first_failure_at = None
        while pending:
            timeout = None
            if first_failure_at is not None:
                timeout = max(0.0, first_failure_at + _FAILURE_WINDOW_S - time.monotonic())
            waiting = pending | {run.ended}
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break  # failure window over
            if run.ended in done:
                for f in run.ended.result():
                    if all(f.world_rank != g.world_rank for g in failures):
                        failures.append(f)
                if first_failure_at is None:
                    first_failure_at = time.monotonic()
                run.ended = asyncio.get_running_loop().create_future()  # later failures go to the same list
            for t in done - {run.ended}:
                if t not in tasks:
                    continue
                pending.discard(t)
                r = tasks[t]
                rec = t.result()
                info = group.infos[group.ranks[r]]
                if "died" in rec:
                    kind = "preempted" if r in run.preempted else "died"
                    run.suspect[info["node_id"]] = time.monotonic()
                    failures.append(WorkerFailure(world_rank=r, node_id=info["node_id"], pid=info["pid"],
                                                  kind=kind, exc_type="WorkerDied", message=rec["died"]))
                else:
                    run.returned.add(r)
                if rec.get("ok"):
                    run.finished[r] = rec
                    self._check_finished_rank(run, r, rec)
                elif "failure" in rec:
                    f = rec["failure"]
                    kind = "mismatch" if f.get("mismatch") else "exception"
                    if all(g.world_rank != r for g in failures):
                        failures.append(WorkerFailure(world_rank=r, node_id=info["node_id"], pid=info["pid"],
                                                      kind=kind, exc_type=f["exc_type"], message=f["message"],
                                                      traceback=f["traceback"]))
                # "interrupted": the controller ended the attempt; the reason is in failures already
                if failures and first_failure_at is None:
                    first_failure_at = time.monotonic()
        hang_monitor.stop(watchdog)
        if failures or len(run.finished) < run.world_size:
            self._unblock_round(run, "the attempt ended")
            if pending and not run.spec.scaling_config.elastic:
                # ranks waiting in a trainkit barrier return at once when it is unblocked: their
                # processes are healthy and kept for the repaired group (ranks stuck in a gloo
                # collective or in user code are not, and are replaced)
                done, pending = await asyncio.wait(pending, timeout=_UNBLOCK_WAIT_S)
                for t in done:
                    if "died" not in t.result():
                        run.returned.add(tasks[t])
            for t in pending:
                t.cancel()
            if not failures:
                failures.append(WorkerFailure(world_rank=-1, kind="interrupted", message="attempt interrupted"))
            return "failed", _root_cause_first(failures)
        return "finished", run.finished.get(0, {}).get("value")

    def _check_finished_rank(self, run: _Run, rank: int, rec: dict) -> None:
        """A rank returned: ranks still waiting in a round can never be released."""
        rnd = run.round
        if rnd is None or not rnd.arrivals:
            return
        waiting = sorted(rnd.arrivals)
        op = rnd.key[0]
        what = f"{op} #{rnd.key[1]}" if op != "report" else f"report {rnd.key[1]}"
        err = ReportError(f"rank {rank} returned from the training function after {rec.get('index', 0)} "
                          f"report(s) while {_describe_ranks(waiting)} wait in {what}: every rank must call "
                          "report() (and collectives) the same number of times")
        self._fail_round(run, err, [_rank_failure(run, rank, kind="mismatch", exc_type="ReportError",
                                                  message=str(err))])

    def _fail_round(self, run: _Run, err: Exception, failures: list[WorkerFailure]) -> None:
        rnd, run.round = run.round, None
        if rnd is not None and rnd.fut is not None and not rnd.fut.done():
            rnd.fut.set_result(("error", err))
        if run.ended is not None and not run.ended.done():
            run.ended.set_result(failures)

    def _unblock_round(self, run: _Run, why: str) -> None:
        rnd, run.round = run.round, None
        if rnd is not None and rnd.fut is not None and not rnd.fut.done():
            rnd.fut.set_result(("stop", why))

    # -- rounds: reports and collectives ------------------------------------------------
    async def _arrive(self, run_id: str, attempt: int, rank: int, key: tuple, payload: Any):
        run = self.runs.get(run_id)
        if run is None or attempt != run.attempt or run.ended is None:
            return ("stop", "this attempt is over")
        if run.finished:
            done = sorted(run.finished)
            err = ReportError(f"rank {rank} called {key[0]} ({key[0]} {key[1]}) but {_describe_ranks(done)} "
                              f"already returned from the training function after "
                              f"{run.finished[done[0]].get('index', 0)} report(s): every rank must call "
                              "report() the same number of times")
            self._fail_round(run, err, [_rank_failure(run, rank, kind="mismatch", exc_type="ReportError",
                                                      message=str(err))])
            return ("error", err)
        rnd = run.round
        if rnd is None:
            rnd = run.round = _Round(key, time.monotonic(), fut=asyncio.get_running_loop().create_future())
        elif rnd.key != key:
            a = f"{rnd.key[0]} {rnd.key[1]}"
            err = ReportError(f"ranks called different operations: {_describe_ranks(rnd.arrivals)} in {a}, rank "
                              f"{rank} in {key[0]} {key[1]}; every rank must call report() and collectives in "
                              "the same order")
            self._fail_round(run, err, [_rank_failure(run, rank, kind="mismatch", exc_type="ReportError",
                                                      message=str(err))])
            return ("error", err)
        rnd.arrivals[rank] = payload
        fut = rnd.fut
        if len(rnd.arrivals) == run.world_size:
            run.round = None
            try:
                value = await self._complete(run, rnd)
                if run.stop is not None and rnd.key[0] == "report":  # committed; the attempt ends here
                    fut.set_result(("committed_then_stop", (value, run.stop.message)))
                    if run.ended is not None and not run.ended.done():
                        run.ended.set_result([run.stop])
                else:
                    fut.set_result(("ok", value))
            except Exception as e:  # noqa: BLE001 - every rank gets the error; the attempt ends
                fut.set_result(("error", e))
                if run.ended is not None and not run.ended.done():
                    run.ended.set_result([_rank_failure(run, 0, kind="exception", exc_type=type(e).__name__,
                                                        message=str(e))])
        return await asyncio.shield(fut)

    async def _complete(self, run: _Run, rnd: _Round):
        op = rnd.key[0]
        if op == "report":
            index = rnd.key[1]
            dirs = {p[1] for p in rnd.arrivals.values() if p[1] is not None}
            if len(dirs) > 1:
                raise CheckpointError(f"report {index}: ranks used different checkpoint_dir_name values "
                                      f"{sorted(dirs)}")
            d = dirs.pop() if dirs else None
            metrics = rnd.arrivals[0][0] or {}
            files = {r: p[2] for r, p in rnd.arrivals.items() if p[1] is not None}
            barrier_s = time.monotonic() - rnd.started
            if run.store.local:
                run.ledger.commit(run.attempt, index, metrics, d, files, world_size=run.world_size,
                                  barrier_s=barrier_s)
            else:
                await asyncio.to_thread(run.ledger.commit, run.attempt, index, metrics, d, files,
                                        world_size=run.world_size, barrier_s=barrier_s)
            run.progress.update(index=index, metrics=metrics)
            self._after_commit(run, index, d)
            return d
        if op == "reported_checkpoints":
            return [(c["dir"], c["metrics"]) for c in run.ledger.state["checkpoints"]]
        return rnd.arrivals[0]  # broadcast / barrier: rank 0's payload

    def _after_commit(self, run: _Run, index: int, checkpoint_dir: Optional[str]) -> None:
        """At a report boundary: end the attempt for a preemption, or to grow an elastic group."""
        if run.preempted:
            ranks = sorted(run.preempted)
            run.stop = WorkerFailure(world_rank=ranks[0], node_id=run.preempted[ranks[0]][0], kind="preempted",
                                     exc_type="Preempted",
                                     message=f"{_describe_ranks(ranks)} preempted; stopped after report {index}")
            return
        sc = run.spec.scaling_config
        if not sc.elastic or run.world_size >= sc.max_workers:
            return
        if run.grow_ready and checkpoint_dir is not None:  # grow only where no progress is lost
            target = decide_resize(run.world_size, run.grow_ready, sc.min_workers, sc.max_workers)
            run.grow_ready = 0
            if target:
                run.stop = WorkerFailure(world_rank=-1, kind="resize", message=(
                    f"capacity for {target} workers: growing from {run.world_size} after report {index}"))
            return
        now = time.monotonic()
        if run.grow_probe is not None or now - run.last_resize_check < run.grow_backoff_s:
            return
        run.last_resize_check = now
        # The availability view lags (a few hundred ms); it only says where to look. A placement
        # probe for the extra workers, in the background, says whether they really fit.
        extra = count_fitting_workers(_trusted(run, _resources_by_node(available=True)), sc.worker_resources)
        extra = min(extra, sc.max_workers - run.world_size)
        if extra > 0:
            run.grow_probe = asyncio.ensure_future(self._probe_capacity(run, run.attempt, extra))

    async def _probe_capacity(self, run: _Run, attempt: int, extra: int) -> None:
        sc = run.spec.scaling_config
        pg = placement_group([dict(sc.worker_resources) for _ in range(extra)], strategy="SPREAD")
        try:
            await asyncio.wait_for(pg.ready(), _PROBE_S)
            placed = True
        except asyncio.TimeoutError:
            placed = False
        except asyncio.CancelledError:
            remove_placement_group(pg)
            raise
        remove_placement_group(pg)
        if run.attempt != attempt:
            return
        run.grow_probe = None
        if placed:
            logger.debug("run %s: capacity for %d more worker(s)", run.run_id, extra)
            run.grow_ready = extra
            run.grow_backoff_s = 1.0
        else:
            run.grow_backoff_s = min(run.grow_backoff_s * 2, 60.0)

    async def _discard(self, run: _Run, group: _Group) -> None:
        """Kill a group and wait until the cluster shows its resources free again."""
        before = _resources_by_node(available=True)
        self._release(group, healthy=False)
        await _wait_removed(group)  # its resources must be free before the next group is placed
        await self._settle(run, group, before)

    async def _settle(self, run: _Run, group: _Group, before: dict, timeout_s: float = 5.0) -> None:
        """Wait until the cluster's availability view shows ``group``'s resources released.

        A node whose raylet returns the resources is alive (a worker died there, the node did
        not): it is trusted again at once. A node that never does is left suspect (lost, or
        about to be declared dead), so the next size is chosen from trusted capacity only.
        """
        held: dict[str, dict] = {}
        for info in group.infos:
            node = held.setdefault(info["node_id"], {})
            for r, v in group.key[1]:
                node[r] = node.get(r, 0) + v
        deadline = time.monotonic() + timeout_s
        pending = set(held)
        while pending and time.monotonic() < deadline:
            now = _resources_by_node(available=True)
            for n in list(pending):
                if n not in now:  # declared dead
                    pending.discard(n)
                    continue
                if all(now[n].get(r, 0) + 1e-9 >= before.get(n, {}).get(r, 0) + v for r, v in held[n].items()):
                    pending.discard(n)
                    run.suspect.pop(n, None)
            if pending:
                await asyncio.sleep(0.05)
        if pending:
            logger.debug("run %s: nodes %s did not release resources within %.1f s", run.run_id, pending, timeout_s)

    async def preempted(self, run_id: str, attempt: int, rank: int, grace_s: float) -> None:
        run = self.runs.get(run_id)
        if run is None or attempt != run.attempt or run.group is None:
            return
        info = run.group.infos[run.group.ranks[rank]]
        run.preempted[rank] = (info["node_id"], time.monotonic() + grace_s)
        # a noticed node may be going away: elastic sizing leaves it out for its grace and then some
        run.doomed[info["node_id"]] = time.monotonic() + grace_s + _SUSPECT_S
        run.ledger.emit(ev.Preempted(attempt=attempt, world_ranks=(rank,), node_id=info["node_id"],
                                     grace_s=grace_s))

    async def _wait_preempted_nodes(self, run: _Run) -> None:
        """Before a restart, let preempted nodes that are going away go (bounded by their grace)."""
        pending = dict(run.preempted.values())
        while pending:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            now = time.monotonic()
            pending = {n: d for n, d in pending.items() if n in alive and now < d + _NODE_GONE_SLACK_S}
            if pending:
                await asyncio.sleep(0.2)

    async def report(self, run_id, attempt, rank, index, metrics, checkpoint_dir, files):
        return await self._arrive(run_id, attempt, rank, ("report", index), (metrics, checkpoint_dir, files))

    async def collective(self, run_id, attempt, rank, op, seq, payload):
        return await self._arrive(run_id, attempt, rank, (op, seq), payload if rank == 0 else None)

    async def reported_checkpoints(self, run_id, attempt):
        run = self.runs.get(run_id)
        if run is None or run.ledger is None:
            return ("stop", "this attempt is over")
        return ("ok", [(c["dir"], c["metrics"]) for c in run.ledger.state["checkpoints"]])

    async def record_fault(self, run_id, attempt, fields: dict):
        """A rank injected a fault: put it in the run's event stream (False: that fault already fired)."""
        run = self.runs.get(run_id)
        if run is None or run.ledger is None:
            return ("ok", False)
        return ("ok", run.ledger.record_fault(fields))

    async def record_event(self, run_id, attempt, event) -> bool:
        """A rank's own event (debugger_listening) for the run's event stream."""
        run = self.runs.get(run_id)
        if run is None or run.ledger is None or attempt != run.attempt:
            return False
        run.ledger.emit(event, flush=True)
        return True

    async def progress(self, run_id: str) -> Optional[dict]:
        run = self.runs.get(run_id)
        return dict(run.progress) if run else None

    async def abort(self, run_id: str) -> bool:
        run = self.runs.get(run_id)
        if run is None:
            return False
        run.aborted = True
        if run.ended is not None and not run.ended.done():
            run.ended.set_result([WorkerFailure(world_rank=-1, kind="aborted", message="aborted by the driver")])
        return True

    async def shutdown(self) -> None:
        for g in self.idle:
            g.kill()
        self.idle.clear()

    # -- worker groups -------------------------------------------------------------------
    async def _choose_size(self, run: _Run) -> int:
        sc = run.spec.scaling_config
        per_worker = sc.worker_resources
        total = _resources_by_node(available=False)
        if count_fitting_workers(total, per_worker) < sc.min_workers:
            have = {r: sum(n.get(r, 0) for n in total.values()) for r in per_worker}
            raise ControllerError(
                f"the cluster can never hold {sc.min_workers} worker(s) of {per_worker}: it has {have} in "
                f"{len(total)} node(s). Lower ScalingConfig.num_workers or resources_per_worker, or add nodes.")
        if not sc.elastic:
            return sc.max_workers
        deadline = time.monotonic() + run.spec.worker_start_timeout_s
        while True:
            free = _resources_by_node(available=True)
            for g in self.idle:  # warm idle groups hold resources that this run may take
                for info in g.infos:
                    node = free.setdefault(info["node_id"], {})
                    for r, v in g.key[1]:
                        node[r] = node.get(r, 0) + v
            fitting = count_fitting_workers(_trusted(run, free), per_worker)
            if fitting < sc.min_workers:  # suspect nodes may be fine after all (a killed worker, not a lost node)
                fitting = count_fitting_workers(free, per_worker)
            decision = decide_group_size(fitting, sc.min_workers, sc.max_workers)
            if decision.world_size:
                return decision.world_size
            if time.monotonic() > deadline:
                raise ControllerError(f"timed out waiting for resources: {decision.reason}")
            await asyncio.sleep(0.2)

    def _release(self, group: _Group, healthy: bool) -> None:
        if healthy:
            self.idle.append(group)
        else:
            group.kill()

    async def _start_group(self, run: _Run, size: int, quick: bool = False) -> _Group:
        sc = run.spec.scaling_config
        res = sc.worker_resources
        env = run.spec.run_config.worker_runtime_env
        key = (size, tuple(sorted(res.items())), sc.placement_strategy, repr(env))
        group = None
        if run.carry is not None:
            carried, run.carry = run.carry, None
            if carried.key == key:
                try:
                    await self._init_torch(run, carried)
                    return carried
                except (ray.exceptions.RayError, asyncio.TimeoutError) as e:  # a kept worker died meanwhile
                    logger.info("run %s: the repaired group cannot start (%s); starting a new one", run.run_id, e)
                    await self._discard(run, carried)
            else:
                carried.kill()
        for g in list(self.idle):
            if g.key == key:
                self.idle.remove(g)
                try:
                    await asyncio.wait_for(asyncio.gather(*[w.ping.remote() for w in g.workers]), 5)
                    group = g
                    break
                except (ray.exceptions.RayError, asyncio.TimeoutError):  # a dead warm worker: drop the group
                    g.kill()
        if group is None:
            for g in self.idle:  # free their resources for the new shape
                g.kill()
            self.idle.clear()
            group = await self._new_group(run, size, res, key, env, quick)
        try:
            await self._init_torch(run, group)
        except BaseException:
            group.kill()
            raise
        return group

    async def _new_group(self, run: _Run, size: int, res: dict, key: tuple, env, quick: bool = False) -> _Group:
        sc = run.spec.scaling_config
        pg = placement_group([dict(res) for _ in range(size)], strategy=sc.placement_strategy)
        timeout_s = run.spec.worker_start_timeout_s
        try:
            await asyncio.wait_for(pg.ready(), 10.0 if quick else timeout_s)
        except asyncio.TimeoutError:
            remove_placement_group(pg)
            if quick:
                raise _NotPlaced() from None
            raise ControllerError(f"could not place {size} worker(s) of {res} with strategy "
                                  f"{sc.placement_strategy} within {timeout_s:.0f} s "
                                  "(TRAINKIT_WORKER_START_TIMEOUT_S); the cluster is busy or too small") from None
        workers = [_make_worker(pg, i, res, env) for i in range(size)]
        try:
            infos = await asyncio.wait_for(asyncio.gather(*[w.setup.remote() for w in workers]), timeout_s)
        except asyncio.TimeoutError:
            _Group(key, pg, workers, []).kill()
            raise ControllerError(f"{size} worker(s) were placed but did not start within {timeout_s:.0f} s "
                                  "(TRAINKIT_WORKER_START_TIMEOUT_S): the machine is overloaded, or worker "
                                  "processes are slow to import their runtime environment") from None
        except Exception:
            _Group(key, pg, workers, []).kill()
            raise
        return _Group(key, pg, workers, list(infos))

    async def _repair(self, run: _Run, group: _Group, reusable: set) -> Optional[_Group]:
        """Replace the workers of ``group`` outside ``reusable`` (bundle indices) in the same placement group."""
        res = dict(group.key[1])
        env = run.spec.run_config.worker_runtime_env
        workers, infos = list(group.workers), list(group.infos)
        fresh = {}
        for b, w in enumerate(group.workers):
            if b not in reusable:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead
                    pass
                workers[b] = fresh[b] = _make_worker(group.pg, b, res, env)
        try:
            got = await asyncio.wait_for(asyncio.gather(*[w.setup.remote() for w in fresh.values()]),
                                         run.spec.worker_start_timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError):  # cannot repair in place: start a new group
            _Group(group.key, group.pg, workers, infos).kill()
            await _wait_removed(group)
            return None
        for b, info in zip(fresh, got):
            infos[b] = info
        return _Group(group.key, group.pg, workers, infos)

    async def _init_torch(self, run: _Run, group: _Group) -> None:
        # Ranks: grouped by node in order of first appearance; consecutive within a node.
        order: list[str] = []
        for info in group.infos:
            if info["node_id"] not in order:
                order.append(info["node_id"])
        group.ranks = [b for node in order for b, info in enumerate(group.infos) if info["node_id"] == node]
        per_node = {n: [b for b in group.ranks if group.infos[b]["node_id"] == n] for n in order}
        for b, info in enumerate(group.infos):
            node = info["node_id"]
            info["local_rank"] = per_node[node].index(b)
            info["local_world_size"] = len(per_node[node])
            info["node_rank"] = order.index(node)
        tc = run.spec.torch_config
        use_gpu = run.spec.scaling_config.use_gpu
        backend = getattr(tc, "backend", None) or ("nccl" if use_gpu else "gloo")
        timeout_s = getattr(tc, "timeout_s", PROCESS_GROUP_TIMEOUT_S)
        rank0 = group.workers[group.ranks[0]]
        port = await rank0.free_port.remote()
        addr = group.infos[group.ranks[0]]["ip"]
        calls = []
        for r, b in enumerate(group.ranks):
            info = dict(group.infos[b], world_rank=r, world_size=len(group.ranks))
            cuda = None
            if use_gpu:  # every rank sees its node's GPUs; local_rank picks one
                cuda = ",".join(sorted({g for i in group.infos if i["node_id"] == info["node_id"]
                                        for g in i["gpu_ids"]}))
            calls.append(group.workers[b].init_process_group.remote(addr, port, info, backend, timeout_s, cuda))
        await asyncio.wait_for(asyncio.gather(*calls), 120)


def _make_worker(pg, bundle_index: int, res: dict, env):
    custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
    opts = dict(num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0), resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index))
    if "memory" in res:
        opts["memory"] = res["memory"]
    if env:
        opts["runtime_env"] = env
    return RankWorker.options(**opts).remote()


async def _wait_removed(group: _Group, timeout_s: float = 10.0) -> None:
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if placement_group_table(group.pg).get("state") == "REMOVED":
                return
        except Exception:  # noqa: BLE001 - unknown group: nothing to wait for
            return
        await asyncio.sleep(0.05)


async def _resolve(ref) -> dict:
    try:
        return await ref
    except ray.exceptions.RayActorError as e:
        return {"died": _death_message(str(e))}
    except Exception as e:  # noqa: BLE001 - any other Ray error is a failure of that rank
        return {"died": f"{type(e).__name__}: {str(e)[:300]}"}


def _death_message(ray_text: str) -> str:
    """A dead worker, in one line: Ray's exit type and the first sentence of its detail.

    Ray does not report the exit code or signal of a worker process it started, so none is given.
    """
    import re

    kind = re.search(r"Worker exit type: (\S+)", ray_text)
    detail = re.search(r"Worker exit detail: (.*?\.)(?:\s|$)", ray_text)
    what = "the worker process died"
    if kind:
        what += f" (Ray exit type {kind.group(1)}" + (f": {detail.group(1)}" if detail else "") + ")"
    else:
        what += f": {ray_text.splitlines()[0][:300]}" if ray_text else ""
    return what


def _root_cause_first(failures: list[WorkerFailure]) -> list[WorkerFailure]:
    """User exceptions and deaths before the collateral damage (peers' broken collectives)."""
    def weight(f: WorkerFailure) -> int:
        collateral = "Connection closed by peer" in f.message or "Connection reset" in f.message
        return 1 if collateral else 0

    return sorted(failures, key=weight)


_SUSPECT_S = 30.0
_PROBE_S = 2.0  # how long a grow probe may wait for its placement group
_START_RETRIES = 3  # group starts that may fail because a worker died meanwhile, per attempt
_NODE_GONE_SLACK_S = 5.0  # after a preemption's grace, how long a restart still waits for the node to leave


def _trusted(run: _Run, per_node: dict) -> dict:
    """Leave out nodes where a worker died lately: a lost node looks alive until Ray notices."""
    now = time.monotonic()
    return {n: r for n, r in per_node.items()
            if now - run.suspect.get(n, -1e9) > _SUSPECT_S and now > run.doomed.get(n, 0.0)}


def _resources_by_node(available: bool) -> dict:
    from ray._private import state

    per_node = state.available_resources_per_node() if available else state.total_resources_per_node()
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return {k: dict(v) for k, v in per_node.items() if k in alive}


ControllerActor = ray.remote(num_cpus=0, max_restarts=0)(Controller)

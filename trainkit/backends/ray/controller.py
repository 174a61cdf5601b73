"""The controller: an async Ray actor (``num_cpus=0``) that executes the attempt loop's decisions.

One controller per driver process and cluster, reused across fits, so that healthy
worker groups stay warm between fits (``WorkerPool``). For each run:

    start a group (worker_group: placement, warm pool, torch.distributed; capacity: its size)
    ->  supervise the attempt: every rank runs; rounds pass the barrier (barrier), the last
        arrival of a report commits through the ledger; a commit may stop the attempt
        (decide_at_commit: preemption notice, growth); the hang monitor may end it
    ->  the attempt ends (an Outcome)  ->  decide(outcome, budget)  ->  execute the action:
        Finish | Abort | Resize | Restart (repair or discard the group) | Fail

The state is data (``state.Run``, ``state.Attempt``); the decisions are pure (``decide``).
Runs in the controller actor's process. The controller dies with the driver, and the
workers with the controller (Ray owner semantics), so no worker outlives its driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any, Optional

import ray

from trainkit import events as ev
from trainkit.backends import api
from trainkit.backends import barrier as br
from trainkit.backends.decide import Abort, Fail, Finish, Probe, Resize, StopAfterCommit, decide, decide_at_commit
from trainkit.backends.ray.channel import ChannelServer
from trainkit.backends.ray.state import Attempt, Run
from trainkit.backends.ray.supervisor import end_with_mismatch, supervise
from trainkit.backends.ray.worker_group import (Group, NotPlaced, WorkerPool, discard, grow, keep_spares,
                                                 refill_spares, repair)
from trainkit.diagnostics.straggler_monitor import sample_straggler
from trainkit.diagnostics.stragglers import StragglerWatch, step_times
from trainkit.errors import ControllerError, ReportError, TrainingFailedError, WorkerFailure
from trainkit.ledger import RunLedger

logger = logging.getLogger("trainkit.controller")

START_RETRIES = 3  # group starts that may fail because a worker died meanwhile, per attempt


class Controller:
    def __init__(self):
        self.runs: dict[str, Run] = {}
        self.pool = WorkerPool()
        self._channel: Optional[ChannelServer] = None  # the report channel, started at the first run that uses it

    async def _channel_address(self) -> Optional[tuple]:
        """The report channel's address, started on this node's IP once; None if it cannot start
        (the ranks then make their rounds as actor calls)."""
        if self._channel is None:
            server = ChannelServer(self._serve_round)
            try:
                await server.start(ray.util.get_node_ip_address())
            except OSError as e:
                logger.warning("the report channel could not start (%s); report() uses actor calls", e)
                return None
            self._channel = server
        return self._channel.address

    async def _serve_round(self, method: str, args: tuple):
        return await getattr(self, method)(*args)

    async def ping(self) -> bool:
        return True

    async def run(self, run_id: str, spec, fn_bytes: bytes, lease=None):
        """``lease``: the driver's lease on the run folder (a copy that checks, for the ledger)."""
        run = self.runs[run_id] = Run(run_id, spec, fn_bytes)
        try:
            if spec.report_channel == "tcp":
                run.channel = await self._channel_address()
            return ("ok", await self._loop(run, lease))
        except TrainingFailedError as e:
            # Errors raised before an attempt ends (resources that can never fit, placement
            # timeouts) have not finished the ledger yet: Result.from_path must show them too.
            if run.ledger is not None and run.ledger.state.get("status") == "running":
                run.ledger.finish("failed", e)
            return ("error", e)
        except Exception as e:  # noqa: BLE001 - an internal error still ends the run cleanly
            err = ControllerError(f"{type(e).__name__}: {e}", [WorkerFailure(
                world_rank=-1, kind="controller", exc_type=type(e).__name__, message=str(e),
                traceback=traceback.format_exc())])
            if run.ledger is not None:
                run.ledger.finish("failed", err)
            return ("error", err)
        finally:  # after an internal error: never leave workers or resources held
            for g in (run.attempt.group if run.attempt else None, run.carry):
                if g is not None:
                    g.kill()
            self.runs.pop(run_id, None)

    # -- the attempt loop ---------------------------------------------------------------
    async def _loop(self, run: Run, lease):
        spec = run.spec
        run.ledger = ledger = await asyncio.to_thread(
            RunLedger, run.store, spec.run_config.checkpoint_config, backend="ray",
            num_workers=spec.scaling_config.num_workers, lease=lease)
        api.subscribe_callbacks(ledger, spec)
        hooks = api.worker_hooks(spec)
        last_size = number = 0
        while True:
            group = await self._start(run, last_size)
            size = len(group.ranks)
            if last_size and size != last_size:
                ledger.emit(ev.Resized(attempt=number + 1, old_world_size=last_size, new_world_size=size,
                                       reason="grow" if size > last_size else "shrink"))
            last_size = size
            attempt = self._begin(run, group)
            number = attempt.number
            outcome = await supervise(run, attempt, hooks, ray.get_runtime_context().current_actor)
            if attempt.tasks:  # a straggler's sample still being taken: its event belongs to this attempt
                await asyncio.wait(set(attempt.tasks), timeout=spec.run_config.straggler_config.sample_s + 5)
            run.attempt = None  # over: late calls of its ranks are told to stop
            action, run.budget = decide(outcome, run.budget, spec.run_config.failure_config)
            if isinstance(action, Finish):
                self.pool.release(group, healthy=not attempt.preempted, run=run)  # a noticed worker is not kept warm
                ledger.finish("finished")
                run.progress["status"] = "finished"
                return ledger.result(return_value=action.value)
            failures = list(outcome.failures)
            if isinstance(action, Resize):
                if len(attempt.returned) == attempt.world_size and grow(run, group):
                    run.carry = group  # grown in place: the ranks keep their processes, new ones join
                else:
                    await discard(run, group)
                ledger.end_attempt("resized")
                continue
            # Record first: the failure is in the event stream at once, not after a worker start.
            ledger.record_failure(attempt.number, failures, will_retry=not isinstance(action, (Abort, Fail)),
                                  **({} if isinstance(action, Abort) else {"kind": action.kind}))
            if isinstance(action, (Abort, Fail)):
                group.kill()
                ledger.finish("aborted" if isinstance(action, Abort) else "failed", action.error)
                run.progress["status"] = "aborted" if isinstance(action, Abort) else "failed"
                raise action.error
            if action.wait_for_preempted:  # first: what replaces a noticed rank must not land on its node
                await run.capacity.wait_nodes_gone(dict(attempt.preempted.values()))
            if action.keep:  # keep the ranks that returned; replace only the dead or stuck ones (a spare, or one start)
                noticed = dict(attempt.preempted.values())
                after = (lambda: run.capacity.wait_nodes_gone(noticed)) if action.regrow_after_preempted else None
                run.carry = await repair(run, group, {group.ranks[r] for r in action.keep},
                                         self._spare_events(run), attempt.number, regrow_after=after)
            else:
                await discard(run, group)
            ledger.emit(ev.GroupRestarted(attempt=attempt.number + 1, reason=failures[0].headline(),
                                          from_index=ledger.latest_index))

    async def _start(self, run: Run, last_size: int) -> Group:
        sc = run.spec.scaling_config
        if run.carry is not None:  # a repaired (or re-formed, or grown) group: its size is decided
            size = len(run.carry.active)
        else:
            size = await run.capacity.choose_size(self.pool.idle_held(), run.spec.worker_start_timeout_s)
        tries = 0
        while True:
            carried, run.carry = run.carry, None
            try:
                group = await self.pool.start(run, size, carried, quick=sc.elastic and size > sc.min_workers,
                                              others_busy=lambda: self._others_busy(run))
                if run.spec.run_config.spare_workers:  # in the background: the group never waits for a spare
                    keep_spares(run, group, self._spare_events(run))
                    run.progress["spares"] = len(group.spares)
                return group
            except NotPlaced:  # elastic: a lost node may still look alive; a failed grow falls back
                if last_size and last_size < size:
                    run.capacity.grow_failed()
                size = max(size - 1, sc.min_workers, last_size if last_size < size else 0)
            except ray.exceptions.RayError:
                # a worker (or its node) died while the group was starting: nothing ran yet, so
                # nothing is lost; start again on what is left, a few times
                tries += 1
                if tries > START_RETRIES:
                    raise
                await asyncio.sleep(1.0)  # let Ray notice a lost node
                size = await run.capacity.choose_size(self.pool.idle_held(), run.spec.worker_start_timeout_s)

    def _spare_events(self, run: Run):
        """Where a group's spare events go: the run's event stream and progress while the run lives
        (a warm group's spares may still be starting after its run ended)."""

        def on_event(event) -> None:
            if self.runs.get(run.run_id) is not run or run.ledger is None or run.ledger.state.get("status") != "running":
                return
            run.progress["spares"] = event.ready
            run.ledger.emit(event)

        return on_event

    def _others_busy(self, run: Run) -> bool:
        """Whether another fit of this driver holds (or is taking) resources: it releases them when it ends."""
        return any(r is not run and not r.waiting for r in self.runs.values())

    def _begin(self, run: Run, group: Group) -> Attempt:
        size = len(group.ranks)
        ranks = [{"world_rank": r, **{k: group.info(r)[k] for k in ("local_rank", "node_rank", "node_id", "pid")}}
                 for r in range(size)]
        number = run.ledger.start_attempt(size, ranks)
        run.capacity.new_attempt()
        run.attempt = Attempt(number, group, br.Barrier(size, time.monotonic()),
                              asyncio.get_running_loop().create_future())
        sc = run.spec.run_config.straggler_config
        if sc.enabled:
            run.attempt.stragglers = StragglerWatch(sc.factor, sc.min_slower_s, sc.reports)
        run.progress.update(attempt=number, world_size=size, status="running")
        return run.attempt

    # -- rounds: reports and collectives ------------------------------------------------
    async def _arrive(self, run_id: str, attempt_number: int, rank: int, key: tuple, payload: Any):
        run = self.runs.get(run_id)
        attempt = run.current(attempt_number) if run is not None else None
        if attempt is None:
            return ("stop", "this attempt is over")
        try:
            if attempt.finished:
                raise br.arrived_after_return(rank, key, {r: rec.get("index", 0) for r, rec in attempt.finished.items()})
            rnd, complete = attempt.barrier.arrive(rank, key, payload, time.monotonic())
        except ReportError as err:
            end_with_mismatch(attempt, rank, err)
            return ("error", err)
        if complete:
            try:
                value = await self._complete(run, attempt, rnd)
                if attempt.stop is not None and rnd.key[0] == "report":  # committed; the attempt ends here
                    rnd.fut.set_result(("committed_then_stop", (value, attempt.stop.message)))
                    attempt.end([attempt.stop])
                else:
                    rnd.fut.set_result(("ok", value))
                attempt.barrier.released_at = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a failed commit: every rank gets the error; the attempt ends
                rnd.fut.set_result(("error", e))
                f = api.failure_from(e, 0)
                attempt.end([f if f.kind == "callback" else
                             attempt.failure(0, kind=f.kind, exc_type=type(e).__name__, message=str(e))])
        return await asyncio.shield(rnd.fut)

    async def _complete(self, run: Run, attempt: Attempt, rnd: br.Round):
        op = rnd.key[0]
        if op == "reported_checkpoints":
            return run.ledger.reported_checkpoints()
        if op == "preemption_info":  # every noticed rank of the group, with the earliest deadline
            nodes: dict = {}
            for r, (node, _deadline) in sorted(attempt.preempted.items()):
                nodes.setdefault(node, []).append(r)
            for r, own in sorted(rnd.arrivals.items()):  # a notice the controller has not heard of yet
                for node, ranks in (getattr(own, "preempted_node_to_ranks", None) or {}).items():
                    if r in ranks and r not in nodes.get(node, []):
                        nodes.setdefault(node, []).append(r)
            deadlines = [d for _n, d in attempt.preempted.values() if d > time.monotonic()]
            deadline_ms = int((time.time() + min(deadlines) - time.monotonic()) * 1000) if deadlines else None
            return {"nodes": nodes, "deadline_ms": deadline_ms}
        if op != "report":
            return rnd.arrivals[0]  # broadcast / barrier: rank 0's payload
        index = rnd.key[1]
        metrics, d, files = br.report_payload(index, rnd.arrivals)
        steps = step_times(rnd.arrived_at, attempt.barrier.released_at)
        args = (attempt.number, index, metrics, d, files)
        kw = dict(world_size=attempt.world_size, barrier_s=time.monotonic() - rnd.started,
                  step_s=tuple(steps[r] for r in range(attempt.world_size)),
                  rank_metrics=[(rnd.arrivals[r][0] or {}) for r in sorted(rnd.arrivals)])
        if run.store.local:
            run.ledger.commit(*args, **kw)
        else:
            await asyncio.to_thread(run.ledger.commit, *args, **kw)
        run.progress.update(index=index, metrics=metrics)
        if attempt.group.refill:  # spares used for this group's repair are replaced now that it runs again
            refill_spares(run, attempt.group)
        if attempt.stragglers is not None:
            for straggler in attempt.stragglers.observe(index, steps):  # sampled in the background
                task = asyncio.ensure_future(sample_straggler(run, attempt, straggler))
                attempt.tasks.add(task)
                task.add_done_callback(attempt.tasks.discard)
        sc, cap = run.spec.scaling_config, run.capacity
        group = attempt.group
        # workers ready to join (an elastic group's regrown slots, or hot spares) are capacity found
        grow_ready = max(cap.ready, len(group.spares) if sc.elastic else 0)
        step = decide_at_commit(index=index, checkpointed=d is not None, world_size=attempt.world_size,
                                preempted={r: v[0] for r, v in attempt.preempted.items()}, grow_ready=grow_ready,
                                elastic=sc.elastic, min_workers=sc.min_workers, max_workers=sc.max_workers)
        if cap.ready and d is not None and not attempt.preempted:
            cap.ready = 0  # the capacity found is used (or found useless) at this checkpointed report
        if isinstance(step, StopAfterCommit):
            attempt.stop = step.failure
        elif isinstance(step, Probe) and not group.pending:  # a worker starting in the background is the probe
            cap.maybe_probe(attempt.world_size)
        return d

    # -- the remote API (ranks, the driver, fault injection) ----------------------------
    async def report(self, run_id, attempt, rank, index, metrics, checkpoint_dir, files):
        return await self._arrive(run_id, attempt, rank, ("report", index), (metrics, checkpoint_dir, files))

    async def collective(self, run_id, attempt, rank, op, seq, payload):
        keep = rank == 0 or op == "preemption_info"  # every rank's own notice joins the group's view
        return await self._arrive(run_id, attempt, rank, (op, seq), payload if keep else None)

    async def reported_checkpoints(self, run_id, attempt):
        run = self.runs.get(run_id)
        if run is None or run.ledger is None:
            return ("stop", "this attempt is over")
        return ("ok", run.ledger.reported_checkpoints())

    async def validated(self, run_id, attempt, checkpoint_dir: str, metrics: dict, status: str):
        """Rank 0's validation of a checkpoint is pending or ended: its metrics join the checkpoint's."""
        run = self.runs.get(run_id)
        if run is None or run.ledger is None:
            return ("stop", "this attempt is over")
        if run.store.local:
            run.ledger.validated(checkpoint_dir, metrics, status)
        else:
            await asyncio.to_thread(run.ledger.validated, checkpoint_dir, metrics, status)
        return ("ok", None)

    async def preempted(self, run_id: str, attempt_number: int, rank: int, grace_s: float) -> None:
        run = self.runs.get(run_id)
        attempt = run.current(attempt_number) if run is not None else None
        if attempt is None:
            return
        node = attempt.group.info(rank)["node_id"]
        attempt.preempted[rank] = (node, time.monotonic() + grace_s)
        run.capacity.notice(node, grace_s)  # a noticed node may be going away: left out of elastic sizing
        run.ledger.emit(ev.Preempted(attempt=attempt_number, world_ranks=(rank,), node_id=node, grace_s=grace_s))

    async def record_fault(self, run_id, attempt, fields: dict):
        """A rank injected a fault: put it in the run's event stream (False: that fault already fired)."""
        run = self.runs.get(run_id)
        if run is None or run.ledger is None:
            return ("ok", False)
        return ("ok", run.ledger.record_fault(fields))

    async def record_event(self, run_id, attempt, event) -> bool:
        """A rank's own event (debugger_listening) for the run's event stream."""
        run = self.runs.get(run_id)
        if run is None or run.current(attempt) is None:
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
        if run.attempt is not None:
            run.attempt.end([WorkerFailure(world_rank=-1, kind="aborted", message="aborted by the driver")])
        return True

    async def shutdown(self) -> None:
        """Release the warm workers and close the report channel; the controller itself stays, and
        its next run starts a new channel (a closed one would refuse every rank: actor calls)."""
        self.pool.shutdown()
        if self._channel is not None:
            self._channel.close()
            self._channel = None


ControllerActor = ray.remote(num_cpus=0, max_restarts=0)(Controller)

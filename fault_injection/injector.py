"""``FaultPlan``: a run callback that injects faults inside the ranks at exact reports.

Attach it with ``RunConfig(callbacks=[plan])``. The runtime calls ``plan.worker_hook()``
once per run (in the controller, or the driver in local mode) and ships the returned
``_Injector`` to every rank of every attempt, where ``before_report`` / ``after_report``
run around each ``report()``. A firing is first recorded as a ``fault_injected`` event
through ``trainkit.backends.api.record_fault`` (the run's ledger refuses a key it has seen, so
a fault fires once per run even when an attempt replays its report), then acted on.

Node actions (``kill_node``, ``add_node``, ``preempt`` of a node) are not done by the
rank: it asks the driver-side ``NodeBroker`` (fault_injection.broker) and pauses until
the broker is done. Runs in the driver (plan), the controller (worker_hook) and ranks
(the injector).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Optional, Sequence

from trainkit.errors import ConfigError, ScenarioError

from fault_injection import faults as F


class FaultPlan:
    """A seeded list of faults to inject into one run.

    >>> plan = FaultPlan(faults=[{"action": "kill_worker", "rank": 1, "at": {"report": 3}}], seed=0)
    >>> plan.faults[0].action
    'kill_worker'

    Then ``TorchTrainer(..., run_config=RunConfig(callbacks=[plan], failure_config=FailureConfig(1)))``.
    Node faults need a broker: ``FaultPlan(..., broker=NodeBroker(cluster).start())``, as
    ``trainkit chaos`` does.
    """

    def __init__(self, faults: Sequence[Any] = (), seed: int = 0, broker: Any = None):
        from fault_injection.scenario import validate_faults

        self.faults: list = validate_faults(list(faults))
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError("FaultPlan.seed", seed, "an int")
        self.seed = seed
        self.broker = broker
        self.injected: list = []  # fault_injected events seen by on_event (in the process that runs the ledger)

    def worker_hook(self) -> "_Injector":
        needs_broker = [F.fault_id(f, i) for i, f in enumerate(self.faults) if F.is_node_fault(f)]
        if needs_broker and self.broker is None:
            raise ConfigError("FaultPlan.broker", None, "a NodeBroker for node faults",
                              hint=f"{', '.join(needs_broker)} add or remove nodes: run them with `trainkit chaos` "
                                   "or pass broker=fault_injection.NodeBroker(cluster).start()")
        return _Injector(tuple(self.faults), self.seed, time.time(), self._broker_address())

    def _broker_address(self) -> Optional[tuple]:
        if isinstance(self.broker, tuple):
            return self.broker
        return self.broker.address() if self.broker is not None else None

    def __getstate__(self):
        # the plan travels to the controller: the broker (a thread and a cluster) stays in the driver
        d = dict(self.__dict__)
        d["broker"] = self._broker_address()
        return d

    def on_event(self, event) -> None:
        if getattr(event, "type", "") == "fault_injected":
            self.injected.append(event)

    def __repr__(self) -> str:
        return f"FaultPlan({len(self.faults)} fault(s), seed={self.seed})"


class _StorageFaultHook:
    """Installed in a rank's process by ``storage_error``: fails the next ``count`` matching calls."""

    def __init__(self, operation: str, count: int, error: str):
        self.operation = operation
        self.left = count
        self.error = error
        self.lock = threading.Lock()

    def __call__(self, operation: str, path: str) -> None:
        from trainkit import storage

        if self.operation not in ("any", operation):
            return
        with self.lock:
            if self.left <= 0:
                return
            self.left -= 1
            if self.left == 0:
                storage.set_fault_hook(None)
        raise OSError(f"{self.error} [{operation} {path}]")


class _Injector:
    """The per-rank half of a ``FaultPlan`` (a ``trainkit.session.ReportHook``). Picklable."""

    def __init__(self, faults: tuple, seed: int, t0: float, broker_address: Optional[tuple]):
        self.faults = faults
        self.seed = seed
        self.t0 = t0
        self.broker_address = broker_address
        self._first_index: Optional[int] = None
        self._slow: dict[str, list] = {}  # fault id -> [delay_s, reports left or None]
        # a node preemption reaches the node's ranks through their actors (broker.register_rank)
        self._registers = broker_address is not None and any(
            f.action == "preempt" and F.is_node_fault(f) for f in faults)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_first_index"], d["_slow"] = None, {}  # fresh state in every attempt
        return d

    def before_report(self, ctx, index: int, metrics: dict) -> None:
        if self._first_index is None:
            self._first_index = index
            if self._registers:  # before any fault of this attempt can fire
                from fault_injection.broker import register_rank

                register_rank(self.broker_address)
        self._apply_slow()
        self._check(ctx, index, metrics, "before")

    def after_report(self, ctx, index: int, metrics: dict) -> None:
        self._check(ctx, index, metrics, "after")

    # -- matching ----------------------------------------------------------------------
    def _check(self, ctx, index: int, metrics: dict, when: str) -> None:
        rank = ctx.get_world_rank()
        for pos, fault in enumerate(self.faults):
            if fault.when != when:
                continue
            fid = F.fault_id(fault, pos)
            targets = F.target_ranks(fault, fid, self.seed, ctx.get_world_size())
            if targets is not None and rank not in targets:
                continue
            key = F.firing_key(fault, fid, index=index, attempt=ctx.get_attempt(),
                               first_of_attempt=index == self._first_index, metrics=metrics or {},
                               elapsed_s=time.time() - self.t0, world_rank=rank)
            if key is None:
                continue
            params = fault.model_dump(exclude={"name", "rank", "at", "every", "when", "action", "optional"}, exclude_none=True)
            fields = {"attempt": ctx.get_attempt(), "action": fault.action, "world_rank": rank,
                      "node": getattr(fault, "node", None), "index": index,
                      "detail": {"key": key, "fault": fid, "when": when, **params}}
            from trainkit.backends.api import record_fault

            if not record_fault(fields):
                continue  # fired already in this run (an attempt replays the report), or another rank claimed it
            self._fire(fault, fid, ctx, index)

    # -- actions -----------------------------------------------------------------------
    def _fire(self, fault, fid: str, ctx, index: int) -> None:
        action = fault.action
        _flush()
        if F.is_node_fault(fault):
            self._ask_broker(fault, ctx)
        elif action == "kill_worker":
            os.kill(os.getpid(), F.signal_number(fault.signal))
            if F.signal_number(fault.signal) in _FATAL:
                time.sleep(30)  # the signal ends the process; never go on in the meantime
        elif action == "preempt":
            os.environ["TRAINKIT_PREEMPTION_GRACE_S"] = str(fault.grace_s)  # read by the notice handler
            os.kill(os.getpid(), F.signal_number("SIGTERM"))  # the worker's notice handler
            threading.Thread(target=_kill_after_grace, args=(ctx, fault.grace_s), daemon=True).start()
        elif action == "hang":
            deadline = time.monotonic() + fault.duration_s if fault.duration_s else None
            while deadline is None or time.monotonic() < deadline:
                time.sleep(min(1.0, deadline - time.monotonic()) if deadline else 1.0)
        elif action == "raise":
            raise F.exception_class(fault.exception)(fault.message)
        elif action == "slow":
            self._slow[fid] = [fault.delay_s, fault.reports]
            self._apply_slow(only=fid)
        elif action == "storage_error":
            from trainkit import storage

            storage.set_fault_hook(_StorageFaultHook(fault.operation, fault.count, fault.error))

    def _apply_slow(self, only: Optional[str] = None) -> None:
        for fid, state in list(self._slow.items()):
            if only is not None and fid != only:
                continue
            delay, left = state
            if left is not None:
                if left <= 0:
                    continue
                state[1] = left - 1
            time.sleep(delay)

    def _ask_broker(self, fault, ctx) -> None:
        from fault_injection.broker import request

        request(self.broker_address, {"op": fault.action, "node": getattr(fault, "node", None),
                                      "grace_s": getattr(fault, "grace_s", 0.0), "cpus": getattr(fault, "cpus", None),
                                      "store": ctx.get_storage()})


_FATAL = {9}


def _flush() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:  # noqa: BLE001
            pass


def _kill_after_grace(ctx, grace_s: float) -> None:
    """The end of a preemption's grace period: still preempted (not restarted since) -> SIGKILL."""
    time.sleep(grace_s)
    try:
        if ctx.is_preempted():
            os.kill(os.getpid(), 9)
    except Exception:  # noqa: BLE001 - the session is gone: the attempt is over
        pass


__all__ = ["FaultPlan", "ScenarioError"]

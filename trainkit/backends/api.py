"""The public backend API: what a backend needs to run training functions under the trainkit contract.

A backend is an object with ``name``, ``capabilities``, ``handles_local_mode``, ``needs_ray``
and ``run(spec) -> Result`` (``Backend``), registered by name (``register_backend``, or the
entry point group ``trainkit.backends``). Inside its ranks it installs a ``Session`` (what
``trainkit.report``, ``get_checkpoint``, ``get_context`` talk to) whose ``Coordinator`` turns
reports into commits, and it calls the training function with ``call_train_fn``.

A backend that runs the function in the calling process gets the whole attempt loop from
``run_attempts``: the run folder's lease (one driver per run, ``trainkit.lease``), a ledger in it, one attempt after another from the latest
committed checkpoint, failures counted against ``FailureConfig.max_failures``, the event
stream, ``Result`` or ``WorkerGroupError``. Local mode and the conformance suite's broken
backends are written this way::

    from trainkit.backends import api

    class MyBackend:
        name = "mine"
        capabilities = frozenset({api.FAULT_INJECTION, api.DURABLE_REPORT})
        handles_local_mode = False
        needs_ray = False

        def run(self, spec: api.TrainSpec):
            return api.run_attempts(spec, backend_name=self.name)

    api.register_backend("mine", "my_package.backend:MyBackend")

Runs in the driver (``run_attempts``) and in the ranks (sessions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import traceback
from typing import Any, Callable, Iterator, Optional

from trainkit.backends import (DURABLE_REPORT, ELASTIC, FAULT_INJECTION, HANG_DIAGNOSTICS, MULTI_WORKER,
                               PREEMPTION, VIRTUAL_NODES, Backend, TrainSpec, available_backends, get_backend,
                               register_backend)
from trainkit.backends import decide
from trainkit.errors import TrainingFailedError, WorkerFailure, WorkerGroupError
from trainkit.lease import owned
from trainkit.ledger import RunLedger
from trainkit.session import Coordinator, RankInfo, ReportReply, record_fault
from trainkit.session import Session
from trainkit.session import set_session
from trainkit.storage import RunStore


@contextlib.contextmanager
def install_session(session: Session) -> Iterator[Session]:
    """Make ``session`` the one the per-rank API of this process talks to, for the block, and claim
    this process for the session's run (``trainkit diagnose --live`` dumps only claimed ranks)."""
    from trainkit.diagnostics import claims

    with claims.claim(session.store.uri, session.info.world_rank, session.info.attempt):
        set_session(session)
        try:
            yield session
        finally:
            set_session(None)


def call_train_fn(spec: TrainSpec) -> Any:
    """Call the training function as the user wrote it: with its config (``{}`` if none), or without."""
    if spec.takes_config:
        return spec.train_fn(spec.train_loop_config if spec.train_loop_config is not None else {})
    return spec.train_fn()


def failure_from(exc: BaseException, world_rank: int, *, node_id: str = "local",
                 pid: Optional[int] = None) -> WorkerFailure:
    """The failure record of a rank whose training function raised ``exc`` (traceback included): kind
    ``storage`` for a storage failure no retry can fix (full, read-only, forbidden), ``collective``
    for a gloo/NCCL error in a collective (with the peer rank where the message names it), else
    ``exception``."""
    from trainkit.errors import StorageError
    from trainkit.storage_io import retryable

    if isinstance(exc, TrainingFailedError) and exc.failures and exc.failures[0].kind == "callback":
        return exc.failures[0]  # a UserCallback's error, raised here through report(): the run's failure as it is
    peer = None
    if isinstance(exc, StorageError) and isinstance(exc, OSError) and not retryable(exc):
        kind = "storage"
    elif decide.is_collective_error(str(exc)):
        kind, peer = "collective", decide.peer_rank(str(exc))
    else:
        kind = "exception"
    return WorkerFailure(world_rank=world_rank, node_id=node_id, pid=os.getpid() if pid is None else pid,
                         kind=kind, exc_type=type(exc).__name__, message=str(exc), peer_rank=peer,
                         traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class _UserCallbacks:
    """Calls the run's ``UserCallback`` hooks from the ledger's events: ``after_report`` at each
    ``report_committed`` (every rank's metrics, as the coordinator gave them to the commit),
    ``after_exception`` at each ``worker_failed``."""

    def __init__(self, ledger: RunLedger, spec: TrainSpec, callbacks: list):
        from trainkit.callback import TrainRunContext

        self.ledger = ledger
        self.callbacks = callbacks
        self.context = TrainRunContext(spec.run_config, spec.train_loop_config, spec.scaling_config,
                                       spec.torch_config, getattr(spec, "dataset_config", None))

    def __call__(self, event) -> None:
        from trainkit import events as ev
        from trainkit.checkpoint import Checkpoint
        from trainkit.errors import WorkerFailure

        if isinstance(event, ev.ReportCommitted):
            per_rank = self.ledger.rank_metrics
            metrics = list(per_rank) if per_rank is not None else [dict(event.metrics)]
            store = self.ledger.store
            ckpt = Checkpoint(store.path(event.checkpoint), store.fs) if event.checkpoint else None
            for cb in self.callbacks:
                _call_hook(cb, "after_report", self.context, metrics, ckpt)
        elif isinstance(event, ev.WorkerFailed):
            failures = {f["world_rank"]: WorkerFailure.from_dict(f) for f in event.failures}
            for cb in self.callbacks:
                _call_hook(cb, "after_exception", self.context, failures)


def _call_hook(cb, hook: str, *args) -> None:
    """``cb.hook(*args)``; what it raises becomes a ``ControllerError`` whose failure has kind
    ``callback``: the run fails at once, never retried (Ray Train: a callback's exception is a
    controller failure, fatal even with ``max_failures > 0``)."""
    from trainkit.errors import ControllerError, WorkerFailure

    try:
        getattr(cb, hook)(*args)
    except Exception as e:  # noqa: BLE001 - the user's hook: its exception ends the run
        where = f"{type(cb).__name__}.{hook}"
        failure = WorkerFailure(world_rank=-1, kind="callback", exc_type=type(e).__name__,
                                message=f"{where} raised {type(e).__name__}: {e}",
                                traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)))
        raise ControllerError(f"the UserCallback hook {where} raised (a callback's error is not retried)",
                              [failure]) from e


def subscribe_callbacks(ledger: RunLedger, spec: TrainSpec) -> None:
    """Let the run's callbacks with ``on_event`` see every event the ledger writes, call the
    ``UserCallback`` hooks, and apply the run's ``LoggingConfig`` in this process."""
    from trainkit.callback import UserCallback

    if spec.run_config.logging_config is not None:
        spec.run_config.logging_config.apply()
    users = []
    for cb in spec.run_config.callbacks:
        if hasattr(cb, "on_event"):
            ledger.events.subscribe(cb.on_event)
        if isinstance(cb, UserCallback):
            users.append(cb)
    if users:
        ledger.events.subscribe(_UserCallbacks(ledger, spec, users))


class RunSettings:
    """The run-wide settings a rank's session needs, shipped with the worker hooks: the trainer's
    ``ValidationConfig`` (None: none) and the ``LoggingConfig`` applied when the session starts."""

    def __init__(self, validation_config: Any = None, logging_config: Any = None):
        self.validation_config = validation_config
        self.logging_config = logging_config

    def on_session_start(self, ctx) -> None:
        if self.logging_config is not None:
            self.logging_config.apply()


def worker_hooks(spec: TrainSpec) -> list:
    """The per-rank halves of the run's callbacks (``FaultPlan``, ``RankDebugger``, ...), and the
    run's settings for the ranks (``RunSettings``)."""
    hooks = [cb.worker_hook() for cb in spec.run_config.callbacks if hasattr(cb, "worker_hook")]
    return hooks + [RunSettings(getattr(spec, "validation_config", None), spec.run_config.logging_config)]


class InlineCoordinator:
    """One rank in this process: a report commits at once."""

    def __init__(self, ledger: RunLedger, attempt: int):
        self.ledger = ledger
        self.attempt = attempt

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> ReportReply:
        t0 = time.perf_counter()
        self.ledger.commit(self.attempt, index, metrics or {}, checkpoint_dir,
                           {0: files} if checkpoint_dir else None, world_size=1,
                           barrier_s=time.perf_counter() - t0, rank_metrics=[metrics or {}])
        return ReportReply(checkpoint_dir)

    def collective(self, world_rank, op, seq, payload):
        return payload

    def reported_checkpoints(self):
        return self.ledger.reported_checkpoints()

    def validated(self, checkpoint_dir: str, metrics: dict, status: str) -> None:
        self.ledger.validated(checkpoint_dir, metrics, status)

    def record_fault(self, fields: dict) -> bool:
        return self.ledger.record_fault(fields)


def run_attempts(spec: TrainSpec, *, backend_name: str, num_workers: Any = 0,
                 coordinator: Callable[[RunLedger, int], Any] = InlineCoordinator,
                 max_failures: Optional[int] = None, with_hooks: bool = True,
                 before_finish: Optional[Callable[[Any], None]] = None):
    """Run ``spec``'s training function in this process, attempt after attempt, under the contract.

    Each attempt's end is decided by the same rules as the Ray controller's
    (``trainkit.backends.decide``). ``coordinator(ledger, attempt)`` makes each attempt's
    coordinator; ``max_failures`` overrides ``FailureConfig.max_failures``; ``with_hooks``
    ships the run's callbacks to the rank; ``before_finish(coordinator)`` runs after the
    function returned, before the run is marked finished. Returns the ``Result``; raises
    ``WorkerGroupError`` (root cause: the function's exception) once the failures are spent, and
    ``RunOwnedError`` at once when another live driver owns the run folder.
    """
    rc = spec.run_config
    store = RunStore(rc.storage_path, rc.name, rc.storage_filesystem)
    with owned(store, backend=backend_name) as lease:  # before anything is written; RunOwnedError if taken
        ledger = RunLedger(store, rc.checkpoint_config, backend=backend_name, num_workers=num_workers, lease=lease)
        return _attempt_loop(spec, ledger, coordinator, max_failures, with_hooks, before_finish)


def _attempt_loop(spec: TrainSpec, ledger: RunLedger, coordinator, max_failures, with_hooks, before_finish):
    rc, store = spec.run_config, ledger.store
    subscribe_callbacks(ledger, spec)
    fc = rc.failure_config if max_failures is None else dataclasses.replace(rc.failure_config,
                                                                            max_failures=max_failures)
    hooks = worker_hooks(spec) if with_hooks else []
    budget = decide.Budget()
    while True:
        attempt = ledger.start_attempt(1, [{"world_rank": 0, "local_rank": 0, "node_rank": 0,
                                            "node_id": "local", "pid": os.getpid()}])
        coord = coordinator(ledger, attempt)
        session = Session(RankInfo(attempt=attempt, node_id="local"), store, coord, experiment_name=rc.name,
                          start_checkpoint=ledger.latest_checkpoint(), start_index=ledger.latest_index,
                          datasets=spec.datasets, hooks=hooks)
        raised = None
        try:
            with install_session(session):
                value = call_train_fn(spec)
                session.drain()  # an ASYNC report in flight and the validations count for this attempt
                outcome = decide.Outcome(value=value)
        except Exception as e:  # noqa: BLE001 - every user error is a failure of the attempt
            with contextlib.suppress(Exception):  # an ASYNC report made before the error ends first (as SYNC's)
                session.drain_reports()
            raised, outcome = e, decide.Outcome(failures=(failure_from(e, 0),))
        except BaseException as e:  # KeyboardInterrupt: record, then let it go
            ledger.finish("aborted", WorkerGroupError(f"aborted by {type(e).__name__}", [failure_from(e, 0)]))
            raise
        action, budget = decide.decide(outcome, budget, fc)
        if isinstance(action, decide.Finish):
            if before_finish is not None:
                before_finish(coord)
            ledger.finish("finished")
            return ledger.result(return_value=action.value)
        try:
            ledger.record_failure(attempt, list(outcome.failures), will_retry=isinstance(action, decide.Restart),
                                  kind=action.kind)
        except TrainingFailedError as e:  # a UserCallback's after_exception raised: the run ends with it
            ledger.finish("failed", e)
            raise
        if isinstance(action, decide.Fail):
            ledger.finish("failed", action.error)
            raise action.error from raised


__all__ = ["Backend", "TrainSpec", "register_backend", "get_backend", "available_backends", "MULTI_WORKER",
           "FAULT_INJECTION", "ELASTIC", "VIRTUAL_NODES", "HANG_DIAGNOSTICS", "PREEMPTION", "DURABLE_REPORT",
           "Session", "Coordinator", "RankInfo", "ReportReply", "InlineCoordinator", "install_session",
           "call_train_fn", "failure_from", "subscribe_callbacks", "worker_hooks", "run_attempts", "record_fault",
           "RunSettings"]

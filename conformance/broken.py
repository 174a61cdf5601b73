"""Deliberately broken backends: the conformance suite's self-test.

Each runs the training function in this process, like the ``local`` backend, and
breaks exactly one rule of the contract:

* ``broken-barrier``      ``report()`` returns before its round is committed (the commit
                          happens at the rank's next report, or never if it fails first);
* ``broken-checkpoints``  reports are committed but their checkpoints are dropped;
* ``broken-retries``      ``FailureConfig.max_failures`` is ignored: the first failure is final.

Importing this module registers them (``trainkit.backends.register_backend``) so that
``--trainkit-backend=broken-barrier`` and ``TorchTrainer(backend=...)`` find them.
tests/conformance/ runs the suite against them and checks that the expected cases fail
with messages naming the broken rule. Never use them for anything else. Runs in the
pytest process.
"""

from __future__ import annotations

import os
from typing import Optional

from trainkit import backends
from trainkit.backends.local import InlineCoordinator, _call, _failure_from
from trainkit.errors import WorkerGroupError
from trainkit.ledger import RunLedger
from trainkit.policies import FailureDecision, decide_failure
from trainkit.session import RankInfo, ReportReply, _Session, _set_session
from trainkit.storage import RunStore


class _LateCommit(InlineCoordinator):
    """Breaks the barrier: a report returns at once; it is committed when the next one arrives."""

    def __init__(self, ledger, attempt):
        super().__init__(ledger, attempt)
        self.pending: Optional[tuple] = None

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> ReportReply:
        self.flush()
        self.pending = (world_rank, index, metrics, checkpoint_dir, files)
        return ReportReply(None)  # "returned before commit": nothing committed yet

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            super().report(*pending)


class _DropCheckpoints(InlineCoordinator):
    """Breaks checkpoints: the round is committed without its checkpoint."""

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> ReportReply:
        return super().report(world_rank, index, metrics, None, None)


class BrokenBackend:
    """The local runner with one rule broken (``breaks``: barrier | checkpoints | retries)."""

    name = "broken"
    capabilities = frozenset({backends.FAULT_INJECTION, backends.DURABLE_REPORT})
    needs_ray = False
    breaks = ""

    def run(self, spec: backends.TrainSpec):
        rc = spec.run_config
        store = RunStore(rc.storage_path, rc.name, rc.storage_filesystem)
        ledger = RunLedger(store, rc.checkpoint_config, backend=self.name, num_workers=1)
        max_failures = 0 if self.breaks == "retries" else rc.failure_config.max_failures
        coordinator_cls = {"barrier": _LateCommit, "checkpoints": _DropCheckpoints}.get(self.breaks,
                                                                                        InlineCoordinator)
        while True:
            attempt = ledger.start_attempt(1, [{"world_rank": 0, "local_rank": 0, "node_rank": 0,
                                                "node_id": "local", "pid": os.getpid()}])
            coordinator = coordinator_cls(ledger, attempt)
            session = _Session(RankInfo(attempt=attempt, node_id="local"), store, coordinator,
                               experiment_name=rc.name, start_checkpoint=ledger.latest_checkpoint(),
                               start_index=ledger.latest_index, datasets=spec.datasets)
            _set_session(session)
            try:
                value = _call(spec)
            except Exception as e:  # noqa: BLE001 - a failed attempt; a pending late commit is lost
                ledger.failures += 1
                retry = decide_failure(ledger.failures, max_failures) is FailureDecision.RETRY
                failure = _failure_from(e, 0)
                ledger.record_failure(attempt, [failure], will_retry=retry)
                if retry:
                    continue
                err = WorkerGroupError(f"rank 0 raised {type(e).__name__}", [failure])
                ledger.finish("failed", err)
                raise err from e
            finally:
                _set_session(None)
            if isinstance(coordinator, _LateCommit):
                coordinator.flush()
            ledger.finish("finished")
            return ledger.result(return_value=value)


class SkipsBarrier(BrokenBackend):
    name = "broken-barrier"
    breaks = "barrier"


class DropsCheckpoints(BrokenBackend):
    name = "broken-checkpoints"
    breaks = "checkpoints"


class IgnoresMaxFailures(BrokenBackend):
    name = "broken-retries"
    breaks = "retries"


for _cls in (SkipsBarrier, DropsCheckpoints, IgnoresMaxFailures):
    backends.register_backend(_cls.name, f"{__name__}:{_cls.__name__}")

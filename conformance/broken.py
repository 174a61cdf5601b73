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

from typing import Optional

from trainkit.backends import api


class _LateCommit(api.InlineCoordinator):
    """Breaks the barrier: a report returns at once; it is committed when the next one arrives."""

    def __init__(self, ledger, attempt):
        super().__init__(ledger, attempt)
        self.pending: Optional[tuple] = None

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> api.ReportReply:
        self.flush()
        self.pending = (world_rank, index, metrics, checkpoint_dir, files)
        return api.ReportReply(None)  # "returned before commit": nothing committed yet

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            super().report(*pending)


class _DropCheckpoints(api.InlineCoordinator):
    """Breaks checkpoints: the round is committed without its checkpoint."""

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> api.ReportReply:
        return super().report(world_rank, index, metrics, None, None)


class BrokenBackend:
    """The local runner (``api.run_attempts``) with one rule broken (``breaks``: barrier | checkpoints | retries)."""

    name = "broken"
    capabilities = frozenset({api.FAULT_INJECTION, api.DURABLE_REPORT})
    handles_local_mode = False
    needs_ray = False
    breaks = ""

    def run(self, spec: api.TrainSpec):
        coordinator = {"barrier": _LateCommit, "checkpoints": _DropCheckpoints}.get(self.breaks,
                                                                                   api.InlineCoordinator)
        return api.run_attempts(spec, backend_name=self.name, num_workers=1, coordinator=coordinator,
                                max_failures=0 if self.breaks == "retries" else None, with_hooks=False,
                                before_finish=lambda c: c.flush() if isinstance(c, _LateCommit) else None)


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
    api.register_backend(_cls.name, f"{__name__}:{_cls.__name__}")

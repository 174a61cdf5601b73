"""The controller's state of one run, as data: the run, and its current attempt.

A ``Run`` lives from ``Controller.run`` to its return: the spec, the ledger (the run
folder's manifest and event stream), the failure budget, what is known of the cluster
(``Capacity``), a repaired group carried to the next attempt, and the progress the driver
polls. An ``Attempt`` lives from a group's start to its end: the group, its barrier, which
ranks finished or returned, preemption notices, the stop decided at a commit, and the
``ended`` future that anything ending the attempt (a mismatch, a commit error, a stop, a
hang, an abort) resolves with its failures.

Runs in the controller actor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Optional

from trainkit.backends.barrier import Barrier
from trainkit.backends.ray.capacity import Capacity
from trainkit.backends.decide import Budget
from trainkit.backends.ray.worker_group import Group
from trainkit.errors import WorkerFailure
from trainkit.storage import RunStore


@dataclass
class Attempt:
    number: int
    group: Group
    barrier: Barrier
    ended: asyncio.Future  # resolved with a list of WorkerFailure to end the attempt
    finished: dict = field(default_factory=dict)  # world rank -> run() record of a rank that finished
    returned: set = field(default_factory=set)  # world ranks whose run() returned (their process is reusable)
    preempted: dict = field(default_factory=dict)  # world rank -> (node id, deadline) of a preemption notice
    stop: Optional[WorkerFailure] = None  # set at a commit: end the attempt after it (resize, preemption)
    hang_error: Any = None  # HangConfig(action="fail"): the run ends with this HangDetectedError
    stragglers: Any = None  # a StragglerWatch (None: StragglerConfig(enabled=False))
    tasks: set = field(default_factory=set)  # background work of the attempt (straggler samples)

    @property
    def world_size(self) -> int:
        return len(self.group.ranks)

    def end(self, failures: list) -> None:
        """End the attempt with ``failures`` (the first call wins; later ones are collected by the
        supervisor through a fresh future)."""
        if not self.ended.done():
            self.ended.set_result(failures)

    def failure(self, world_rank: int, **kw) -> WorkerFailure:
        """A failure of ``world_rank`` with its node and pid filled in from the group."""
        info = self.group.info(world_rank)
        return WorkerFailure(world_rank=world_rank, node_id=info.get("node_id", ""), pid=info.get("pid"), **kw)


class Run:
    def __init__(self, run_id: str, spec, fn_bytes: bytes):
        self.run_id = run_id
        self.spec = spec
        self.fn_bytes = fn_bytes
        rc = spec.run_config
        self.store = RunStore(rc.storage_path, rc.name, rc.storage_filesystem)
        self.ledger = None  # RunLedger, made in the attempt loop (it touches storage)
        self.attempt: Optional[Attempt] = None
        self.budget = Budget()
        self.capacity = Capacity(spec.scaling_config)
        self.carry: Optional[Group] = None  # a repaired group for the next attempt
        self.aborted = False
        self.channel: Optional[tuple] = None  # the controller's report channel address (None: actor calls)
        self.waiting = False  # its next group waits for resources that other fits of this driver hold
        self.progress: dict = {"index": 0, "metrics": None, "world_size": 0, "attempt": 0, "status": "starting"}
        if spec.run_config.spare_workers:
            self.progress.update(spares=0, spares_wanted=spec.run_config.spare_workers)

    def current(self, attempt: int) -> Optional[Attempt]:
        """The attempt numbered ``attempt`` if it is the one running (None: it is over)."""
        a = self.attempt
        return a if a is not None and a.number == attempt else None

"""What the cluster can hold for a run: trusted nodes, resource views and the grow probe.

Ray's view of free resources lags the truth by a few hundred milliseconds, and a lost node
looks alive until Ray declares it dead. So a run keeps, per node, when a worker last died
there (``suspect``: maybe a lost node) and until when a preemption notice distrusts it
(``doomed``); elastic sizing counts only trusted nodes. After a group is released the
controller waits until the view shows its resources back (``settle``): a node whose raylet
returns them is alive and trusted again at once. Growth is decided by a placement-group
probe for the extra workers, in the background, never by the lagging view alone.

The pure parts (``trusted``, ``held_by_node``, ``released``) are unit-tested without Ray.
Runs in the controller actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping, Optional

from trainkit.policies import count_fitting_workers, decide_group_size

logger = logging.getLogger("trainkit.controller")

SUSPECT_S = 30.0  # how long a node where a worker died stays out of elastic sizing
PROBE_S = 2.0  # how long a grow probe may wait for its placement group
SETTLE_S = 5.0  # how long a released group's resources may take to show as free
MAX_GROW_BACKOFF_S = 60.0
NODE_GONE_SLACK_S = 5.0  # after a preemption's grace, how long a restart still waits for the node to leave


def trusted(per_node: Mapping[str, dict], suspect: Mapping[str, float], doomed: Mapping[str, float],
            now: float) -> dict:
    """``per_node`` without the nodes where a worker died in the last ``SUSPECT_S`` or whose
    preemption notice has not run out."""
    return {n: r for n, r in per_node.items()
            if now - suspect.get(n, -1e9) > SUSPECT_S and now > doomed.get(n, 0.0)}


def held_by_node(infos, per_worker: Mapping[str, float]) -> dict:
    """The resources a group holds, by node: ``per_worker`` for each worker's node."""
    held: dict[str, dict] = {}
    for info in infos:
        node = held.setdefault(info["node_id"], {})
        for r, v in per_worker.items():
            node[r] = node.get(r, 0) + v
    return held


def add_resources(per_node: dict, held: Mapping[str, dict]) -> dict:
    """``per_node`` plus ``held`` (in place; returned)."""
    for n, res in held.items():
        node = per_node.setdefault(n, {})
        for r, v in res.items():
            node[r] = node.get(r, 0) + v
    return per_node


def released(now_free: Mapping[str, dict], before: Mapping[str, dict], held: Mapping[str, dict]) -> tuple:
    """``(nodes that show the held resources free again, nodes declared dead)`` given the free
    view ``before`` the release and ``now_free``."""
    back, dead = set(), set()
    for n, res in held.items():
        if n not in now_free:
            dead.add(n)
        elif all(now_free[n].get(r, 0) + 1e-9 >= before.get(n, {}).get(r, 0) + v for r, v in res.items()):
            back.add(n)
    return back, dead


def resources_by_node(available: bool) -> dict:
    """Resources of every alive node, free (``available``) or in total.

    Ray has no public per-node view of free resources without the dashboard; this is the one
    place trainkit reads ``ray._private.state`` (as Ray's own libraries do).
    """
    from ray._private import state

    per_node = state.available_resources_per_node() if available else state.total_resources_per_node()
    alive = alive_nodes()
    return {k: dict(v) for k, v in per_node.items() if k in alive}


def alive_nodes() -> set:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class Capacity:
    """One run's knowledge of the cluster, and its grow probe."""

    def __init__(self, scaling_config):
        self.sc = scaling_config
        self.suspect: dict[str, float] = {}  # node id -> when a worker died there
        self.doomed: dict[str, float] = {}  # node id -> until when a preemption notice distrusts it
        self.last_check = 0.0
        self.backoff_s = 1.0  # doubled after a grow that could not be placed
        self.probe_task: Optional[asyncio.Future] = None
        self.ready = 0  # extra workers a probe could place: grow at the next checkpointed report

    def worker_died(self, node_id: str) -> None:
        self.suspect[node_id] = time.monotonic()

    def notice(self, node_id: str, grace_s: float) -> None:
        """A preemption notice on ``node_id``: leave it out for its grace and then some."""
        self.doomed[node_id] = time.monotonic() + grace_s + SUSPECT_S

    def grow_failed(self) -> None:
        self.backoff_s = min(self.backoff_s * 2, MAX_GROW_BACKOFF_S)

    def new_attempt(self) -> None:
        self.ready = 0
        if self.probe_task is not None:
            self.probe_task.cancel()
            self.probe_task = None

    def trusted_free(self, extra_held: Optional[Mapping[str, dict]] = None) -> tuple[dict, dict]:
        """``(free resources on trusted nodes, free resources on every node)``, counting
        ``extra_held`` (idle warm groups this run may take) as free."""
        free = add_resources(resources_by_node(available=True), extra_held or {})
        return trusted(free, self.suspect, self.doomed, time.monotonic()), free

    async def settle(self, held: Mapping[str, dict], before: Mapping[str, dict], timeout_s: float = SETTLE_S) -> None:
        """Wait until the free view shows ``held`` released (``before``: the view before the release)."""
        deadline = time.monotonic() + timeout_s
        pending = dict(held)
        while pending and time.monotonic() < deadline:
            back, dead = released(resources_by_node(available=True), before, pending)
            for n in back:
                self.suspect.pop(n, None)  # its raylet returned the resources: alive
            for n in back | dead:
                pending.pop(n, None)
            if pending:
                await asyncio.sleep(0.05)
        if pending:
            logger.debug("nodes %s did not release resources within %.1f s", sorted(pending), timeout_s)

    async def choose_size(self, idle_held: Mapping[str, dict], timeout_s: float) -> int:
        """The size of the next group: ``max_workers``, or for an elastic run the largest that
        fits now (waiting up to ``timeout_s`` for ``min_workers``)."""
        from trainkit.errors import ControllerError

        sc = self.sc
        per_worker = sc.worker_resources
        total = resources_by_node(available=False)
        if count_fitting_workers(total, per_worker) < sc.min_workers:
            have = {r: sum(n.get(r, 0) for n in total.values()) for r in per_worker}
            raise ControllerError(
                f"the cluster can never hold {sc.min_workers} worker(s) of {per_worker}: it has {have} in "
                f"{len(total)} node(s). Lower ScalingConfig.num_workers or resources_per_worker, or add nodes.")
        if not sc.elastic:
            return sc.max_workers
        deadline = time.monotonic() + timeout_s
        while True:
            good, free = self.trusted_free(idle_held)
            fitting = count_fitting_workers(good, per_worker)
            if fitting < sc.min_workers:  # suspect nodes may be fine after all (a killed worker, not a lost node)
                fitting = count_fitting_workers(free, per_worker)
            decision = decide_group_size(fitting, sc.min_workers, sc.max_workers)
            if decision.world_size:
                return decision.world_size
            if time.monotonic() > deadline:
                raise ControllerError(f"timed out waiting for resources: {decision.reason}")
            await asyncio.sleep(0.2)

    def maybe_probe(self, world_size: int) -> None:
        """At a report of an elastic group below ``max_workers``: start a background placement
        probe for the extra workers that the (lagging) free view suggests, at most one at a
        time and not more often than the back-off allows."""
        now = time.monotonic()
        if self.probe_task is not None or now - self.last_check < self.backoff_s:
            return
        self.last_check = now
        good, _ = self.trusted_free()
        extra = min(count_fitting_workers(good, self.sc.worker_resources), self.sc.max_workers - world_size)
        if extra > 0:
            self.probe_task = asyncio.ensure_future(self._probe(extra))

    async def _probe(self, extra: int) -> None:
        from ray.util.placement_group import placement_group, remove_placement_group

        pg = placement_group([dict(self.sc.worker_resources) for _ in range(extra)], strategy="SPREAD")
        try:
            await asyncio.wait_for(pg.ready(), PROBE_S)
            placed = True
        except asyncio.TimeoutError:
            placed = False
        finally:  # cancelled (a new attempt) or done: the probe holds nothing afterwards
            remove_placement_group(pg)
        self.probe_task = None
        if placed:
            logger.debug("capacity for %d more worker(s)", extra)
            self.ready = extra
            self.backoff_s = 1.0
        else:
            self.grow_failed()

    async def wait_nodes_gone(self, deadlines: Mapping[str, float]) -> None:
        """Before a restart, let preempted nodes that are going away go (each bounded by its
        notice's deadline plus ``NODE_GONE_SLACK_S``)."""
        pending = dict(deadlines)
        while pending:
            alive = alive_nodes()
            now = time.monotonic()
            pending = {n: d for n, d in pending.items() if n in alive and now < d + NODE_GONE_SLACK_S}
            if pending:
                await asyncio.sleep(0.2)

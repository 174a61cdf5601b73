"""The driver-side broker for node faults: ranks ask, the driver removes and adds nodes.

Only the driver holds the ``ray.cluster_utils.Cluster`` that can remove or add a
virtual node, so a rank that triggers ``kill_node``, ``add_node`` or a node ``preempt``
calls a small named actor (``num_cpus=0``, pinned to the head node so that it never dies
with a node) and waits; a thread in the driver takes the requests from it, acts on the
cluster, and answers. Node ``i`` of a scenario is the i-th virtual node; each carries the
custom resource ``tk_node_<i>`` so that placements and ``ray.nodes()`` show which is which.

A node ``preempt`` gives each rank on the node its notice through the rank's actor
(``RankWorker.preempt(grace_s)``, what the rank's own SIGTERM handler calls), so that the
``preempted`` event records the scenario's ``grace_s``: a SIGTERM from outside the rank
cannot carry it. Ranks of a plan with node preemptions register their actor with the
broker at their first report of each attempt (``register_rank``); a rank not registered in
time gets the SIGTERM instead. The node is removed after ``grace_s``.

Runs in the driver (``NodeBroker``), in an actor on the head node (``_BrokerActor``),
and in ranks (``request``, ``register_rank``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from typing import Any, Optional

NODE_RESOURCE = "tk_node_{}"
REQUEST_TIMEOUT_S = 120.0
REGISTER_WAIT_S = 10.0  # how long a node preemption waits for the node's ranks to register their actors


class _BrokerActor:
    def __init__(self):
        self.queue: list = []
        self.waiting: dict[int, asyncio.Future] = {}
        self.n = 0
        self.ranks: dict[int, Any] = {}  # pid -> the rank's actor handle (register_rank)

    async def request(self, op: dict) -> dict:
        self.n += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[self.n] = fut
        self.queue.append((self.n, op))
        return await fut

    async def take(self) -> list:
        q, self.queue = self.queue, []
        return q

    async def register(self, pid: int, handle) -> None:
        self.ranks[pid] = handle

    async def handles(self, pids: list) -> dict:
        return {pid: self.ranks[pid] for pid in pids if pid in self.ranks}

    async def done(self, request_id: int, result: dict) -> None:
        fut = self.waiting.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)


def request(address: tuple, op: dict) -> dict:
    """From a rank: ask the broker for a node operation and wait until it is done."""
    import ray

    from trainkit.errors import TrainkitError

    name, namespace = address
    actor = ray.get_actor(name, namespace=namespace)
    result = ray.get(actor.request.remote(op), timeout=REQUEST_TIMEOUT_S)
    if result.get("error"):
        raise TrainkitError(f"node fault {op['op']} failed in the driver: {result['error']}")
    return result


def register_rank(address: tuple) -> None:
    """From a rank, at its first report of an attempt: tell the broker this process's actor, so that a
    node preemption can hand it the grace period. Best effort: a rank that is not an actor is SIGTERMed."""
    import ray

    try:
        me = ray.get_runtime_context().current_actor
        ray.get(ray.get_actor(address[0], namespace=address[1]).register.remote(os.getpid(), me), timeout=30)
    except Exception:  # noqa: BLE001 - not an actor, or the broker is gone: the SIGTERM path remains
        pass


class NodeBroker:
    """Acts on a ``ray.cluster_utils.Cluster`` for the ranks' node faults.

    >>> broker = NodeBroker(cluster, nodes=[n0, n1], cpus_per_node=1).start()  # doctest: +SKIP
    >>> plan = FaultPlan(faults=[{"action": "kill_node", "node": 1, "at": {"report": 3}}], broker=broker)  # doctest: +SKIP
    >>> broker.stop()  # doctest: +SKIP

    ``log`` lists what was done: ``(time, op, node index)``.
    """

    def __init__(self, cluster, nodes: list, cpus_per_node: int = 1):
        self.cluster = cluster
        self.nodes: dict[int, Any] = dict(enumerate(nodes))
        self.cpus_per_node = cpus_per_node
        self.next_index = len(nodes)
        self.log: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._actor = None
        self._name = f"trainkit_node_broker_{uuid.uuid4().hex[:8]}"
        self._namespace = None
        self._thread: Optional[threading.Thread] = None
        self._timers: list[threading.Thread] = []

    def start(self, background: bool = True) -> "NodeBroker":
        """Create the broker actor; with ``background`` a driver thread serves it (``add_node`` then
        fails: Ray starts nodes from the main thread only). Otherwise call ``serve(until)`` from the main thread."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._namespace = ray.get_runtime_context().namespace
        here = ray.get_runtime_context().get_node_id()
        self._actor = ray.remote(num_cpus=0, max_restarts=0)(_BrokerActor).options(
            name=self._name, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
        ray.get(self._actor.take.remote())
        if background:
            self._thread = threading.Thread(target=self._loop, name="trainkit-node-broker", daemon=True)
            self._thread.start()
        return self

    def serve(self, until: threading.Event) -> None:
        """Serve requests in this (the main) thread until ``until`` is set."""
        import ray

        while not until.is_set() and not self._stop.is_set():
            try:
                todo = ray.get(self._actor.take.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - Ray shutting down
                return
            for request_id, op in todo:
                self._serve(request_id, op)
            until.wait(0.05)

    def address(self) -> tuple:
        return (self._name, self._namespace)

    def stop(self) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for t in self._timers:
            t.join(0)
        if self._actor is not None:
            try:
                ray.kill(self._actor)
            except Exception:  # noqa: BLE001 - Ray already down
                pass
            self._actor = None

    # -- the driver loop ---------------------------------------------------------------
    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                todo = ray.get(self._actor.take.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - Ray shutting down
                return
            for request_id, op in todo:
                threading.Thread(target=self._serve, args=(request_id, op), daemon=True).start()
            self._stop.wait(0.05)

    def _serve(self, request_id: int, op: dict) -> None:
        handlers = {"kill_node": self._kill_node, "add_node": self._add_node, "preempt": self._preempt}
        try:
            if op.get("op") not in handlers:
                raise ValueError(f"unknown node operation {op.get('op')!r} (known: {', '.join(handlers)})")
            result = handlers[op["op"]](op)
        except Exception as e:  # noqa: BLE001 - the rank raises it, naming the fault
            result = {"error": f"{type(e).__name__}: {e}"}
        try:
            self._actor.done.remote(request_id, result)
        except Exception:  # noqa: BLE001
            pass

    def _handle(self, index: Optional[int]):
        if index not in self.nodes:
            raise KeyError(f"node {index} is not in the cluster (nodes now: {sorted(self.nodes)})")
        return self.nodes[index]

    def _kill_node(self, op: dict) -> dict:
        with self._lock:
            handle = self._handle(op["node"])
            self.cluster.remove_node(handle, allow_graceful=False)
            del self.nodes[op["node"]]
        # remove_node stops the node's raylet; its rank processes notice only later and meanwhile go on
        # reporting. A lost node takes every process on it at once, before the triggering rank goes on.
        pids = ranks_on_node(op["store"], handle.node_id) if op.get("store") is not None else []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.append((time.time(), "kill_node", op["node"]))
        return {"node_id": handle.node_id, "pids": pids}

    def _add_node(self, op: dict) -> dict:
        with self._lock:
            index = self.next_index
            self.next_index += 1
            cpus = op.get("cpus") if op.get("cpus") is not None else self.cpus_per_node
            handle = self.cluster.add_node(num_cpus=cpus, resources={NODE_RESOURCE.format(index): 1})
            self.nodes[index] = handle
        self.log.append((time.time(), "add_node", index))
        return {"node": index, "node_id": handle.node_id}

    def _preempt(self, op: dict) -> dict:
        """Give every rank on the node the notice now, with ``grace_s``; remove the node after ``grace_s``."""
        with self._lock:
            handle = self._handle(op["node"])
        pids = ranks_on_node(op["store"], handle.node_id)
        notified = self._notify(pids, float(op.get("grace_s") or 0.0))
        for pid in pids:
            if pid in notified:
                continue
            try:  # no actor to tell: the SIGTERM notice (its handler cannot know the grace period)
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.log.append((time.time(), "preempt", op["node"]))

        def remove_later():
            if self._stop.wait(op.get("grace_s") or 0.0):
                return
            with self._lock:
                if self.nodes.get(op["node"]) is handle:
                    self.cluster.remove_node(handle, allow_graceful=False)
                    del self.nodes[op["node"]]
            self.log.append((time.time(), "node_removed", op["node"]))

        t = threading.Thread(target=remove_later, daemon=True)
        t.start()
        self._timers.append(t)
        return {"node_id": handle.node_id, "pids": pids, "notified": sorted(notified)}

    def _notify(self, pids: list, grace_s: float) -> set:
        """``preempt(grace_s)`` on the actor of each rank in ``pids``; the pids that took it."""
        done = set()
        for pid, rank in self._rank_handles(pids).items():
            try:
                self._call(rank.preempt.remote(grace_s))
                done.add(pid)
            except Exception:  # noqa: BLE001 - not a RankWorker, or gone: the SIGTERM instead
                pass
        return done

    def _rank_handles(self, pids: list) -> dict:
        """pid -> actor of the ranks that registered, waiting up to REGISTER_WAIT_S for all of them (a rank
        registers at its first report of an attempt: one behind the triggering rank may not have yet)."""
        import ray

        deadline = time.monotonic() + REGISTER_WAIT_S
        while True:
            try:
                found = ray.get(self._actor.handles.remote(list(pids)), timeout=10)
            except Exception:  # noqa: BLE001 - Ray shutting down
                return {}
            if len(found) == len(pids) or time.monotonic() > deadline or self._stop.wait(0.1):
                return found

    def _call(self, ref) -> None:
        import ray

        ray.get(ref, timeout=30)


def ranks_on_node(store, node_id: str) -> list[int]:
    """Pids of the current attempt's ranks on a node, from the run's event stream."""
    from trainkit import events as ev
    from trainkit.storage import EVENTS

    read = ev.parse_events(store.read_bytes(EVENTS) or b"")
    started = [e for e in read.events if isinstance(e, ev.AttemptStarted) and e.ranks]
    if not started:
        return []
    return [r["pid"] for r in started[-1].ranks if r.get("node_id") == node_id and r.get("pid")]

"""Worker groups: placement, the warm pool, repair, and the torch rank layout.

A ``Group`` is one placement group with one ``RankWorker`` actor per bundle. Healthy groups
are kept warm (``WorkerPool.idle``) after a fit and reused by the next fit of the same shape
(``Group.key``). After a failure the ranks whose processes returned are kept and only the
dead or stuck ones are replaced (``repair``): by a hot spare when the run keeps some
(``RunConfig(spare_workers=N)``: workers started, placed and torch-imported in the background,
each in a placement group of its own, refilled in the background after one is used), else by
a fresh worker in the same placement group (one worker start). ``rank_layout`` is pure: world ranks grouped by node, in order of first appearance,
consecutive within a node, with ``local_rank``, ``local_world_size`` and ``node_rank``.

Runs in the controller actor. Ray is imported where it is used, so that the pure parts
(``rank_layout``, ``Group.held``) are unit-tested without it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from trainkit.backends.decide import plan_repair
from trainkit.backends.ray.capacity import add_resources, held_by_node
from trainkit.config import PROCESS_GROUP_TIMEOUT_S
from trainkit.errors import ControllerError

logger = logging.getLogger("trainkit.controller")

QUICK_PLACE_S = 10.0  # an elastic group larger than min_workers that cannot be placed this fast is smaller
INIT_PROCESS_GROUP_S = 120.0
PING_S = 5.0  # a warm worker that does not answer this fast is dropped
SPARE_PING_S = 1.0  # a spare that does not answer this fast is not used
SPARE_NOTICE_S = 5.0  # a spare not started by then is said to be waiting for room (an event)
WARM_S = 10.0  # a spare's rehearsal (its imports) that takes longer is left to finish on its own


class NotPlaced(Exception):
    """An elastic group of this size could not be placed quickly; try a smaller one."""


@dataclass
class Group:
    """Workers by index (``workers``, ``infos``, ``slots``): the group's ranks (``active``) and its hot
    spares (``spares``: started, ready, not ranks; ``pending``: being started). The first
    ``size`` indices are the bundles of ``pg`` in order; a spare has a placement group of its own
    (``slots``), so a spare that cannot be placed never holds up the group's start."""

    key: tuple  # (size, resources per worker, placement strategy, runtime env, spares): what can reuse it
    pg: Any
    workers: list  # worker index -> actor (None: a slot whose worker is gone)
    infos: list  # worker index -> setup() record (None until started)
    ranks: list = field(default_factory=list)  # world rank -> worker index
    slots: list = field(default_factory=list)  # worker index -> (placement group, bundle index)
    active: list = field(default_factory=list)  # worker indices of the ranks (rank_layout orders them)
    spares: list = field(default_factory=list)  # worker indices of ready spares
    pending: dict = field(default_factory=dict)  # worker index -> task starting it as a spare
    refill: list = field(default_factory=list)  # worker indices (slots) to start spares in after the next commit
    on_event: Any = None  # where spare events go: the run that holds the group (set by keep_spares)

    def tell(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def __post_init__(self):
        if not self.slots:
            self.slots = [(self.pg, b) for b in range(len(self.workers))]
        if not self.active:
            self.active = list(range(len(self.workers)))

    @property
    def per_worker(self) -> dict:
        return dict(self.key[1])

    def info(self, world_rank: int) -> dict:
        return self.infos[self.ranks[world_rank]] if 0 <= world_rank < len(self.ranks) else {}

    def held(self) -> dict:
        return held_by_node([i for i in self.infos if i], self.per_worker)

    def live(self) -> list:
        """Worker indices of the ranks and the ready spares."""
        return list(self.active) + list(self.spares)

    def kill(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for task in list(self.pending.values()):
            task.cancel()
        self.pending.clear()
        self.refill.clear()
        for w in self.workers:
            if w is not None:
                _kill(w)
        pgs = {id(self.pg): self.pg, **{id(pg): pg for pg, _ in self.slots}}
        for pg in pgs.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already removed
                pass


def rank_layout(node_ids: Sequence[str]) -> tuple[list, list]:
    """``(world rank -> bundle index, per bundle {local_rank, local_world_size, node_rank})`` for
    workers on ``node_ids`` (bundle order): ranks grouped by node in order of first appearance.

    >>> rank_layout(["b", "a", "b"])[0]
    [0, 2, 1]
    """
    order: list[str] = []
    for n in node_ids:
        if n not in order:
            order.append(n)
    ranks = [b for node in order for b, n in enumerate(node_ids) if n == node]
    per_node = {node: [b for b in ranks if node_ids[b] == node] for node in order}
    layout = [{"local_rank": per_node[n].index(b), "local_world_size": len(per_node[n]), "node_rank": order.index(n)}
              for b, n in enumerate(node_ids)]
    return ranks, layout


def group_key(size: int, scaling_config, env, spares: int = 0) -> tuple:
    return (size, tuple(sorted(scaling_config.worker_resources.items())), scaling_config.placement_strategy,
            repr(env), spares)


class WorkerPool:
    """The controller's worker groups: warm idle ones, and how to start, repair and release them.

    Several fits of one driver share the pool. A fit whose group cannot be placed because
    other fits of this driver hold the resources waits for them (``waiters``): a group
    released meanwhile is handed to a waiter of the same shape, or killed so that its
    resources go to the waiter, instead of being kept warm.
    """

    def __init__(self):
        self.idle: list[Group] = []
        self.waiters: list[tuple[tuple, asyncio.Future]] = []  # (group key, future of a handed-over group)

    def idle_held(self) -> dict:
        """Resources the warm idle groups hold, by node (a new run may take them)."""
        out: dict[str, dict] = {}
        for g in self.idle:
            add_resources(out, g.held())
        return out

    def release(self, group: Group, healthy: bool, run=None) -> None:
        group.on_event = None  # its run is over
        if healthy and run is not None:
            refill_spares(run, group)  # a warm group keeps its spares
        if healthy:
            for key, fut in self.waiters:
                if key == group.key and not fut.done():
                    fut.set_result(group)  # a waiting fit of the same shape takes it, warm
                    return
        if healthy and not self.waiters:
            self.idle.append(group)
        else:
            group.kill()  # its resources go to a waiting fit

    def shutdown(self) -> None:
        for g in self.idle:
            g.kill()
        self.idle.clear()

    async def start(self, run, size: int, carried: Optional[Group], quick: bool = False,
                    others_busy=lambda: False) -> Group:
        """A started group of ``size`` with torch.distributed initialised: ``carried`` (a repaired
        group) if it fits, else a warm one, else a new one."""
        import ray

        sc = run.spec.scaling_config
        env = run.spec.run_config.worker_runtime_env
        key = group_key(size, sc, env, run.spec.run_config.spare_workers)
        if carried is not None:
            if carried.key == key:
                try:
                    await self.init_torch(run, carried)
                    return carried
                except (ray.exceptions.RayError, asyncio.TimeoutError) as e:  # a kept worker died meanwhile
                    logger.warning("run %s: the repaired group cannot start (%r); starting a new one", run.run_id, e)
                    await discard(run, carried)
            else:
                carried.kill()
        group = None
        for g in list(self.idle):
            if g.key == key:
                self.idle.remove(g)
                try:
                    await asyncio.wait_for(asyncio.gather(*[g.workers[i].ping.remote() for i in g.live()]), PING_S)
                    group = g
                    break
                except (ray.exceptions.RayError, asyncio.TimeoutError):  # a dead warm worker: drop the group
                    g.kill()
        if group is None:
            self.shutdown()  # free their resources for the new shape
            group = await self.place(run, size, key, env, quick, others_busy)
        try:
            await self.init_torch(run, group)
        except BaseException:
            group.kill()
            raise
        return group

    async def init_torch(self, run, group: Group) -> None:
        order, layout = rank_layout([group.infos[i]["node_id"] for i in group.active])
        group.ranks = [group.active[o] for o in order]
        for i, extra in zip(group.active, layout):
            group.infos[i].update(extra)
        tc = run.spec.torch_config
        use_gpu = run.spec.scaling_config.use_gpu
        backend = getattr(tc, "backend", None) or ("nccl" if use_gpu else "gloo")
        timeout_s = getattr(tc, "timeout_s", PROCESS_GROUP_TIMEOUT_S)
        port = await group.workers[group.ranks[0]].free_port.remote()
        addr = group.infos[group.ranks[0]]["ip"]
        calls = []
        for r, b in enumerate(group.ranks):
            info = dict(group.infos[b], world_rank=r, world_size=len(group.ranks))
            cuda = None
            if use_gpu:  # every rank sees its node's GPUs; local_rank picks one
                cuda = ",".join(sorted({g for i in (group.infos[a] for a in group.active)
                                        if i["node_id"] == info["node_id"] for g in i["gpu_ids"]}))
            calls.append(group.workers[b].init_process_group.remote(addr, port, info, backend, timeout_s, cuda))
        await asyncio.wait_for(asyncio.gather(*calls), INIT_PROCESS_GROUP_S)

    async def place(self, run, size: int, key: tuple, env, quick: bool, others_busy) -> Group:
        """A new group of ``size``, or one another fit of this driver released meanwhile.

        While other fits of this driver hold resources (``others_busy()``), the wait has no
        deadline and the run's progress says what it waits for; otherwise it is bounded by
        ``TRAINKIT_WORKER_START_TIMEOUT_S`` (``QUICK_PLACE_S`` for an elastic try at a larger size).
        """
        from ray.util.placement_group import placement_group, remove_placement_group

        sc = run.spec.scaling_config
        res = sc.worker_resources
        pg = placement_group([dict(res) for _ in range(size)], strategy=sc.placement_strategy)
        timeout_s = QUICK_PLACE_S if quick else run.spec.worker_start_timeout_s
        deadline = time.monotonic() + timeout_s
        ready = asyncio.ensure_future(_awaited(pg.ready()))
        handed = asyncio.get_running_loop().create_future()
        waiter = (key, handed)
        taken = None
        self.waiters.append(waiter)
        try:
            while not ready.done():
                run.waiting = True
                if others_busy() and not quick:
                    deadline = time.monotonic() + timeout_s  # they will finish: wait for them
                    want = ", ".join(f"{v * size:g} {r}" for r, v in res.items() if v)
                    run.progress.update(status="waiting", waiting=f"{want} held by another fit of this driver")
                elif time.monotonic() > deadline:
                    remove_placement_group(pg)
                    if quick:
                        raise NotPlaced()
                    raise ControllerError(f"could not place {size} worker(s) of {res} with strategy "
                                          f"{sc.placement_strategy} within {timeout_s:.0f} s "
                                          "(TRAINKIT_WORKER_START_TIMEOUT_S); the cluster is busy or too small")
                done, _ = await asyncio.wait({ready, handed}, timeout=min(0.5, timeout_s),
                                             return_when=asyncio.FIRST_COMPLETED)
                if handed in done:
                    remove_placement_group(pg)
                    taken = handed.result()
                    return taken
        finally:
            run.waiting = False
            self.waiters.remove(waiter)
            ready.cancel()
            if taken is None and handed.done():  # handed a group it no longer needs: pass it on
                self.release(handed.result(), healthy=True)
        ready.result()
        return await _start_workers(run, pg, size, key, env)


async def _awaited(awaitable):
    return await awaitable


async def _start_workers(run, pg, size: int, key: tuple, env) -> Group:
    res = run.spec.scaling_config.worker_resources
    timeout_s = run.spec.worker_start_timeout_s
    workers = [make_worker(pg, i, res, env) for i in range(size)]
    try:
        infos = await asyncio.wait_for(asyncio.gather(*[w.setup.remote() for w in workers]), timeout_s)
    except asyncio.TimeoutError:
        Group(key, pg, workers, []).kill()
        raise ControllerError(f"{size} worker(s) were placed but did not start within {timeout_s:.0f} s "
                              "(TRAINKIT_WORKER_START_TIMEOUT_S): the machine is overloaded, or worker "
                              "processes are slow to import their runtime environment") from None
    except BaseException:
        Group(key, pg, workers, []).kill()
        raise
    return Group(key, pg, workers, list(infos))


async def repair(run, group: Group, reusable: set, on_event=None, attempt: int = 0,
                 regrow_after=None) -> Optional[Group]:
    """Replace the ranks' workers outside ``reusable`` (worker indices), in place: by a ready hot
    spare where there is one (its old slot is refilled with a new spare in the background), else
    by a fresh worker in the same slot (one worker start, awaited); an elastic group above
    ``min_workers`` re-forms without it instead, its slot starting a worker in the background that
    the group grows with (``decide.plan_repair``). None (and the group gone)
    when that cannot be done. ``on_event``: receives the spare events (``attempt``: the one that failed).
    ``regrow_after``: a coroutine function the background starts wait for first (``start_spare``)."""
    import ray

    from trainkit import events as ev

    sc = run.spec.scaling_config
    env = run.spec.run_config.worker_runtime_env
    if on_event is not None:
        group.on_event = on_event
    refill_spares(run, group)  # deferred ones of an earlier repair: start them now
    lost = [b for b in group.active if b not in reusable]
    kept = len(group.active) - len(lost)
    fresh, swapped, regrow, used = {}, [], [], 0
    for b in lost:
        old_info = group.infos[b] or {}
        _kill(group.workers[b])
        spare = await _take_spare(group)
        if spare is not None:  # the spare becomes the rank; the dead one's slot makes a new spare
            used += 1
            group.active[group.active.index(b)] = spare
            group.workers[b] = group.infos[b] = None
            swapped.append(b)
            new_info = group.infos[spare]
            group.tell(ev.SpareUsed(attempt=attempt, replaced_pid=old_info.get("pid"),
                                    replaced_node_id=old_info.get("node_id", ""), pid=new_info.get("pid"),
                                    node_id=new_info.get("node_id", ""), ready=len(group.spares)))
            continue
        plan = plan_repair(kept=kept + used + len(fresh), lost=1, spares_ready=0, elastic=sc.elastic,
                           min_workers=sc.min_workers)
        if plan.regrow:  # elastic: re-form without it; its worker starts in the background, the group grows back
            group.active.remove(b)
            group.workers[b] = group.infos[b] = None
            regrow.append(b)
        else:
            group.workers[b] = fresh[b] = make_worker(*group.slots[b], group.per_worker, env)
    # the new spares start after the repaired group's first commit (refill_spares): a worker start
    # (a torch import) beside the group's restart would slow it down on a small machine
    group.refill.extend(swapped)
    for b in regrow:  # at once, with no deadline: their bundles come back with the capacity
        start_spare(run, group, b, regrow=True, not_before=regrow_after)
    group.key = (len(group.active),) + tuple(group.key[1:])
    if not fresh:
        return group
    try:
        got = await asyncio.wait_for(asyncio.gather(*[w.setup.remote() for w in fresh.values()]),
                                     run.spec.worker_start_timeout_s)
    except (ray.exceptions.RayError, asyncio.TimeoutError):  # cannot repair in place: start a new group
        group.kill()
        await wait_removed(group)
        return None
    for b, info in zip(fresh, got):
        group.infos[b] = info
    return group


async def _take_spare(group: Group) -> Optional[int]:
    """A ready spare that still answers (its worker index), taken out of ``group.spares``; None if none."""
    import ray

    while group.spares:
        i = group.spares.pop(0)
        try:
            await asyncio.wait_for(group.workers[i].ping.remote(), SPARE_PING_S)
            return i
        except (ray.exceptions.RayError, asyncio.TimeoutError):  # a dead spare: its slot gets a new one
            _kill(group.workers[i])
            group.workers[i] = group.infos[i] = None
    return None


def grow(run, group: Group) -> int:
    """Move ready spares into ``group``'s ranks, up to ``max_workers`` (an elastic group grows in place:
    its ranks keep their processes). Returns how many joined."""
    n = min(len(group.spares), run.spec.scaling_config.max_workers - len(group.active))
    for _ in range(max(0, n)):
        group.active.append(group.spares.pop(0))
    group.key = (len(group.active),) + tuple(group.key[1:])
    return max(0, n)


def refill_spares(run, group: Group) -> None:
    """Start the spares that ``repair`` deferred (the slots of the replaced workers), in the background."""
    slots, group.refill = group.refill, []
    for i in slots:
        start_spare(run, group, i)


def keep_spares(run, group: Group, on_event=None) -> None:
    """Top ``group`` up to ``RunConfig.spare_workers`` spares, in the background: each new spare
    gets a placement group of one bundle of its own, so the group never waits for it. Spares
    already ready (a warm group's) are told to ``on_event`` as ready."""
    from ray.util.placement_group import placement_group

    from trainkit import events as ev

    group.on_event = on_event
    emit = group.tell
    for n, i in enumerate(group.spares, start=1):
        info = group.infos[i]
        emit(ev.SpareReady(node_id=info.get("node_id", ""), pid=info.get("pid"), ready=n,
                           wanted=run.spec.run_config.spare_workers, warm=True))
    missing = run.spec.run_config.spare_workers - len(group.spares) - len(group.pending) - len(group.refill)
    for _ in range(max(0, missing)):
        pg = placement_group([dict(group.per_worker)], strategy="PACK")
        group.slots.append((pg, 0))
        group.workers.append(None)
        group.infos.append(None)
        start_spare(run, group, len(group.slots) - 1)


def start_spare(run, group: Group, i: int, regrow: bool = False, not_before=None) -> None:
    """Start a spare worker in slot ``i`` of ``group`` in the background (its events: ``group.tell``).
    ``regrow``: the slot of a rank an elastic group re-formed without; it waits for room with no
    deadline (its bundle comes back with the capacity), and the group grows with it.
    ``not_before``: a coroutine function awaited before the worker is made (the noticed nodes of a
    preemption leaving, so that the slot's bundle is placed elsewhere)."""
    task = asyncio.ensure_future(_start_spare(run, group, i, regrow, not_before))
    group.pending[i] = task

    def done(t, i=i):
        if group.pending.get(i) is t:
            del group.pending[i]
        if not t.cancelled() and t.exception() is not None:
            logger.warning("run %s: a spare worker could not start: %r", run.run_id, t.exception())

    task.add_done_callback(done)


async def _start_spare(run, group: Group, i: int, regrow: bool = False, not_before=None) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    from trainkit import events as ev

    emit = group.tell  # the run holding the group when the event happens
    want = run.spec.run_config.spare_workers
    pg, bundle = group.slots[i]
    if not_before is not None:
        await not_before()
    t0 = time.monotonic()
    w = group.workers[i] = make_worker(pg, bundle, group.per_worker, run.spec.run_config.worker_runtime_env)
    setup = asyncio.ensure_future(_awaited(w.setup.remote()))
    deadline = float("inf") if regrow else t0 + run.spec.worker_start_timeout_s
    said = False
    try:
        while True:
            wait_s = SPARE_NOTICE_S if not said else (None if regrow else max(0.0, deadline - time.monotonic()))
            done, _ = await asyncio.wait({setup}, timeout=wait_s)
            if done:
                info = setup.result()
                break
            if said or time.monotonic() >= deadline:
                raise asyncio.TimeoutError()
            said = True
            emit(ev.SpareUnplaced(ready=len(group.spares), wanted=want, waited_s=round(time.monotonic() - t0, 3),
                                  reason="no room for it yet: waiting in the background "
                                         "(the run goes on without it)", regrow=regrow))
    except asyncio.CancelledError:
        setup.cancel()
        raise
    except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
        setup.cancel()
        _kill(w)
        group.workers[i] = None
        if pg is not group.pg:  # its own placement group: do not leave a pending request behind
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already removed
                pass
        why = (f"not placed or started within {run.spec.worker_start_timeout_s:.0f} s "
               "(TRAINKIT_WORKER_START_TIMEOUT_S)" if isinstance(e, asyncio.TimeoutError)
               else f"it died while starting: {type(e).__name__}")
        emit(ev.SpareUnplaced(ready=len(group.spares), wanted=want, waited_s=round(time.monotonic() - t0, 3),
                              reason=why, gave_up=True, regrow=regrow))
        return
    try:  # best effort: a spare that cannot rehearse is still a spare
        modules = await _running_imports(group)
        await asyncio.wait_for(_awaited(w.warm.remote(ray.get_runtime_context().current_actor, run.fn_bytes,
                                                      modules)), WARM_S)
    except (ray.exceptions.RayError, asyncio.TimeoutError, RuntimeError) as e:
        logger.debug("run %s: a spare's warm-up failed: %r", run.run_id, e)
    group.infos[i] = info
    group.spares.append(i)
    emit(ev.SpareReady(node_id=info.get("node_id", ""), pid=info.get("pid"), ready=len(group.spares),
                       wanted=want, start_s=round(time.monotonic() - t0, 3), regrow=regrow))


async def _running_imports(group: Group) -> list:
    """The modules a running rank of ``group`` imported (a spare imports them before it joins, so
    that its first run does not make the group wait for them: 1.3 s for scikit-learn here); [] when
    no rank answers within ``SPARE_PING_S``."""
    for b in group.active:
        w = group.workers[b]
        if w is None:
            continue
        try:
            return await asyncio.wait_for(_awaited(w.modules.remote()), SPARE_PING_S)
        except Exception:  # noqa: BLE001 - a dead or busy rank: try the next
            continue
    return []


async def discard(run, group: Group) -> None:
    """Kill a group and wait until the cluster shows its resources free again."""
    from trainkit.backends.ray.capacity import resources_by_node

    before = resources_by_node(available=True)
    group.kill()
    await wait_removed(group)  # its resources must be free before the next group is placed
    await run.capacity.settle(group.held(), before)


def make_worker(pg, bundle_index: int, res: dict, env):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from trainkit.backends.ray.worker import RankWorker

    custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
    opts = dict(num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0), resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index))
    if "memory" in res:
        opts["memory"] = res["memory"]
    if env:
        opts["runtime_env"] = env
    return RankWorker.options(**opts).remote()


def _kill(worker) -> None:
    import ray

    if worker is None:
        return
    try:
        ray.kill(worker, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead
        pass


async def wait_removed(group: Group, timeout_s: float = 10.0) -> None:
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if placement_group_table(group.pg).get("state") == "REMOVED":
                return
        except Exception:  # noqa: BLE001 - unknown group: nothing to wait for
            return
        await asyncio.sleep(0.05)


async def resolve(ref) -> dict:
    """The record of a rank's ``run()`` call; ``{"died": why}`` when its process died."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayActorError as e:
        return {"died": death_message(str(e))}
    except ray.exceptions.RayError as e:  # any other Ray error is a failure of that rank
        return {"died": f"{type(e).__name__}: {str(e)[:300]}"}


def death_message(ray_text: str) -> str:
    """A dead worker, in one line: Ray's exit type and the first sentence of its detail.

    Ray does not report the exit code or signal of a worker process it started, so none is given.
    """
    kind = re.search(r"Worker exit type: (\S+)", ray_text)
    detail = re.search(r"Worker exit detail: (.*?\.)(?:\s|$)", ray_text)
    what = "the worker process died"
    if kind:
        what += f" (Ray exit type {kind.group(1)}" + (f": {detail.group(1)}" if detail else "") + ")"
    else:
        what += f": {ray_text.splitlines()[0][:300]}" if ray_text else ""
    return what

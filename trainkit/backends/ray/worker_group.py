"""Worker groups: placement, the warm pool, repair, and the torch rank layout.

A ``Group`` is one placement group with one ``RankWorker`` actor per bundle. Healthy groups
are kept warm (``WorkerPool.idle``) after a fit and reused by the next fit of the same shape
(``Group.key``). After a failure the ranks whose processes returned are kept and only the
dead or stuck ones are started afresh in the same placement group (``repair``: one worker
start). ``rank_layout`` is pure: world ranks grouped by node, in order of first appearance,
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

from trainkit.backends.ray.capacity import add_resources, held_by_node
from trainkit.config import PROCESS_GROUP_TIMEOUT_S
from trainkit.errors import ControllerError

logger = logging.getLogger("trainkit.controller")

QUICK_PLACE_S = 10.0  # an elastic group larger than min_workers that cannot be placed this fast is smaller
INIT_PROCESS_GROUP_S = 120.0
PING_S = 5.0  # a warm worker that does not answer this fast is dropped


class NotPlaced(Exception):
    """An elastic group of this size could not be placed quickly; try a smaller one."""


@dataclass
class Group:
    key: tuple  # (size, resources per worker, placement strategy, runtime env): what can reuse it
    pg: Any
    workers: list  # in bundle order
    infos: list  # setup() records, bundle order
    ranks: list = field(default_factory=list)  # world rank -> bundle index

    @property
    def per_worker(self) -> dict:
        return dict(self.key[1])

    def info(self, world_rank: int) -> dict:
        return self.infos[self.ranks[world_rank]] if 0 <= world_rank < len(self.ranks) else {}

    def held(self) -> dict:
        return held_by_node(self.infos, self.per_worker)

    def kill(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            _kill(w)
        try:
            remove_placement_group(self.pg)
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


def group_key(size: int, scaling_config, env) -> tuple:
    return (size, tuple(sorted(scaling_config.worker_resources.items())), scaling_config.placement_strategy,
            repr(env))


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

    def release(self, group: Group, healthy: bool) -> None:
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
        key = group_key(size, sc, env)
        if carried is not None:
            if carried.key == key:
                try:
                    await self.init_torch(run, carried)
                    return carried
                except (ray.exceptions.RayError, asyncio.TimeoutError) as e:  # a kept worker died meanwhile
                    logger.info("run %s: the repaired group cannot start (%s); starting a new one", run.run_id, e)
                    await discard(run, carried)
            else:
                carried.kill()
        group = None
        for g in list(self.idle):
            if g.key == key:
                self.idle.remove(g)
                try:
                    await asyncio.wait_for(asyncio.gather(*[w.ping.remote() for w in g.workers]), PING_S)
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
        group.ranks, layout = rank_layout([i["node_id"] for i in group.infos])
        for info, extra in zip(group.infos, layout):
            info.update(extra)
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
                cuda = ",".join(sorted({g for i in group.infos if i["node_id"] == info["node_id"]
                                        for g in i["gpu_ids"]}))
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


async def repair(run, group: Group, reusable: set) -> Optional[Group]:
    """Replace the workers of ``group`` outside ``reusable`` (bundle indices) in the same placement
    group; None (and the group gone) when that cannot be done."""
    import ray

    env = run.spec.run_config.worker_runtime_env
    workers, infos = list(group.workers), list(group.infos)
    fresh = {}
    for b, w in enumerate(group.workers):
        if b not in reusable:
            _kill(w)
            workers[b] = fresh[b] = make_worker(group.pg, b, group.per_worker, env)
    try:
        got = await asyncio.wait_for(asyncio.gather(*[w.setup.remote() for w in fresh.values()]),
                                     run.spec.worker_start_timeout_s)
    except (ray.exceptions.RayError, asyncio.TimeoutError):  # cannot repair in place: start a new group
        Group(group.key, group.pg, workers, infos).kill()
        await wait_removed(group)
        return None
    for b, info in zip(fresh, got):
        infos[b] = info
    return Group(group.key, group.pg, workers, infos)


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

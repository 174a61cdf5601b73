"""Ray Datasets without an ``id`` column, streamed to the ranks with Ray Train's semantics.

What runs where:

* driver: ``StreamingSource(ds)`` starts a ``SplitBroker`` actor (``num_cpus=0``) that holds
  the dataset. Nothing is executed in the driver.
* broker actor: on the first ``iter_*`` of a worker group (a new attempt is a new group), it
  calls ``ds.streaming_split(world_size, equal=True, locality_hints=...)`` once and hands
  split ``r`` to rank ``r``. Ray Data's ``SplitCoordinator`` (owned by the broker)
  executes the dataset and streams its blocks to the ranks, backpressured: no more than a
  few blocks per rank are in flight, so datasets larger than the object store or memory
  work. A new attempt (a restart, a resize) gets a new split.
* worker (each rank): ``trainkit.data.shard.StreamingShard`` iterates its split (Ray's
  ``DataIterator``); each ``iter_*`` pass is one epoch, and the ranks start epochs together
  (Ray's barrier).

Semantics (Ray Train 2.60's): each rank gets an equal share per epoch (``equal=True`` drops
at most ``world_size - 1`` rows per epoch); which rows go to which rank is decided while
streaming, not a function of the rank. ``state_dict()`` records the epoch only, so a restore
restarts that epoch from its start: rows consumed before the failure are read again.
Exactly-once mid-epoch resumption needs an ``id`` column (``trainkit.data.add_ids``).

A dataset that ``DataConfig`` does not split is iterated in full by every rank
(``ds.iterator()``, executed in the rank's process), as Ray does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Optional

from trainkit.errors import ConfigError

ADD_IDS_HINT = ("exactly-once mid-epoch resumption needs an 'id' column: "
                "`from trainkit.data import add_ids; ds = add_ids(ds)` adds a stable one")


class SplitBroker:
    """Hands each rank of a worker group its split of one ``streaming_split`` (an async Ray actor).

    A group is the ranks that asked since the last split was made: a rank asking again (its
    process got the datasets anew: a new attempt, a restart, a resize) starts the next group,
    with a new split. A rank asks once per attempt (the split is kept on the rank's
    ``StreamingSource``, which every attempt receives afresh).
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.group: Optional[dict] = None
        self.groups_made = 0

    async def split(self, world_size: int, world_rank: int, node_id: str, locality: bool):
        g = self.group
        if g is None or world_rank in g["nodes"] or g["world_size"] != world_size:
            if g is not None:
                g["released"] = True  # the older group's ranks are gone: let its coordinator go
                g["splits"] = None
            self.groups_made += 1
            g = self.group = {"nodes": {}, "ready": asyncio.Event(), "splits": None, "world_size": world_size,
                              "released": False}
        g["nodes"][world_rank] = node_id
        if not g["ready"].is_set() and (not locality or len(g["nodes"]) == world_size):
            hints = [g["nodes"][r] for r in range(world_size)] if locality else None
            g["splits"] = self.dataset.streaming_split(world_size, equal=True, locality_hints=hints)
            g["ready"].set()
        await g["ready"].wait()  # with locality hints: until every rank said where it runs
        if g["released"]:
            raise RuntimeError("this split was released: a newer worker group asked for the dataset")
        return g["splits"][world_rank]

    def stats(self) -> dict:
        return {"groups_made": self.groups_made}


class StreamingSource:
    """A Ray ``Dataset`` without an ``id`` column (see the module doc). Pickles to the broker's
    handle, or (no broker: a dataset every rank iterates in full) to the dataset's lazy plan."""

    columnar = True
    num_rows = None  # unknown without executing the dataset

    def __init__(self, dataset: Any, name: str = "", broker: bool = True, locality: bool = True):
        self.dataset = dataset
        self.name = name
        self.locality = locality
        self.broker = None
        self.split = None  # in a rank: its split of this attempt, asked for once
        if broker:
            import ray

            self.broker = ray.remote(num_cpus=0)(SplitBroker).remote(dataset)

    def __getstate__(self):
        # With a broker the ranks need only its handle: the dataset stays in the broker (and the
        # controller, which passes this on, never unpickles a Ray Dataset).
        return {"dataset": self.dataset if self.broker is None else None, "name": self.name,
                "locality": self.locality, "broker": self.broker}

    def __setstate__(self, d):
        self.__dict__.update(d, split=None)

    def rank_split(self, world_size: int, world_rank: int):
        """This rank's split (Ray's ``DataIterator``), from the broker on first use."""
        if self.split is None:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
            self.split = ray.get(self.broker.split.remote(world_size, world_rank, node_id, self.locality))
        return self.split

    def block_bounds(self):
        return None


def streamed_start_epoch(state_dict: Any, name: str) -> int:
    """The epoch to start from: the earliest of the saved ranks' epochs (that epoch restarts)."""
    states = [state_dict] if isinstance(state_dict, Mapping) else state_dict
    if not isinstance(states, (list, tuple)) or not states or not all(isinstance(s, Mapping) for s in states):
        raise ConfigError("get_dataset_shard(state_dict)", type(state_dict).__name__,
                          "a state dict or a list of them, from shard.state_dict()")
    for s in states:
        if not s.get("streaming"):
            raise ConfigError("get_dataset_shard(state_dict)", "a state saved with an 'id' column (a plan of rows)",
                              f"a state of this dataset ({name!r} has no 'id' column now: it is streamed)",
                              hint=ADD_IDS_HINT)
    return min(int(s["epoch"]) for s in states)

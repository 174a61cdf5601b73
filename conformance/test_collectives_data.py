"""Cases: collectives and data sharding."""

from __future__ import annotations

import time

import trainkit
from conformance.case import case
from conformance.harness import put
from trainkit.backends.api import MULTI_WORKER


# -- collectives ---------------------------------------------------------------------------------
def _broadcast(config):
    rank = trainkit.get_context().get_world_rank()
    got = trainkit.collective.broadcast_from_rank_zero({"from": rank, "payload": config.get("payload")})
    put(config["dir"], f"bcast-{rank}.json", got)


@case("COLL-001", "collectives", "broadcast_from_rank_zero(x) returns rank 0's x on every rank.",
      requires=[MULTI_WORKER])
def test_broadcast_returns_rank_zeros_value(tk):
    tk.fit(_broadcast, workers=2, config={"dir": tk.dir})
    assert [v["from"] for v in tk.read_all("bcast-").values()] == [0, 0]


def _barrier(config):
    rank = trainkit.get_context().get_world_rank()
    if rank == 1:
        time.sleep(1.0)  # the stimulus: rank 1 arrives late
        put(config["dir"], "rank1-arrives.json", time.time())
    value = trainkit.collective.barrier()
    put(config["dir"], f"barrier-{rank}.json", {"value": value, "t": time.time()})


@case("COLL-002", "collectives", "barrier() returns None on every rank, and only after every rank called it.",
      requires=[MULTI_WORKER])
def test_barrier_waits_for_every_rank(tk):
    tk.fit(_barrier, workers=2, config={"dir": tk.dir})
    assert tk.read("barrier-0.json")["value"] is None and tk.read("barrier-1.json")["value"] is None
    assert tk.read("barrier-0.json")["t"] >= tk.read("rank1-arrives.json")


@case("COLL-003", "collectives", "broadcast_from_rank_zero carries a 5,000-character payload.",
      requires=[MULTI_WORKER])
def test_broadcast_of_a_large_payload(tk):
    tk.fit(_broadcast, workers=2, config={"dir": tk.dir, "payload": "x" * 5000})
    assert {len(v["payload"]) for v in tk.read_all("bcast-").values()} == {5000}


def _single_rank_collectives(config):
    assert trainkit.collective.barrier() is None
    return trainkit.collective.broadcast_from_rank_zero({"v": 42})


@case("COLL-004", "collectives", "With one worker, barrier() returns None and broadcast_from_rank_zero returns "
      "the value itself.")
def test_collectives_with_one_worker(tk):
    assert tk.fit(_single_rank_collectives).return_value == {"v": 42}


# -- data sharding -------------------------------------------------------------------------------
def _ray_data_shard(config):
    rank = trainkit.get_context().get_world_rank()
    shard = trainkit.get_dataset_shard("train")
    ids = [int(row["id"]) for row in shard.iter_rows()]
    put(config["dir"], f"rows-{rank}.json", ids)


@case("DATA-001", "data", "A Ray Dataset of 10 rows given as datasets={'train': ...} is split over 2 ranks: "
      "5 rows each, disjoint, together all rows.", requires=[MULTI_WORKER])
def test_ray_dataset_is_split_over_ranks(tk):
    import ray

    tk.fit(_ray_data_shard, workers=2, config={"dir": tk.dir}, datasets={"train": ray.data.range(10)})
    rows = list(tk.read_all("rows-").values())
    assert [len(r) for r in rows] == [5, 5]
    assert sorted(rows[0] + rows[1]) == list(range(10))


def _missing_shard(config):
    try:
        trainkit.get_dataset_shard("val")
    except KeyError as e:
        return f"KeyError: {e}"
    return "no error"


@case("DATA-002", "data", "get_dataset_shard(name) for a name the trainer was not given raises KeyError.")
def test_unknown_dataset_name_raises_key_error(tk):
    assert tk.fit(_missing_shard, datasets={"train": list(range(4))}).return_value.startswith("KeyError")


def _sequence_shard(config):
    rank = trainkit.get_context().get_world_rank()
    put(config["dir"], f"rows-{rank}.json", list(trainkit.get_dataset_shard("train")))


@case("DATA-003", "data", "A sequence dataset (a list) is split into contiguous blocks, one per rank, whose "
      "sizes differ by at most one.", requires=[MULTI_WORKER], extension=True)
def test_sequence_dataset_is_split_into_blocks(tk):
    tk.fit(_sequence_shard, workers=2, config={"dir": tk.dir}, datasets={"train": list(range(7))})
    assert list(tk.read_all("rows-").values()) == [[0, 1, 2, 3], [4, 5, 6]]


@case("DATA-004", "data", "A sequence dataset given to one worker is seen whole by that rank.", extension=True)
def test_sequence_dataset_on_one_worker(tk):
    tk.fit(_sequence_shard, config={"dir": tk.dir}, datasets={"train": list(range(5))})
    assert tk.read("rows-0.json") == [0, 1, 2, 3, 4]

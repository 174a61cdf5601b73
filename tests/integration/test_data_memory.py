"""Datasets larger than the object store: streamed (no ``id``) and indexed block by block (``id``).

A private one-node Ray (``trainkit_testing.cluster.Cluster``: Ray's test clusters give a node a
150 MiB object store) and a generated dataset of about 3x that (490 MB of float32 tensor rows,
made by Ray Data tasks, never by the driver). Before this rework the driver executed a Ray Dataset in
full and held every block, which cannot fit such a store.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref

import numpy as np
import pytest

import trainkit
from trainkit import RunConfig, ScalingConfig
from trainkit.torch import TorchTrainer
from trainkit_testing.cluster import Cluster
from trainkit_testing.exactly_once import ExactlyOnce, assert_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STORE_BYTES = 150 * 1024 * 1024  # what ray.cluster_utils.Cluster gives a node
ROWS = 30_000
ROW_FLOATS = 4096  # 16 KiB a row: 490 MB in all, 3x the store
BLOCKS = 120


@pytest.fixture(scope="module")
def small_store():
    import ray

    with Cluster(nodes=0, head_cpus=3, env={"TRAINKIT_PROGRESS": "0"}, log_to_driver=False,
                 tmp_prefix="tkmem-") as cluster:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        store = ray.cluster_resources()["object_store_memory"]
        assert store <= STORE_BYTES * 1.05, store  # the dataset below is 3x this
        yield cluster


def _big(with_id: bool):
    import ray

    def rows(batch):
        ids = batch["id"]
        x = np.repeat(ids.astype(np.float32)[:, None], ROW_FLOATS, axis=1)
        return {"id": ids, "x": x} if with_id else {"k": ids, "x": x}

    return ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(rows, batch_size=None)


class _DriverBlocks:
    """Counts the pyarrow blocks ``ray.get`` hands to this (the driver) process, and the most alive at once."""

    def __init__(self):
        self.fetched = 0
        self.max_alive = 0
        self._alive: set = set()

    def seen(self, value):
        import pyarrow as pa

        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, pa.Table):
                self.fetched += 1
                key = id(t)
                self._alive.add(key)
                weakref.finalize(t, self._alive.discard, key)
                self.max_alive = max(self.max_alive, len(self._alive))
        return value


@contextlib.contextmanager
def _driver_blocks():
    import ray

    blocks = _DriverBlocks()
    real_get = ray.get
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "get", lambda *a, **kw: blocks.seen(real_get(*a, **kw)))
        yield blocks


def _sum_fn(config):
    """One pass; per rank: rows, the sum of x[:, 0] and of the keys, to a file; one report."""
    ctx = trainkit.get_context()
    shard = trainkit.get_dataset_shard("train")
    n, total, keys = 0, 0.0, 0
    key = config["key"]
    for batch in shard.iter_torch_batches(batch_size=500, device="cpu"):
        assert batch["x"].shape[1:] == (ROW_FLOATS,) and str(batch["x"].dtype) == "torch.float32"
        n += int(batch["x"].shape[0])
        total += float(batch["x"][:, 0].double().sum())
        keys += int(batch[key].sum())
    with open(os.path.join(config["out"], f"rank{ctx.get_world_rank()}.json"), "w") as f:
        json.dump({"n": n, "total": total, "keys": keys}, f)
    trainkit.report({"rows": n})


def _per_rank(out: str) -> list[dict]:
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


def test_a_dataset_without_ids_three_times_the_object_store_streams_through_two_ranks(small_store, tmp_path):
    import ray

    assert ROWS * ROW_FLOATS * 4 > 2.5 * ray.cluster_resources()["object_store_memory"]
    out = str(tmp_path)
    with _driver_blocks() as blocks:
        TorchTrainer(_sum_fn, train_loop_config={"out": out, "key": "k"},
                     scaling_config=ScalingConfig(num_workers=2), datasets={"train": _big(with_id=False)},
                     run_config=RunConfig(name="stream-big", storage_path=str(tmp_path / "runs"))).fit()
    assert blocks.fetched == 0  # nothing of the dataset went through the driver
    ranks = _per_rank(out)
    assert [r["n"] for r in ranks] == [ROWS // 2, ROWS // 2]  # equal shares, every row
    every = ROWS * (ROWS - 1) // 2
    assert sum(r["keys"] for r in ranks) == every and sum(r["total"] for r in ranks) == float(every)


def test_indexing_a_dataset_with_ids_holds_one_block_at_a_time_in_the_driver(small_store):
    from trainkit.data import RayDataSource, prepare_datasets

    with _driver_blocks() as blocks:
        src = prepare_datasets({"train": _big(with_id=True)})["train"]
    assert isinstance(src, RayDataSource) and src.num_rows == ROWS
    assert blocks.fetched >= BLOCKS // 2  # every block's ids were read here...
    assert blocks.max_alive <= 2  # ... one (and the next) at a time, never the dataset


def test_a_dataset_with_ids_three_times_the_object_store_is_read_exactly_once(small_store, tmp_path):
    import ray

    out = str(tmp_path)
    result = TorchTrainer(_sum_fn, train_loop_config={"out": out, "key": "id"},
                          scaling_config=ScalingConfig(num_workers=2), datasets={"train": _big(with_id=True)},
                          run_config=RunConfig(name="ids-big", storage_path=str(tmp_path / "runs"),
                                               callbacks=[ExactlyOnce()])).fit()
    ranks = _per_rank(out)
    assert [r["n"] for r in ranks] == [ROWS // 2, ROWS // 2]
    # contiguous blocks by id: rank 0 has ids [0, N/2), rank 1 the rest
    assert ranks[0]["keys"] == (ROWS // 2) * (ROWS // 2 - 1) // 2
    assert_exactly_once(result.path, ids=range(ROWS), epochs=1)
    assert ray.cluster_resources()["object_store_memory"] < ROWS * ROW_FLOATS * 4 / 2.5

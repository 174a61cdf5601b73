"""Shards of sequences and the resumption state: pure logic, no Ray, no training run."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from trainkit.data import (DataShard, SequenceSource, iteration_order, load_shard_states, make_shard,
                           plan_after_restore, save_shard_state, shard_bounds, to_ranges)
from trainkit.errors import ConfigError


def rows(n: int) -> list[dict]:
    return [{"id": i, "x": float(i) * 2} for i in range(n)]


def consume(shard: DataShard, batches: int, batch_size: int = 3, **kw) -> list[int]:
    """ids of the first ``batches`` batches of a new pass."""
    seen = []
    if batches == 0:
        return seen
    for i, b in enumerate(shard.iter_batches(batch_size=batch_size, **kw)):
        seen.extend(int(x) for x in b["id"])
        if i + 1 == batches:
            break
    return seen


def all_ids(shard: DataShard, batch_size: int = 3, **kw) -> list[int]:
    return [int(x) for b in shard.iter_batches(batch_size=batch_size, **kw) for x in b["id"]]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (10, 3), (10, 4), (7, 4), (3, 4), (0, 2), (101, 3)])
def test_blocks_are_disjoint_cover_every_row_and_differ_in_size_by_at_most_one(n, world):
    blocks = [shard_bounds(n, world, r) for r in range(world)]
    covered = [i for a, b in blocks for i in range(a, b)]
    assert covered == list(range(n))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_a_sequence_shard_batches_its_block_as_numpy_columns():
    shard = make_shard(rows(10), 1, 3, name="train")
    batches = list(shard.iter_batches(batch_size=2, prefetch_batches=0))
    assert [list(b["id"]) for b in batches] == [[4, 5], [6]]
    assert batches[0]["x"].dtype == np.float64 and list(batches[0]["x"]) == [8.0, 10.0]
    assert len(shard) == 3 and shard[0] == {"id": 4, "x": 8.0}


def test_plain_items_are_identified_by_index_and_collated_by_torch():
    import torch

    data = [(torch.tensor([float(i)]), i % 2) for i in range(6)]
    shard = make_shard(data, 0, 2)
    (x, y), = list(shard.iter_torch_batches(batch_size=3, device="cpu"))
    assert x.shape == (3, 1) and y.tolist() == [0, 1, 0]


def test_iter_torch_batches_applies_dtypes_per_column():
    import torch

    shard = make_shard(rows(4), 0, 1)
    b = next(iter(shard.iter_torch_batches(batch_size=4, dtypes={"x": torch.float16}, device="cpu")))
    assert b["x"].dtype == torch.float16 and b["id"].dtype == torch.int64


def test_rows_without_an_id_key_get_an_error_naming_the_column():
    with pytest.raises(ConfigError, match="'id'") as e:
        make_shard([{"x": 1}], 0, 1, name="train")
    assert "datasets['train']" in str(e.value)
    assert pickle.loads(pickle.dumps(e.value)).args == e.value.args


def test_bad_batch_settings_name_the_setting():
    shard = make_shard(rows(4), 0, 1)
    with pytest.raises(ConfigError, match="batch_size"):
        shard.iter_batches(batch_size=0)
    with pytest.raises(ConfigError, match="local_shuffle_buffer_size"):
        shard.iter_batches(local_shuffle_buffer_size=-2)


def test_each_iter_call_is_the_next_epoch_over_the_same_block():
    shard = make_shard(rows(10), 0, 2)
    assert shard.epoch == 0
    assert all_ids(shard) == [0, 1, 2, 3, 4] and shard.epoch == 1
    assert all_ids(shard) == [0, 1, 2, 3, 4] and shard.epoch == 2
    assert consume(shard, 1) == [0, 1, 2] and shard.epoch == 2  # a pass with rows left


def test_local_shuffle_is_a_permutation_reproducible_from_the_seed_and_differs_by_epoch():
    a = make_shard(rows(50), 0, 1)
    e0 = all_ids(a, local_shuffle_buffer_size=16, local_shuffle_seed=7)
    e1 = all_ids(a, local_shuffle_buffer_size=16, local_shuffle_seed=7)
    b = make_shard(rows(50), 0, 1)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    assert all_ids(b, local_shuffle_buffer_size=16, local_shuffle_seed=7) == e0
    assert e1 != e0
    # windows: the first 16 rows handed out are the first 16 rows of the block
    assert sorted(e0[:16]) == list(range(16))


def test_state_dict_is_json_and_counts_rows_handed_to_the_loop():
    shard = make_shard(rows(10), 0, 2, name="train")
    it = shard.iter_batches(batch_size=2, prefetch_batches=2)
    gen = iter(it)
    next(gen)
    state = json.loads(json.dumps(it.state_dict()))
    assert state == shard.state_dict()
    assert state["consumed"] == 2 and state["plan"] == [[0, 5]] and state["epoch"] == 0


@pytest.mark.parametrize("shuffle", [None, 4])
def test_resuming_on_the_same_world_size_reads_exactly_the_rows_left(shuffle):
    kw = {"local_shuffle_buffer_size": shuffle, "local_shuffle_seed": 3} if shuffle else {}
    shard = make_shard(rows(11), 1, 2)
    it = shard.iter_batches(batch_size=2, prefetch_batches=0, **kw)
    seen = []
    for b in it:
        seen.extend(int(x) for x in b["id"])
        if len(seen) >= 2:
            break
    state = it.state_dict()
    resumed = make_shard(rows(11), 1, 2, state_dict=state)
    rest = all_ids(resumed, **kw)
    assert sorted(seen + rest) == list(range(6, 11)) and len(seen + rest) == 5
    assert resumed.epoch == 1
    assert all_ids(resumed) == list(range(6, 11)) and resumed.epoch == 2  # then full epochs again


@pytest.mark.parametrize("old,new", [(3, 2), (2, 3), (4, 1), (1, 4), (3, 3)])
@pytest.mark.parametrize("shuffle", [None, 5])
def test_after_a_world_size_change_the_rest_of_the_epoch_is_read_exactly_once(old, new, shuffle):
    n = 23
    kw = {"local_shuffle_buffer_size": shuffle, "local_shuffle_seed": 11} if shuffle else {}
    seen: list[int] = []
    states = []
    for r in range(old):
        shard = make_shard(rows(n), r, old, name="train")
        seen += consume(shard, batches=r + 1, batch_size=2, **kw)  # ranks at different points
        states.append(json.loads(json.dumps(shard.state_dict())))
    rest: list[int] = []
    counts = []
    for r in range(new):
        shard = make_shard(rows(n), r, new, name="train", state_dict=states)
        got = all_ids(shard, **kw)
        counts.append(len(got))
        rest += got
    assert sorted(seen + rest) == list(range(n))
    assert max(counts) - min(counts) <= 1


def test_a_resize_after_a_resize_still_reads_the_epoch_exactly_once():
    n, seen = 40, []
    states = []
    for r in range(3):
        s = make_shard(rows(n), r, 3)
        seen += consume(s, 2, batch_size=2)
        states.append(s.state_dict())
    states2 = []
    for r in range(2):
        s = make_shard(rows(n), r, 2, state_dict=states)
        seen += consume(s, 3, batch_size=2, local_shuffle_buffer_size=3, local_shuffle_seed=1)
        states2.append(s.state_dict())
    for r in range(4):
        seen += all_ids(make_shard(rows(n), r, 4, state_dict=states2))
    assert sorted(seen) == list(range(n))


def test_states_of_a_finished_epoch_start_the_next_epoch_in_full():
    states = []
    for r in range(2):
        s = make_shard(rows(6), r, 2)
        all_ids(s)
        states.append(s.state_dict())
    s = make_shard(rows(6), 0, 3, state_dict=states)
    assert s.epoch == 1 and all_ids(s) == [0, 1] and s.state_dict()["epoch"] == 1


def test_a_single_state_of_another_rank_or_world_size_is_refused_with_a_hint():
    s = make_shard(rows(6), 0, 2)
    consume(s, 1)
    with pytest.raises(ConfigError, match="load_shard_states"):
        make_shard(rows(6), 0, 3, state_dict=s.state_dict())
    with pytest.raises(ConfigError, match="world_rank=1"):
        make_shard(rows(6), 1, 2, state_dict=s.state_dict())


def test_incomplete_or_foreign_state_lists_are_refused():
    states = []
    for r in range(3):
        s = make_shard(rows(9), r, 3)
        consume(s, 1)
        states.append(s.state_dict())
    with pytest.raises(ConfigError, match="one state per rank"):
        make_shard(rows(9), 0, 2, state_dict=states[:2])
    with pytest.raises(ConfigError, match="changed between save and restore"):
        make_shard(rows(10), 0, 2, state_dict=states)
    with pytest.raises(ConfigError, match="state_dict"):
        make_shard(rows(9), 0, 2, state_dict={"consumed": 3})


def test_states_saved_per_rank_in_a_folder_load_back_as_one_list(tmp_path):
    for r in range(3):
        s = make_shard(rows(9), r, 3, name="train")
        consume(s, 1)
        save_shard_state(str(tmp_path), s.state_dict())
    loaded = load_shard_states(str(tmp_path), "train")
    assert [s["world_rank"] for s in loaded] == [0, 1, 2]
    assert load_shard_states(str(tmp_path), "val") is None


def test_iteration_order_and_ranges_round_trip():
    plan = [[0, 3], [10, 12]]
    assert list(iteration_order(plan, None, 0)) == [0, 1, 2, 10, 11]
    assert to_ranges(np.array([0, 1, 2, 10, 11])) == plan
    e, p = plan_after_restore({"version": 1, "epoch": 2, "world_rank": 0, "world_size": 1, "num_rows": 20,
                               "plan": plan, "consumed": 2, "shuffle": None}, 20, 1, 0)
    assert (e, p) == (2, [[2, 3], [10, 12]])


def test_abandoning_a_prefetching_iterator_stops_its_thread():
    import threading

    before = {t.ident for t in threading.enumerate()}
    shard = make_shard(rows(1000), 0, 1)
    gen = iter(shard.iter_batches(batch_size=1, prefetch_batches=2))
    next(gen)
    gen.close()
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.name == "trainkit-data-prefetch"]
        if not extra:
            break
        time.sleep(0.01)
    assert not extra


def test_a_sequence_source_pickles_with_its_data():
    src = SequenceSource(rows(3))
    assert pickle.loads(pickle.dumps(src)).num_rows == 3

"""Dataset shards (the ``id`` path) on a real local Ray: disjoint and covering, resumed mid-epoch exactly once.

Datasets without an ``id`` column (streamed as Ray does) are tested in test_data_streaming.py.

One Ray for the session (``ray_up`` in conftest.py: the plugin's cluster, 4 CPUs per test process). Every run records the row
ids each rank consumed with ``trainkit_testing.exactly_once.ExactlyOnce`` and is checked
with ``assert_exactly_once``. Faults are injected inside the training function on
attempt 1 (``os._exit`` or an exception at a chosen report), so they replay exactly.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

import trainkit
from trainkit import Checkpoint, ConfigError, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from trainkit.data import load_shard_states, save_shard_state
from trainkit.events import read_run_dicts
from trainkit.torch import TorchTrainer
from trainkit_testing.exactly_once import ExactlyOnce, assert_exactly_once, check_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(240)]


def _fit(fn, storage_path, name, *, workers, config, datasets, max_failures=0):
    return TorchTrainer(
        fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=workers), datasets=datasets,
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=[ExactlyOnce()],
                             failure_config=FailureConfig(max_failures=max_failures)),
    ).fit()


def _one_pass_fn(config):
    """Every dataset: one pass; the ids this rank saw go to a file; one report at the end."""
    rank = trainkit.get_context().get_world_rank()
    seen = {}
    for name in config["names"]:
        shard = trainkit.get_dataset_shard(name)
        if config["torch"]:
            ids = [int(i) for b in shard.iter_torch_batches(batch_size=3) for i in b["id"]]
        else:
            ids = [int(i) for b in shard.iter_batches(batch_size=3) for i in b["id"]]
        seen[name] = ids
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    trainkit.report({"done": 1})


@pytest.mark.parametrize("workers,rows", [(1, 10), (2, 11), (3, 10), (4, 13)])
def test_shards_of_ray_and_list_datasets_are_disjoint_and_cover_every_row(storage_path, tmp_path, workers, rows):
    import ray

    out = str(tmp_path / "out")
    os.makedirs(out)
    datasets = {"train": ray.data.range(rows, override_num_blocks=3),
                "items": [{"id": 100 + i, "v": i} for i in range(rows)]}
    result = _fit(_one_pass_fn, storage_path, f"cover{workers}", workers=workers,
                  config={"out": out, "names": ["train", "items"], "torch": workers % 2 == 0},
                  datasets=datasets)
    seen = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(workers)]
    for name, expected in (("train", list(range(rows))), ("items", [100 + i for i in range(rows)])):
        per_rank = [s[name] for s in seen]
        assert sorted(i for ids in per_rank for i in ids) == expected, name  # disjoint and covering
        sizes = [len(ids) for ids in per_rank]
        assert max(sizes) - min(sizes) <= 1, (name, sizes)
    assert_exactly_once(result.path, ids=range(rows), epochs=1, dataset="train")


def _resumable_fn(config):
    """Epochs of per-batch reports; each rank saves its shard state in its checkpoint folder."""
    ctx = trainkit.get_context()
    ckpt = trainkit.get_checkpoint()
    states = load_shard_states(ckpt.path, "train") if ckpt else None
    shard = trainkit.get_dataset_shard("train", state_dict=states)
    fail = config.get("fail")
    while shard.epoch < config["epochs"]:
        it = shard.iter_torch_batches(batch_size=config["batch_size"], local_shuffle_buffer_size=8,
                                      local_shuffle_seed=5)
        for batch in it:
            index = ctx.get_report_index() + 1
            if fail and ctx.get_attempt() == 1 and ctx.get_world_rank() == fail["rank"] \
                    and index == fail["report"]:
                if fail["how"] == "exit":
                    os._exit(1)
                raise RuntimeError(f"injected failure at report {index}")
            d = tempfile.mkdtemp()
            save_shard_state(d, it.state_dict())
            trainkit.report({"epoch": shard.epoch, "rows": int(batch["id"].numel()),
                             "world_size": ctx.get_world_size()}, checkpoint=Checkpoint.from_directory(d))


def test_a_rank_killed_mid_epoch_resumes_and_each_row_is_consumed_once_per_epoch(storage_path):
    import ray

    n = 48  # 2 ranks x 6 batches of 4 per epoch
    result = _fit(_resumable_fn, storage_path, "kill", workers=2, max_failures=1,
                  config={"epochs": 2, "batch_size": 4, "fail": {"rank": 1, "report": 4, "how": "exit"}},
                  datasets={"train": ray.data.range(n, override_num_blocks=4)})
    starts = [e for e in read_run_dicts(result.path) if e["type"] == "attempt_started"]
    assert {e["attempt"] for e in starts} == {1, 2}
    assert max(e["start_index"] for e in starts if e["attempt"] == 2) == 3  # resumed mid-epoch 0
    report = assert_exactly_once(result.path, ids=range(n), epochs=2)
    # attempt 1's batch of report 4 was consumed but never committed: it must not count
    a1 = report.attempts[0]
    assert a1["counted_up_to"] == 3 and a1["batches"] > a1["counted"]
    assert len(result.metrics_dataframe) <= 12 or result.metrics["epoch"] == 2


def test_after_a_restart_from_3_to_2_workers_the_rest_of_the_epoch_is_consumed_once(storage_path):
    """Fit 1 (3 workers) fails mid-epoch; fit 2 with the same name resumes on 2 workers."""
    import ray

    n = 48  # 3 ranks x 4 batches of 4; after 2 reports 24 rows remain = 2 ranks x 3 batches
    ds = ray.data.range(n, override_num_blocks=5)
    with pytest.raises(TrainingFailedError, match="injected failure"):
        _fit(_resumable_fn, storage_path, "shrink", workers=3, max_failures=0,
             config={"epochs": 2, "batch_size": 4, "fail": {"rank": 2, "report": 3, "how": "raise"}},
             datasets={"train": ds})
    result = _fit(_resumable_fn, storage_path, "shrink", workers=2,
                  config={"epochs": 2, "batch_size": 4}, datasets={"train": ds})
    starts = {e["attempt"]: e for e in read_run_dicts(result.path) if e["type"] == "attempt_started"}
    assert starts[1]["world_size"] == 3 and starts[2]["world_size"] == 2 and starts[2]["start_index"] == 2
    assert_exactly_once(result.path, ids=range(n), epochs=2)
    assert result.metrics["world_size"] == 2


def test_without_saved_shard_states_a_restart_replays_rows_and_the_check_says_which(storage_path):
    """The checker can fail: resuming the model but not the data position double-counts rows."""
    import ray

    def loop(config):
        ctx = trainkit.get_context()
        shard = trainkit.get_dataset_shard("train")  # position not restored
        for batch in shard.iter_batches(batch_size=4):
            if ctx.get_attempt() == 1 and ctx.get_report_index() == 2:
                raise RuntimeError("injected")
            d = tempfile.mkdtemp()
            trainkit.report({"n": 1}, checkpoint=Checkpoint.from_directory(d))

    result = _fit(loop, storage_path, "replay", workers=2, max_failures=1, config={},
                  datasets={"train": ray.data.range(24)})
    report = check_exactly_once(result.path, ids=range(24), epochs=1)
    assert not report.ok
    (epoch,) = report.epochs
    assert sorted(epoch.duplicates) == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    assert "more than once" in report.describe()


def test_a_ray_dataset_with_duplicate_ids_fails_before_any_worker_starts(storage_path):
    import ray

    with pytest.raises(ConfigError, match="duplicate id=1") as e:
        _fit(_one_pass_fn, storage_path, "dupid", workers=2, config={},
             datasets={"train": ray.data.from_items([{"id": 1}, {"id": 2}, {"id": 1}], override_num_blocks=3)})
    assert "datasets['train']" in str(e.value)
    assert not os.path.exists(os.path.join(storage_path, "dupid", "events.jsonl"))


def test_local_mode_resumes_a_ray_dataset_mid_epoch_exactly_once(storage_path):
    import ray

    result = TorchTrainer(
        _resumable_fn, train_loop_config={"epochs": 2, "batch_size": 5, "fail": {"rank": 0, "report": 3,
                                                                                   "how": "raise"}},
        scaling_config=ScalingConfig(num_workers=0), datasets={"train": ray.data.range(20)},
        run_config=RunConfig(name="local", storage_path=storage_path, callbacks=[ExactlyOnce()],
                             failure_config=FailureConfig(max_failures=1)),
    ).fit()
    report = assert_exactly_once(result.path, ids=range(20), epochs=2)
    assert [a["counted_up_to"] for a in report.attempts] == [2, None]

"""Ray Data as Ray Train does it, on a real local Ray: tensor columns as Ray gives them, datasets
without an ``id`` column streamed with ``streaming_split(equal=True)`` (epochs restart on
resume), ``add_ids`` stable across executions, and ``DataConfig(datasets_to_split=...)``.

One Ray for the session (``ray_up`` in conftest.py). Conversions are compared against Ray's own
``iter_batches`` / ``iter_torch_batches`` on the same dataset.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest

import trainkit
from trainkit import Checkpoint, ConfigError, FailureConfig, RunConfig, ScalingConfig
from trainkit.config import DataConfig
from trainkit.data import add_ids, load_shard_states, make_shard, save_shard_state
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(240)]


@pytest.fixture(autouse=True)
def _quiet_ray_data():
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _images(n: int = 10):
    import ray

    x = (np.arange(n * 28 * 28, dtype=np.float32) / 7.0).reshape(n, 1, 28, 28)
    return ray.data.from_numpy(x)


def _items(n: int = 9):
    import ray

    return ray.data.from_items([{"img": np.full((2, 3), i, dtype=np.uint8), "label": i, "w": float(i) / 2}
                                for i in range(n)], override_num_blocks=3)


def _same_torch_batches(ours: list, ray_batches: list) -> None:
    assert len(ours) == len(ray_batches)
    for a, b in zip(ours, ray_batches):
        assert sorted(a) == sorted(b)
        for k in b:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (k, a[k].shape, b[k].shape)
            assert bool((a[k] == b[k]).all()), k


@pytest.mark.parametrize("make", [_images, _items], ids=["from_numpy (1,28,28)", "from_items (2,3) uint8"])
def test_iter_torch_batches_gives_tensor_columns_with_the_shape_and_dtype_ray_gives(make):
    import torch

    ds = make()
    expected = list(ds.iter_torch_batches(batch_size=4, device="cpu"))
    assert expected[0][next(iter(expected[0]))].ndim >= 3  # the column really is a tensor column
    streamed = make_shard(ds, 0, 1, name="t")  # no id column: Ray's own iterator
    _same_torch_batches(list(streamed.iter_torch_batches(batch_size=4, device="cpu")), expected)
    with_ids = add_ids(ds)
    exact = make_shard(with_ids, 0, 1, name="t")  # the id path: blocks in id order, sliced by position
    ours = [{k: v for k, v in b.items() if k != "id"}
            for b in exact.iter_torch_batches(batch_size=4, device="cpu")]
    _same_torch_batches(ours, expected)
    # dtypes, one for all or per column, as Ray applies them
    for dtypes in (torch.float64, {c: torch.float16 for c in expected[0]}):
        want = list(ds.iter_torch_batches(batch_size=4, device="cpu", dtypes=dtypes))
        got = [{k: v for k, v in b.items() if k != "id"} for b in exact.iter_torch_batches(
            batch_size=4, device="cpu", dtypes=dtypes if not isinstance(dtypes, dict) else {**dtypes, "id": None})]
        _same_torch_batches(got, want)


@pytest.mark.parametrize("fmt", ["default", "numpy", "pandas", "pyarrow"])
def test_iter_batches_formats_match_ray_on_tensor_columns(fmt):
    ds = _items()
    want = list(ds.iter_batches(batch_size=4, batch_format=fmt))
    got = list(make_shard(add_ids(ds), 0, 1).iter_batches(batch_size=4, batch_format=fmt))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if fmt == "pyarrow":
            assert a.drop_columns(["id"]).equals(b)
        elif fmt == "pandas":
            assert list(a.drop(columns=["id"]).columns) == list(b.columns)
            assert [x.tolist() for x in a["img"]] == [x.tolist() for x in b["img"]]
        else:
            assert a["img"].shape == b["img"].shape == (len(b["label"]), 2, 3) and a["img"].dtype == b["img"].dtype
            assert (a["img"] == b["img"]).all() and (a["label"] == b["label"]).all()


def test_collate_fn_receives_the_format_its_ray_base_class_names_and_dtypes_with_it_is_refused():
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn, PandasBatchCollateFn

    class Arrow(ArrowBatchCollateFn):
        def __call__(self, t):
            return torch.as_tensor(t["label"].to_numpy()) * 10

    class Numpy(NumpyBatchCollateFn):
        def __call__(self, b):
            return {"img": torch.as_tensor(b["img"]).float()}

    class Pandas(PandasBatchCollateFn):
        def __call__(self, df):
            return torch.as_tensor(df["w"].to_numpy())

    ds = _items()
    shard = make_shard(add_ids(ds), 0, 1)
    for fn in (Arrow(), Numpy(), Pandas()):
        want = list(ds.iter_torch_batches(batch_size=4, collate_fn=fn, device="cpu"))
        got = list(shard.iter_torch_batches(batch_size=4, collate_fn=fn, device="cpu"))
        for a, b in zip(got, want):
            a, b = (a["img"], b["img"]) if isinstance(b, dict) else (a, b)
            assert a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
    with pytest.raises(ValueError, match="collate_fn"):
        ds.iter_torch_batches(collate_fn=Arrow(), dtypes=torch.float32)  # Ray refuses the pair...
    with pytest.raises(ConfigError, match="collate_fn"):
        shard.iter_torch_batches(collate_fn=Arrow(), dtypes=torch.float32)  # ... and so does trainkit


def test_add_ids_gives_every_row_the_same_unique_id_in_every_execution():
    import ray

    def build():
        ds = ray.data.range(600, override_num_blocks=5).map(lambda r: {"x": r["id"] * 3})
        return add_ids(ds.filter(lambda r: r["x"] % 2 == 0).map_batches(lambda b: b, batch_size=50))

    runs = [{int(r["x"]): int(r["id"]) for r in build().take_all()} for _ in range(3)]
    assert len(runs[0]) == 300 and len(set(runs[0].values())) == 300  # unique
    assert runs[0] == runs[1] == runs[2]  # stable across executions (a non-fused map step in between)
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False  # left as it was
    with pytest.raises(ConfigError, match="already has a 'id' column"):
        add_ids(ray.data.range(3))


def _stream_fn(config):
    """Each epoch: the rows (``x``) this rank got, to a file per attempt; one report per epoch."""
    ctx = trainkit.get_context()
    ckpt = trainkit.get_checkpoint()
    states = load_shard_states(ckpt.path, "train") if ckpt else None
    shard = trainkit.get_dataset_shard("train", state_dict=states)
    while shard.epoch < config["epochs"]:
        epoch = shard.epoch
        xs = []
        for batch in shard.iter_batches(batch_size=3):
            xs.extend(int(v) for v in batch["x"])
        extra = {}
        for name in config.get("whole", []):
            rows = trainkit.get_dataset_shard(name).iter_rows()
            extra[name] = sorted(int(row["id"] if "id" in row else row["x"]) for row in rows)
        with open(os.path.join(config["out"], f"a{ctx.get_attempt()}-r{ctx.get_world_rank()}-e{epoch}.json"),
                  "w") as f:
            json.dump({"x": xs, **extra}, f)
        fail = config.get("fail")
        if fail and ctx.get_attempt() == 1 and epoch == fail["epoch"] and ctx.get_world_rank() == fail["rank"]:
            raise RuntimeError("injected failure after the epoch's rows, before its report")
        d = tempfile.mkdtemp()
        save_shard_state(d, shard.state_dict())
        trainkit.report({"epoch": epoch, "rows": len(xs)}, checkpoint=Checkpoint.from_directory(d))


def _read(out: str, attempt: int, rank: int, epoch: int) -> dict:
    with open(os.path.join(out, f"a{attempt}-r{rank}-e{epoch}.json")) as f:
        return json.load(f)


def _no_id_dataset(n: int):
    import ray

    return ray.data.range(n, override_num_blocks=4).map_batches(lambda b: {"x": b["id"] * 10})


def test_a_dataset_without_an_id_column_is_streamed_to_ranks_in_equal_shares(storage_path, tmp_path):
    out = str(tmp_path)
    result = TorchTrainer(_stream_fn, train_loop_config={"epochs": 2, "out": out},
                          scaling_config=ScalingConfig(num_workers=2), datasets={"train": _no_id_dataset(11)},
                          run_config=RunConfig(name="stream", storage_path=storage_path)).fit()
    assert result.error is None
    for epoch in range(2):
        per_rank = [_read(out, 1, r, epoch)["x"] for r in range(2)]
        assert [len(x) for x in per_rank] == [5, 5]  # equal=True: 11 rows -> 5 each, one dropped
        union = per_rank[0] + per_rank[1]
        assert len(set(union)) == 10 and set(union) <= {10 * i for i in range(11)}


def test_a_restart_of_a_streamed_dataset_begins_its_epoch_again(storage_path, tmp_path):
    """Ray's semantics without ids: rows consumed in the failed epoch are read again after it."""
    out = str(tmp_path)
    result = TorchTrainer(_stream_fn, train_loop_config={"epochs": 2, "out": out, "fail": {"epoch": 1, "rank": 1}},
                          scaling_config=ScalingConfig(num_workers=2), datasets={"train": _no_id_dataset(12)},
                          run_config=RunConfig(name="stream-restart", storage_path=storage_path,
                                               failure_config=FailureConfig(max_failures=1))).fit()
    assert result.error is None and result.metrics["epoch"] == 1
    every = {10 * i for i in range(12)}
    first = _read(out, 1, 0, 1)["x"] + _read(out, 1, 1, 1)["x"]  # epoch 1 of attempt 1: read, never reported
    again = _read(out, 2, 0, 1)["x"] + _read(out, 2, 1, 1)["x"]  # attempt 2 restarts epoch 1 from its start
    assert sorted(first) == sorted(again) == sorted(every)
    assert not os.path.exists(os.path.join(out, "a2-r0-e0.json"))  # epoch 0 was committed: not replayed


def test_datasets_not_in_datasets_to_split_are_given_whole_to_every_rank(storage_path, tmp_path):
    import ray

    out = str(tmp_path)
    datasets = {"train": _no_id_dataset(8), "val": ray.data.range(5), "items": [{"id": 100 + i} for i in range(3)],
                "raw": _no_id_dataset(4)}
    TorchTrainer(_stream_fn, train_loop_config={"epochs": 1, "out": out, "whole": ["val", "items", "raw"]},
                 scaling_config=ScalingConfig(num_workers=2), datasets=datasets,
                 dataset_config=DataConfig(datasets_to_split=["train"], enable_shard_locality=False),
                 run_config=RunConfig(name="unsplit", storage_path=storage_path)).fit()
    for r in range(2):
        seen = _read(out, 1, r, 0)
        assert seen["val"] == [0, 1, 2, 3, 4] and seen["items"] == [100, 101, 102]
        assert seen["raw"] == [0, 10, 20, 30]  # no ids: each rank iterates all of it (Ray's ds.iterator())
        assert len(seen["x"]) == 4  # train is still split (here without locality hints)


def test_a_bad_data_config_is_refused_before_any_worker_starts(storage_path):
    import ray

    with pytest.raises(ConfigError, match="datasets_to_split.*did you mean 'train'") as e:
        TorchTrainer(_stream_fn, scaling_config=ScalingConfig(num_workers=2), datasets={"train": ray.data.range(4)},
                     dataset_config=DataConfig(datasets_to_split=["trian"]),
                     run_config=RunConfig(name="badcfg", storage_path=storage_path))
    assert "'trian'" in str(e.value)
    with pytest.raises(ConfigError, match="execution_options"):
        TorchTrainer(_stream_fn, datasets={"train": ray.data.range(4)},
                     dataset_config=DataConfig(execution_options={"train": {"preserve_order": True}}))
    assert not os.path.exists(os.path.join(storage_path, "badcfg"))


def test_execution_options_reach_the_dataset_a_rank_streams(storage_path, tmp_path):
    from ray.data import ExecutionOptions

    ds = _no_id_dataset(9)

    def fn(config):
        shard = trainkit.get_dataset_shard("train")
        xs = [int(v) for b in shard.iter_batches(batch_size=2) for v in b["x"]]
        opts = shard.get_context().execution_options  # Ray's DataIterator method, through the shard
        trainkit.report({"preserve_order": int(opts.preserve_order), "n": len(xs)})

    result = TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=1), datasets={"train": ds},
                          dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
                          run_config=RunConfig(name="opts", storage_path=storage_path)).fit()
    assert result.metrics["preserve_order"] == 1 and result.metrics["n"] == 9
    assert ds.context.execution_options.preserve_order is False  # the user's dataset is left as it was


def test_local_mode_iterates_a_dataset_without_ids_in_full_each_epoch(storage_path):
    def fn(config):
        shard = trainkit.get_dataset_shard("train")
        sums = []
        while shard.epoch < 2:
            sums.append(sum(int(v) for b in shard.iter_torch_batches(batch_size=4) for v in b["x"]))
        trainkit.report({"epochs": len(sums), "first": sums[0], "second": sums[1]})

    result = TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=0), datasets={"train": _no_id_dataset(10)},
                          run_config=RunConfig(name="local-stream", storage_path=storage_path)).fit()
    assert (result.metrics["epochs"], result.metrics["first"], result.metrics["second"]) == (2, 450, 450)

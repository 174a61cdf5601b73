"""Ray-free parts of ingest: tensor columns of sequences, torch batch options, DataConfig applied to
datasets, datasets every rank reads whole, and the epoch bookkeeping of streamed shards."""

from __future__ import annotations

import numpy as np
import pytest

from trainkit import ScalingConfig
from trainkit.config import DataConfig
from trainkit.data import Ingest, ShardIterable, StreamingShard, StreamingSource, apply_data_config, make_shard
from trainkit.errors import ConfigError


def images(n: int) -> list[dict]:
    return [{"id": i, "img": np.full((1, 28, 28), i, dtype=np.float32), "label": i % 3} for i in range(n)]


def test_a_tensor_column_of_a_list_of_dicts_becomes_one_batch_tensor_of_its_shape_and_dtype():
    import torch

    shard = make_shard(images(6), 0, 1)
    b = next(iter(shard.iter_torch_batches(batch_size=4, device="cpu")))
    assert b["img"].shape == (4, 1, 28, 28) and b["img"].dtype == torch.float32
    assert b["img"][3, 0, 5, 5].item() == 3.0 and b["label"].dtype == torch.int64
    nb = next(iter(shard.iter_batches(batch_size=4)))
    assert nb["img"].shape == (4, 1, 28, 28) and nb["img"].dtype == np.float32


def test_ragged_arrays_stay_an_object_column_and_are_passed_through_untouched():
    rows = [{"id": i, "v": np.zeros(i + 1)} for i in range(3)]
    b = next(iter(make_shard(rows, 0, 1).iter_torch_batches(batch_size=3, device="cpu")))
    assert isinstance(b["v"], np.ndarray) and b["v"].dtype == object and [len(x) for x in b["v"]] == [1, 2, 3]


def test_dtypes_with_a_collate_fn_is_refused_naming_both_as_ray_does():
    import torch

    shard = make_shard(images(2), 0, 1)
    with pytest.raises(ConfigError, match=r"dtypes.*collate_fn") as e:
        shard.iter_torch_batches(dtypes=torch.float16, collate_fn=lambda b: b)
    assert isinstance(e.value, ValueError)


def test_a_plain_collate_fn_gets_the_numpy_batch_and_its_tensors_are_put_on_the_device():
    import torch

    seen = []

    def collate(batch):
        seen.append({k: type(v).__name__ for k, v in batch.items()})
        return {"x": torch.as_tensor(batch["img"]) * 2}

    b = next(iter(make_shard(images(3), 0, 1).iter_torch_batches(batch_size=3, collate_fn=collate, device="cpu")))
    assert seen[0] == {"id": "ndarray", "img": "ndarray", "label": "ndarray"}
    assert b["x"].shape == (3, 1, 28, 28) and b["x"].device.type == "cpu" and b["x"][2].max().item() == 4.0


def test_batch_size_none_is_one_batch_per_block_and_a_bad_size_names_the_choices():
    shard = make_shard(images(5), 0, 1)
    (only,) = list(shard.iter_batches(batch_size=None))
    assert list(only["id"]) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"batch_size=0 .*or None"):
        shard.iter_batches(batch_size=0)


def test_the_default_data_config_leaves_the_datasets_as_they_are():
    datasets = {"train": images(2), "val": images(1)}
    assert apply_data_config(datasets, None) is datasets
    assert apply_data_config(datasets, DataConfig()) == datasets


def test_datasets_left_out_of_datasets_to_split_are_read_whole_by_every_rank():
    datasets = apply_data_config({"train": images(6), "val": images(4)}, DataConfig(datasets_to_split=["train"]))
    assert not isinstance(datasets["train"], Ingest)
    assert isinstance(datasets["val"], Ingest) and datasets["val"].split is False
    for rank in range(3):
        train = [int(i) for b in make_shard(datasets["train"], rank, 3).iter_batches(batch_size=8) for i in b["id"]]
        val = [int(i) for b in make_shard(datasets["val"], rank, 3).iter_batches(batch_size=8) for i in b["id"]]
        assert train == [2 * rank, 2 * rank + 1] and val == [0, 1, 2, 3]


def test_a_whole_dataset_resumes_each_rank_from_its_own_state_and_refuses_a_split_state():
    val = Ingest(images(6), split=False)
    states = []
    for rank in range(2):
        shard = make_shard(val, rank, 2, name="val")
        it = iter(shard.iter_batches(batch_size=2))
        for _ in range(rank + 1):  # rank 0 reads 2 rows, rank 1 reads 4
            next(it)
        states.append(shard.state_dict())
    assert [s["split"] for s in states] == [False, False] and [s["world_rank"] for s in states] == [0, 1]
    for rank, left in ((0, [2, 3, 4, 5]), (1, [4, 5])):
        shard = make_shard(val, rank, 2, name="val", state_dict=states)
        assert [int(i) for b in shard.iter_batches(batch_size=8) for i in b["id"]] == left
    split_state = make_shard(images(6), 0, 2, name="val").state_dict()
    with pytest.raises(ConfigError, match="DataConfig"):
        make_shard(val, 0, 2, name="val", state_dict=[split_state])
    with pytest.raises(ConfigError, match="DataConfig"):
        make_shard(images(6), 0, 2, name="val", state_dict=[states[0]])


@pytest.mark.parametrize("config,match", [
    (DataConfig(datasets_to_split=["trian"]), r"datasets_to_split='trian'.*did you mean 'train'"),
    (DataConfig(execution_options={"val": object()}), r"execution_options='val'.*names of the trainer's datasets"),
    (DataConfig(execution_options={"train": {"preserve_order": True}}), r"execution_options\['train'\]"),
    (DataConfig(execution_options="fast"), r"execution_options=.*ExecutionOptions"),
    (DataConfig(enable_shard_locality="yes"), r"enable_shard_locality='yes'"),
    ({"datasets_to_split": "all"}, r"dataset_config=.*trainkit.DataConfig"),
])
def test_a_bad_data_config_names_the_setting_and_the_value(config, match):
    with pytest.raises(ConfigError, match=match):
        apply_data_config({"train": images(2)}, config)


def test_the_trainer_refuses_a_bad_data_config_when_it_is_built():
    from trainkit.torch import TorchTrainer

    with pytest.raises(ConfigError, match="did you mean 'train'"):
        TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2), datasets={"train": images(2)},
                     dataset_config=DataConfig(datasets_to_split=["trains"]))


class _FakeIterator:
    """A stand-in for Ray's DataIterator: every iter_batches call is one epoch of 3 batches."""

    def __init__(self):
        self.calls = []

    def iter_batches(self, **kw):
        self.calls.append(kw)
        return iter([{"x": np.arange(2)}] * 3)

    def schema(self):
        return "the schema"


class _FakeDataset:
    def __init__(self):
        self.it = _FakeIterator()

    def iterator(self):
        return self.it


def test_a_streamed_shard_counts_epochs_and_a_restore_restarts_the_earliest_saved_epoch():
    src = StreamingSource(_FakeDataset(), "train", broker=False)
    shard = StreamingShard(src, 0, 1, name="train")
    assert shard.epoch == 0
    assert len(list(shard.iter_batches(batch_size=2))) == 3 and shard.epoch == 1  # a full pass: next epoch
    it = iter(shard.iter_batches(batch_size=2))
    next(it)
    state = shard.state_dict()
    assert state["epoch"] == 1 and state["streaming"] is True  # mid-epoch: a restore restarts epoch 1
    list(shard.iter_batches())  # leaving a pass early: the next iter_* is the next epoch
    assert shard.epoch == 3
    assert shard.schema() == "the schema"  # Ray's DataIterator methods, through the shard
    assert isinstance(shard.iter_torch_batches(), ShardIterable)  # integrations take it as a shard iterable
    assert src.dataset.it.calls[0]["batch_size"] == 2 and src.dataset.it.calls[0]["batch_format"] == "default"
    other = dict(state, world_rank=1, epoch=2)
    assert StreamingShard(src, 0, 3, name="train", state_dict=[state, other]).epoch == 1


def test_a_streamed_shard_refuses_an_id_state_and_a_split_without_ray_naming_add_ids():
    src = StreamingSource(_FakeDataset(), "train", broker=False)
    id_state = make_shard(images(4), 0, 1, name="train").state_dict()
    hint = r"needs an 'id' column: `from trainkit.data import add_ids; ds = add_ids\(ds\)`"
    with pytest.raises(ConfigError, match=hint):
        StreamingShard(src, 0, 1, name="train", state_dict=id_state)
    torchrun_rank = StreamingShard(src, 1, 2, name="train")  # two processes, each with its own copy
    with pytest.raises(ConfigError, match="add_ids"):
        list(torchrun_rank.iter_batches())

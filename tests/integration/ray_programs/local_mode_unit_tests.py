# The Ray Train V2 docs' local-mode unit tests ("Testing with local mode"), as the docs write them:
# `import ray` with `from ray.train import ...`, then `ray.train.report` in the training function.
import pytest  # noqa: F401

import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer


def test_training_runs(tmp_path):
    def train_func(config):
        ray.train.report({"loss": 0.5})

    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        scaling_config=ScalingConfig(num_workers=0),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.error is None
    assert result.metrics == {"loss": 0.5}


def test_training_with_a_dataset_shard(tmp_path):
    def train_func(config):
        train_dataset = ray.train.get_dataset_shard("train")
        total = 0
        for batch in train_dataset.iter_batches(batch_size=4):
            total += int(batch["id"].sum())
        ray.train.report({"total": total})

    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        scaling_config=ScalingConfig(num_workers=0),
        datasets={"train": ray.data.range(10)},
        run_config=ray.train.RunConfig(storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.metrics == {"total": 45}

"""The Ray docs' local-mode unit test ("Testing with local mode"), with trainkit imports.

The only change from the Ray Train V2 docs is ``ray.train`` -> ``trainkit``. Run it with::

    python -m pytest examples/local_mode_unit_test.py

``ScalingConfig(num_workers=0)`` runs the training function in the pytest process, so a
breakpoint or ``pytest --pdb`` stops inside it. Unlike Ray Train's local mode, trainkit
also writes the run to storage (``RunConfig.storage_path``, here pytest's ``tmp_path``,
default ``~/trainkit_results``), so the second test checks what a distributed run keeps:
the checkpoint, the report history and the run folder.
"""

import os
import tempfile

import pytest  # noqa: F401  (kept from the Ray docs' example)

import trainkit
from trainkit import ScalingConfig
from trainkit.torch import TorchTrainer


def test_training_runs():
    def train_func(config):
        # Report minimal training result
        trainkit.report({"loss": 0.5})

    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        scaling_config=ScalingConfig(num_workers=0),
    )
    result = trainer.fit()

    assert result.error is None
    assert result.metrics["loss"] == 0.5


def test_checkpoints_persist_in_local_mode(tmp_path):
    def train_func(config):
        for epoch in range(config["epochs"]):
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "state.txt"), "w") as f:
                    f.write(str(epoch))
                trainkit.report({"epoch": epoch, "loss": 1.0 / (epoch + 1)},
                                checkpoint=trainkit.Checkpoint.from_directory(d))

    trainer = TorchTrainer(
        train_func,
        train_loop_config={"epochs": 3},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=trainkit.RunConfig(name="unit", storage_path=str(tmp_path)),
    )
    result = trainer.fit()

    assert result.error is None
    assert list(result.metrics_dataframe["epoch"]) == [0, 1, 2]
    with result.checkpoint.as_directory() as d:
        assert open(os.path.join(d, "state.txt")).read() == "2"
    # The run folder can be read back without the trainer.
    assert trainkit.Result.from_path(result.path).metrics == result.metrics

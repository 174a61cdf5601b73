"""A full disk in Ray mode: fit() raises a StorageError (StorageFailedError, also a TrainingFailedError)
naming the disk, not a raw RayTaskError(OSError); it is not retried whatever max_failures says; what
was committed before stays committed, and the folder is readable afterwards. The disk is a small
tmpfs mounted for the test (root only; skipped elsewhere)."""

from __future__ import annotations

import os
import tempfile

import pytest

import trainkit
from trainkit import Checkpoint, FailureConfig, Result, RunConfig, ScalingConfig, StorageError
from trainkit.errors import StorageFailedError, TrainingFailedError
from trainkit.torch import TorchTrainer
from trainkit_testing.trust import mount_small_disk, resize_disk, unmount

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(180)]


def _big_checkpoints(config):
    for step in range(1, 9):
        with tempfile.TemporaryDirectory() as d:
            if trainkit.get_context().get_world_rank() == 0:
                with open(os.path.join(d, "weights.bin"), "wb") as f:
                    f.write(b"w" * 150_000)
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d))


def test_a_full_disk_in_ray_mode_is_a_storage_error_not_retried(tmp_path):
    disk = str(tmp_path / "disk")
    if not mount_small_disk(disk, 600 * 1024):
        pytest.skip("a small disk cannot be mounted here (needs root)")
    try:
        with pytest.raises(StorageError) as info:
            TorchTrainer(_big_checkpoints, scaling_config=ScalingConfig(num_workers=2),
                         run_config=RunConfig(name="full", storage_path=disk,
                                              failure_config=FailureConfig(max_failures=3))).fit()
        err = info.value
        assert isinstance(err, StorageFailedError) and isinstance(err, TrainingFailedError), repr(err)
        assert "No space left on device" in str(err) and "ENOSPC" in str(err)
        assert err.failures[0].kind == "storage"
        resize_disk(disk, 64 * 2**20)
        restored = Result.from_path(os.path.join(disk, "full"))
        assert isinstance(restored.error, StorageFailedError)
        assert restored.checkpoint is not None and 1 <= restored.metrics["step"] < 8
        attempts = [a for a in _manifest(disk)["attempts"]]
        assert len(attempts) == 1, attempts  # not retried
    finally:
        unmount(disk)


def _manifest(disk):
    import json

    with open(os.path.join(disk, "full", "run_state.json")) as f:
        return json.load(f)

"""trainkit.lightning: a Lightning ``Trainer`` in a trainkit training function, as the Ray docs write it.

A 2-layer LightningModule on generated data (no downloads), in local mode and on 2 Ray workers;
each run crashes once at the start of an epoch and must resume from its last reported
checkpoint (``checkpoint.ckpt`` in the checkpoint folder) at that checkpoint's step. The model,
the data and the crash callback are framework_models.py's (shared with test_frameworks_torchrun.py).
"""

from __future__ import annotations

import json
import os

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402

import trainkit  # noqa: E402
from trainkit import ConfigError, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from trainkit.lightning import (RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback,  # noqa: E402
                                prepare_trainer)
from trainkit.torch import TorchTrainer  # noqa: E402

from framework_models import LightningCrashOnce, fit_from_last_report, regression_loader  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROWS, BATCH = 64, 16


def train_func(config):
    loader = regression_loader(ROWS, BATCH, shuffle=True)
    report = RayTrainReportCallback(checkpoint_upload_mode=config.get("upload_mode"))
    trainer = pl.Trainer(max_epochs=config["epochs"], devices="auto", accelerator="auto",
                         strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
                         callbacks=[report, LightningCrashOnce(config["folder"], config["crash_at"])],
                         enable_checkpointing=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer = prepare_trainer(trainer)
    fit_from_last_report(trainer, loader)


def _fit(tmp_path, storage_path, num_workers, epochs=3, crash_at=2, upload_mode=None):
    folder = tmp_path / "marks"
    folder.mkdir()
    config = {"epochs": epochs, "crash_at": crash_at, "folder": str(folder), "upload_mode": upload_mode}
    trainer = TorchTrainer(train_func, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=num_workers),
                           run_config=RunConfig(name="lightning", storage_path=storage_path,
                                                failure_config=FailureConfig(max_failures=1)))
    return trainer.fit(), folder


def _check_resumed_run(result, folder, steps_per_epoch, epochs=3, crash_at=2):
    assert result.error is None
    m = result.metrics
    assert m["epoch"] == epochs - 1 and m["step"] == epochs * steps_per_epoch
    assert isinstance(m["train_loss"], float)
    # One report per epoch, none repeated: attempt 2 went on from the report of epoch crash_at - 1.
    assert list(result.metrics_dataframe["epoch"]) == list(range(epochs))
    assert list(result.metrics_dataframe["step"]) == [steps_per_epoch * (e + 1) for e in range(epochs)]
    with open(folder / "start-a2-r0.json") as f:
        assert json.load(f) == {"epoch": crash_at, "step": crash_at * steps_per_epoch}
    with result.checkpoint.as_directory() as d:
        assert os.listdir(d) == ["checkpoint.ckpt"]
        ckpt = torch.load(os.path.join(d, "checkpoint.ckpt"), weights_only=False)
    assert ckpt["global_step"] == epochs * steps_per_epoch and ckpt["epoch"] == epochs - 1
    assert set(ckpt["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_a_lightning_trainer_in_local_mode_reports_each_epoch_and_resumes_after_a_crash(tmp_path, storage_path):
    port_before = os.environ.get("MASTER_PORT")
    result, folder = _fit(tmp_path, storage_path, num_workers=0)
    _check_resumed_run(result, folder, steps_per_epoch=ROWS // BATCH)
    # The one-rank process group Lightning made in this process is gone, and its env with it.
    assert not torch.distributed.is_initialized()
    assert os.environ.get("MASTER_PORT") == port_before


def test_the_report_callback_with_async_uploads_commits_every_epochs_checkpoint(tmp_path, storage_path):
    from trainkit import CheckpointUploadMode

    # The callback leaves its folder to report(), which deletes it once the background upload is done.
    result, _ = _fit(tmp_path, storage_path, num_workers=0, epochs=2, crash_at=None,
                     upload_mode=CheckpointUploadMode.ASYNC)
    assert list(result.metrics_dataframe["epoch"]) == [0, 1]
    assert len(result.best_checkpoints) == 2
    for checkpoint, metrics in result.best_checkpoints:
        with checkpoint.as_directory() as d:
            assert os.listdir(d) == ["checkpoint.ckpt"]
            saved = torch.load(os.path.join(d, "checkpoint.ckpt"), weights_only=False)
        assert saved["global_step"] == metrics["step"]


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
def test_a_lightning_trainer_on_two_ray_workers_shards_the_data_and_resumes_after_a_crash(tmp_path, storage_path):
    result, folder = _fit(tmp_path, storage_path, num_workers=2)
    # DistributedSampler from the strategy: each rank sees half of the rows per epoch.
    _check_resumed_run(result, folder, steps_per_epoch=ROWS // BATCH // 2)
    with open(folder / "start-a2-r1.json") as f:
        assert json.load(f)["step"] == 2 * (ROWS // BATCH // 2)


def _bad_strategy(config):
    prepare_trainer(pl.Trainer(strategy="ddp", devices=1, accelerator="cpu", logger=False))


def test_prepare_trainer_refuses_a_strategy_that_is_not_trainkits(storage_path):
    trainer = TorchTrainer(_bad_strategy, scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name="bad", storage_path=storage_path))
    with pytest.raises(trainkit.TrainingFailedError) as info:
        trainer.fit()
    cause = info.value.__cause__ or info.value
    text = f"{info.value} {cause}"
    assert "RayDDPStrategy" in text, text
    assert isinstance(cause, ConfigError) or "ConfigError" in text

"""The public surface is exactly what docs/api.md lists: the names exported by ``trainkit``,
``trainkit.torch``, ``trainkit.collective`` and ``trainkit.backends.api``. (The Ray Train names among them are
checked against the installed Ray by tests/integration/test_ray_parity.py.) A change here is a change
of the public interface, made on purpose (and written in docs/api.md)."""

from __future__ import annotations

import importlib
import pathlib

import pytest

SURFACE = {
    "trainkit": {
        "Checkpoint", "CheckpointConfig", "CheckpointError", "ConfigError", "ControllerError", "DataParallelTrainer",
        "FailureConfig", "HangConfig", "HangDetectedError", "ReportedCheckpoint", "Result", "RunConfig",
        "RunOwnedError", "ScalingConfig", "ScenarioError", "StorageError", "StragglerConfig", "TrainContext",
        "TrainingFailedError", "TrainkitError", "WorkerGroupError", "collective", "get_all_reported_checkpoints",
        "get_checkpoint", "get_context", "get_dataset_shard", "report",
        # issue 14: the rest of ray.train's names (tests/integration/test_ray_parity.py checks them against Ray)
        "BackendConfig", "CheckpointConsistencyMode", "CheckpointUploadMode", "DataConfig", "LoggingConfig",
        "NCCLHangError", "PreemptionError", "PreemptionInfo", "ReportedCheckpointStatus", "SyncConfig",
        "TRAIN_DATASET_KEY", "UserCallback", "ValidationConfig", "ValidationFn", "ValidationTaskConfig",
        "get_preemption_info"},
    "trainkit.torch": {
        "TorchTrainer", "TorchConfig", "TorchCheckpoint", "prepare_model", "prepare_data_loader", "get_device",
        "get_devices", "enable_reproducibility", "prepare_optimizer", "backward", "accelerate"},
    "trainkit.collective": {"barrier", "broadcast_from_rank_zero"},
    "trainkit.backends.api": {
        "Backend", "TrainSpec", "register_backend", "get_backend", "available_backends", "MULTI_WORKER",
        "FAULT_INJECTION", "ELASTIC", "VIRTUAL_NODES", "HANG_DIAGNOSTICS", "PREEMPTION", "DURABLE_REPORT", "Session",
        "Coordinator", "RankInfo", "ReportReply", "InlineCoordinator", "install_session", "call_train_fn",
        "failure_from", "subscribe_callbacks", "worker_hooks", "run_attempts", "record_fault", "RunSettings"},
}


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_the_public_modules_export_exactly_the_documented_names(module):
    mod = importlib.import_module(module)
    assert set(mod.__all__) == SURFACE[module]
    assert all(hasattr(mod, name) for name in mod.__all__)


def test_every_public_name_is_in_the_api_reference():
    docs = pathlib.Path(__file__).parents[2] / "docs"
    text = (docs / "api.md").read_text() + (docs / "backends.md").read_text()
    missing = sorted(n for names in SURFACE.values() for n in names if f"`{n}" not in text and n not in text)
    assert missing == []
